"""Training and inference on several processes (CPU, gloo): torchrun launches and spawned workers.

Training: N ranks with FSDP2 (and DTensor TP) compute the losses one process computes on the same
global batch; checkpoints resume exactly, on the same or another number of ranks; the consolidated
model directory loads with `LLM`. Inference: tensor parallelism gives the tokens one process gives,
in every mode.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from live import free_port, server_log, start_server

from tests.conftest import PROMPTS
from trimode import LLM, SamplingParams
from trimode.cli import main
from trimode.llm import EMBEDDED_MODEL_DIR

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# A model small enough that a step costs less than the processes' start.
TRAIN = (
    "--data tasks.copy --preset tiny --hidden 64 --layers 2 --heads 4 --kv-heads 2 --head-dim 16 "
    f"--intermediate 128 --tokenizer {EMBEDDED_MODEL_DIR} --seq-len 64 --steps 10 --save-every 5 "
    "--eval-examples 0 --warmup-steps 2 --device cpu --autocast off --keep 5"
).split()
STEPS = 10
HERE = Path(__file__).parent


def torchrun(*commands: list[str], ranks: int = 2) -> None:
    """Each command line (`trimode ...` arguments), in order, in one `torchrun --nproc-per-node ranks`
    launch; raises with the ranks' output on failure."""
    cmd = [
        *TORCHRUN,
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        str(HERE / "torchrun_cli.py"),
        json.dumps(commands),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(run: Path) -> list[tuple[float, float]]:
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(e["loss_ar"], e["loss_diff"]) for e in entries]


def assert_close(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> None:
    assert len(a) == len(b) == STEPS
    for (ar_a, diff_a), (ar_b, diff_b) in zip(a, b):
        assert ar_a == pytest.approx(ar_b, rel=1e-5) and diff_a == pytest.approx(diff_b, rel=1e-5)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """The reference: one plain process, 8 rows per step."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(["train", "--out", str(out), *TRAIN, "--batch-size", "8"]) == 0
    return out


@pytest.mark.slow  # 9 s; tests/test_train.py checks one-process resume in the default suite
def test_two_ranks_reproduce_one_and_resume_anywhere(one_rank, tmp_path):
    """2 FSDP2 ranks of 4 rows each == 1 process of 8; stopping at step 5 and resuming on 2 ranks ==
    the uninterrupted run (exactly: same layout, same reductions); the 2-rank checkpoint of step 5
    resumed by one process == the reference; the consolidated model directory loads with LLM."""
    two, paused = tmp_path / "two", tmp_path / "paused"
    torchrun(  # one launch; each command builds its model, mesh and optimizer afresh
        ["train", "--out", str(two), *TRAIN, "--batch-size", "4"],
        ["train", "--out", str(paused), *TRAIN, "--batch-size", "4", "--stop-at", "5"],
        ["train", "--out", str(paused), *TRAIN, "--batch-size", "4", "--resume"],
    )
    # The step-5 checkpoint of the paused run, and its log up to there, as one process finds them.
    onto_one = tmp_path / "onto_one"
    onto_one.mkdir()
    shutil.copytree(paused / "checkpoint-000005", onto_one / "checkpoint-000005")
    (onto_one / "latest").write_text("checkpoint-000005")
    (onto_one / "log.jsonl").write_text("".join((paused / "log.jsonl").read_text().splitlines(True)[:5]))
    assert_close(losses(two), losses(one_rank))
    assert losses(paused) == losses(two)
    assert main(["train", "--out", str(onto_one), *TRAIN, "--batch-size", "8", "--resume"]) == 0
    assert_close(losses(onto_one), losses(one_rank))
    last = two / "checkpoint-000010"
    assert json.loads((last / "trainer_state.json").read_text())["world_size"] == 2
    assert len(list((last / "trainer").glob("shard-*.safetensors"))) == 2  # one per rank
    out = LLM(last, dtype="float32", device="cpu", compile=False).generate(
        "def f(x):", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 6


@pytest.mark.slow
def test_tensor_parallel_training_matches_one_process(one_rank, tmp_path):
    """--tp 2, a (1, 2) mesh: both ranks read all 8 rows, each holding half of every projection, of
    the vocabulary and of the head (DTensor), with activation checkpointing: the reference losses."""
    out = tmp_path / "tp"
    torchrun(["train", "--out", str(out), *TRAIN, "--batch-size", "8", "--tp", "2", "--activation-checkpointing"])
    assert_close(losses(out), losses(one_rank))


@pytest.mark.slow
def test_two_nodes_on_localhost(one_rank, tmp_path):
    """Two torchrun launches, one process each, meeting at 127.0.0.1 (--nnodes 2): the same run."""
    out = tmp_path / "nodes"
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launches = [
        subprocess.Popen(
            [*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1"]
            + ["--master-addr", "127.0.0.1", "--master-port", port, "-m", "trimode", "train", "--out", str(out)]
            + [*TRAIN, "--batch-size", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for node in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0] for p in launches]
    assert all(p.returncode == 0 for p in launches), "\n".join(log[-2000:] for log in logs)
    assert_close(losses(out), losses(one_rank))


def _tokens(llm: LLM) -> dict[str, list[list[int]]]:
    """Greedy tokens of a batch of prompts in every mode (self-spec with the draft LoRA)."""
    out = {}
    for mode in ("ar", "diffusion", "selfspec"):
        params = SamplingParams(temperature=0.0, mode=mode, max_tokens=20, ignore_eos=True, block_length=8)
        out[mode] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    return out


def test_tensor_parallel_generate_matches_one_process(llm, tiny_dir):
    """LLM(tensor_parallel_size=2) spawns one worker; every mode's tokens equal TP=1's, batched."""
    reference, threads = _tokens(llm), torch.get_num_threads()
    tp = LLM(tiny_dir, dtype="float32", device="cpu", compile=False, tensor_parallel_size=2)
    try:
        assert (
            tp.model.encoder.layers[0].self_attn.q_proj.weight.shape[0]
            == llm.config.num_attention_heads * llm.config.head_dim // 2
        )
        assert _tokens(tp) == reference
    finally:
        tp.close()
    # While its worker ran this process used half the cores; it gets them back (the rest of a
    # process, here later tests, must not run on fewer threads, nor round differently).
    assert torch.get_num_threads() == threads


@pytest.mark.slow
def test_tensor_parallel_server_matches_one_process(llm, tiny_dir):
    """`trimode serve --tensor-parallel-size 2` (one process the user starts; it spawns its worker)
    answers each mode's completions with TP=1's tokens; stopping it stops the worker."""
    proc, url = start_server(
        "--model", str(tiny_dir), "--dtype", "float32", "--device", "cpu", "-tp", "2", "--served-model-name", "tiny"
    )
    try:
        for mode in ("ar", "diffusion", "selfspec"):
            params = SamplingParams(temperature=0.0, mode=mode, max_tokens=12, ignore_eos=True, block_length=8)
            expected = [o.outputs[0].text for o in llm.generate(PROMPTS[:2], params)]
            body = {"model": "tiny", "prompt": PROMPTS[:2], "max_tokens": 12, "temperature": 0}
            body.update({"mode": mode, "ignore_eos": True, "block_length": 8})
            got = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
            assert [c["text"] for c in got["choices"]] == expected, server_log(proc)
    finally:
        workers = _children(proc.pid)
        proc.terminate()
        proc.wait(timeout=30)
    # Stopped, not orphaned: the server's shutdown tells its worker to stop before uvicorn re-raises
    # the SIGTERM (which would end the process without exit handlers).
    assert len(workers) == 1 and "Traceback" not in server_log(proc) and "rank 0 is gone" not in server_log(proc)
    assert _all_gone(workers), server_log(proc)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    """Running or sleeping (not gone, not a zombie nobody reaped)."""
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _all_gone(pids: list[int], seconds: float = 20) -> bool:
    """Whether every process in `pids` has ended within `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


def test_bad_tensor_parallel_sizes_are_clear(tiny_dir):
    with pytest.raises(ValueError, match="does not divide the model's num_attention_heads"):
        LLM(tiny_dir, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        LLM(tiny_dir, device="cpu", tensor_parallel_size=0)


@pytest.mark.slow
def test_more_ranks_than_kv_heads_replicate_them(llm, tiny_dir):
    """TP=4 over a model with 2 KV heads: each KV head lives on the 2 ranks whose query heads read it."""
    assert llm.config.num_key_value_heads == 2
    reference = _tokens(llm)
    tp = LLM(tiny_dir, dtype="float32", device="cpu", compile=False, tensor_parallel_size=4)
    try:
        assert tp.model.num_local_kv_heads == 1
        assert _tokens(tp) == reference
    finally:
        tp.close()


@pytest.mark.slow
def test_generate_under_torchrun_matches_one_process(llm, tiny_dir):
    """`torchrun --nproc-per-node 2 -m trimode generate -tp 2`: rank 1 becomes the worker inside
    LLM(...) and exits with rank 0; rank 0 prints TP=1's tokens."""
    params = SamplingParams(temperature=0.0, mode="selfspec", max_tokens=16, ignore_eos=True, block_length=8)
    expected = llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "trimode", "generate", PROMPTS[0], "-tp", "2"]
    cmd += ["--model", str(tiny_dir), "--dtype", "float32", "--device", "cpu", "--mode", "selfspec", "--json"]
    cmd += ["--max-tokens", "16", "--ignore-eos", "--block-length", "8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["token_ids"] == expected


@pytest.mark.slow
def test_a_killed_rank_0_leaves_no_worker_behind(tiny_dir):
    """SIGKILL skips every exit handler: the spawned worker dies with its parent (Linux's
    parent-death signal) instead of waiting for messages, or a rendezvous, that never come."""
    code = (
        f"from trimode import LLM; import time; llm = LLM({str(tiny_dir)!r}, device='cpu', compile=False, "
        "tensor_parallel_size=2); print('ready', flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    workers = _children(proc.pid)
    proc.kill()
    proc.wait()
    assert len(workers) == 1 and _all_gone(workers)
