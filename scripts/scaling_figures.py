"""The README's "Scaling out" figures on this machine: `trimode train` on 1 process vs 2 torchrun
ranks (gloo, FSDP2), and `trimode bench` with tensor parallelism 1 vs 2, interleaved ABAB.

Training tokens/s is the median of each run's per-step `tokens_per_s` (log.jsonl) past the first
`--skip` steps; memory per rank is what the run's last log entry records. Usage:
    python scripts/scaling_figures.py --repeats 3 [--steps 12] [--rows 16] [--out docs/bench/scaling-cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trimode.llm import EMBEDDED_MODEL_DIR

# The embedded model's shape; 16 rows of 256 tokens per step (its recipe took 64).
SHAPE = "--preset tiny --hidden 256 --layers 8 --heads 4 --kv-heads 2 --head-dim 64 --intermediate 512".split()


def train_run(ranks: int, steps: int, rows: int, out: Path) -> list[dict]:
    common = ["train", "--out", str(out), "--data", "stdlib:1,tasks:1", *SHAPE, "--tokenizer", str(EMBEDDED_MODEL_DIR)]
    common += ["--seq-len", "256", "--steps", str(steps), "--save-every", str(steps), "--eval-examples", "0"]
    common += ["--device", "cpu", "--autocast", "off"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "trimode", *common, "--batch-size", str(rows)]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        cmd += ["-m", "trimode", *common, "--batch-size", str(rows // ranks)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // ranks))}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def bench_run(tp: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "trimode", "bench", "--modes", "ar,diffusion,selfspec", "--batch-sizes", "1,8"]
    cmd += ["--block-lengths", "32", "--num-prompts", "8", "--max-tokens", "32", "--repeats", "1"]
    cmd += ["--enforce-eager", "--tensor-parallel-size", str(tp), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    parser.add_argument("--out", default="docs/bench/scaling-cpu")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"train": {1: [], 2: []}, "memory": {}, "bench": {1: [], 2: []}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for ranks in (1, 2):  # interleaved: A B A B
                log = train_run(ranks, args.steps, args.rows, Path(tmp) / f"train-{ranks}-{r}")
                result["train"][ranks].append(statistics.median(e["tokens_per_s"] for e in log[args.skip :]))
                result["memory"][ranks] = log[-1]["memory"]
                print(f"train, {ranks} rank(s), repeat {r}: {result['train'][ranks][-1]:.0f} tokens/s", flush=True)
            for tp in (1, 2):
                report = bench_run(tp, Path(tmp) / f"bench-{tp}-{r}")
                result["bench"][tp].append(report)
                print(f"bench, tensor parallel {tp}, repeat {r} done", flush=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    for ranks in (1, 2):
        speeds = result["train"][ranks]
        print(f"train {ranks} rank(s): median {statistics.median(speeds):.0f} tokens/s over {speeds}")
        print(f"  memory per rank: {result['memory'][ranks]}")


if __name__ == "__main__":
    main()
