"""The training recipe: SBD mask, loss arithmetic, masking schemes, resume, conversion."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config
from torch import nn

from trimode import LLM, SamplingParams
from trimode.tokenizer import Tokenizer
from trimode.tokenizer_build import build_tokenizer, write_tokenizer_files
from trimode.train.data import Batcher
from trimode.train.init import load_hf_causal_lm, random_model
from trimode.train.masking import position_dependent_masking, sbd_attention_mask, uniform_masking
from trimode.train.objective import joint_loss_sums
from trimode.train.trainer import TrainConfig, train


def test_sbd_mask_matches_a_per_pair_reference():
    length, block = 10, 4
    got = sbd_attention_mask(length, block)
    for q in range(2 * length):
        for k in range(2 * length):
            q_noisy, k_noisy = q < length, k < length
            qi, ki = q % length, k % length
            if q_noisy and k_noisy:
                want = qi // block == ki // block
            elif q_noisy:
                want = ki // block < qi // block
            elif k_noisy:
                want = False
            else:
                want = ki <= qi
            assert bool(got[q, k]) == want, (q, k)


class FixedLogits(nn.Module):
    """A stand-in model whose logits are set by the test; it records what the objective fed it."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, ctx, logit_index=None):
        self.seen = (input_ids, ctx)
        return self.logits


def test_joint_loss_by_hand():
    vocab, x0 = 4, torch.tensor([[2, 0, 3, 1]])
    eligible = torch.tensor([[False, True, True, True]])
    is_masked = torch.tensor([[False, True, False, True]])
    p_mask = torch.tensor([[0.5, 0.5, 0.25, 0.25]])
    model = FixedLogits(torch.zeros(1, 8, vocab))  # uniform: every cross-entropy is ln 4
    sums = joint_loss_sums(model, x0, eligible, is_masked, p_mask, mask_id=3, block_size=2)
    ids, ctx = model.seen
    assert ids.tolist() == [[2, 3, 3, 3, 2, 0, 3, 1]]  # [x_t | x_0], masked positions -> mask id
    assert ctx.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert torch.equal(ctx.mask[0, 0], sbd_attention_mask(4, 2))
    # AR: targets x0[1..3] are all eligible: 3 * ln4. Diffusion: masked positions 1 and 3, / p_mask.
    assert sums.num_ar == 3 and sums.ar.item() == pytest.approx(3 * math.log(4))
    assert sums.num_diff == 3 and sums.diff.item() == pytest.approx(math.log(4) / 0.5 + math.log(4) / 0.25)
    # Perfect predictions with the right (un)shifting give ~0 loss: clean i -> x0[i+1], noisy i -> x0[i].
    logits = torch.full((1, 8, vocab), -30.0)
    for i in range(4):
        logits[0, i, x0[0, i]] = 30.0
        if i < 3:
            logits[0, 4 + i, x0[0, i + 1]] = 30.0
    sums = joint_loss_sums(FixedLogits(logits), x0, eligible, is_masked, p_mask, mask_id=3, block_size=2)
    assert sums.ar.item() < 1e-6 and sums.diff.item() < 1e-6


def test_position_dependent_masking_counts_and_skew():
    gen = torch.Generator().manual_seed(0)
    block, eligible = 16, torch.ones(4000, 16, dtype=torch.bool)
    eligible[:, 12:] = False  # L' = 12 per block
    is_masked, p = position_dependent_masking(eligible, block, gen, half_life_ratio=0.1)
    t = (p[:, 0] - 1e-3) / (1 - 1e-3)
    assert torch.equal(is_masked.sum(1), torch.round(t * 12).long())
    assert not is_masked[:, 12:].any()
    idx = torch.arange(block).float()
    few = (t < 0.3) & (is_masked.sum(1) > 0)
    many = t > 0.9
    mean_pos = lambda rows: ((is_masked[rows] * idx).sum() / is_masked[rows].sum()).item()  # noqa: E731
    assert mean_pos(few) > 8.0  # skewed to the end of the 0..11 range (uniform would be 5.5)
    assert abs(mean_pos(many) - 5.5) < 0.5
    u_masked, _ = uniform_masking(eligible, block, gen)
    assert not u_masked[:, 12:].any() and abs(u_masked.float()[:, :12].mean().item() - 0.5) < 0.02


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(build_tokenizer(512, split_digits=True), out, 4096)
    return out


def small_cfg(out, **kw):
    base = dict(
        out=str(out),
        data="tasks.copy",
        steps=6,
        batch_size=4,
        seq_len=64,
        lr=3e-3,
        warmup_steps=2,
        block_size=8,
        save_every=3,
        eval_examples=0,
        device="cpu",
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


def model_for(tok_dir, seed=0):
    cfg = tiny_config(
        vocab_size=Tokenizer.from_dir(tok_dir).vocab_size, eos_token_id=(11,), pad_token_id=3, block_size=8
    )
    return random_model(cfg, seed)


def test_resume_equals_uninterrupted(tmp_path, tok_dir):
    full = train(small_cfg(tmp_path / "a"), model_for(tok_dir), tok_dir, show_progress=False)
    first = train(small_cfg(tmp_path / "b"), model_for(tok_dir), tok_dir, show_progress=False, stop_at=3)
    assert (tmp_path / "b" / "latest").read_text() == "checkpoint-000003"
    rest = train(small_cfg(tmp_path / "b"), model_for(tok_dir, seed=99), tok_dir, resume=True, show_progress=False)
    assert [e["step"] for e in first + rest] == list(range(1, 7))
    for a, b in zip(full, first + rest):
        assert a["loss_ar"] == pytest.approx(b["loss_ar"], rel=1e-5)
        assert a["loss_diff"] == pytest.approx(b["loss_diff"], rel=1e-5)


def test_checkpoint_loads_with_llm_and_records_its_args(tmp_path, tok_dir):
    train(small_cfg(tmp_path, steps=3), model_for(tok_dir), tok_dir, show_progress=False, extra_args={"x": 1})
    ckpt = tmp_path / "checkpoint-000003"
    args = json.loads((ckpt / "training_args.json").read_text())
    assert args["data"] == "tasks.copy" and args["x"] == 1 and args["model"]["vocab_size"] == 512
    out = LLM(ckpt, dtype="float32").chat(
        [{"role": "user", "content": "Copy: 1 2"}],
        SamplingParams(temperature=0.0, mode="selfspec", max_tokens=4, block_length=4),
    )
    assert len(out[0].token_ids) >= 1
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left behind


def test_short_run_on_one_task_lowers_both_losses(tmp_path, tok_dir):
    log = train(
        small_cfg(tmp_path, steps=40, batch_size=8, save_every=40), model_for(tok_dir), tok_dir, show_progress=False
    )
    first = lambda k: sum(e[k] for e in log[:5]) / 5  # noqa: E731
    last = lambda k: sum(e[k] for e in log[-5:]) / 5  # noqa: E731
    assert last("loss_ar") < 0.7 * first("loss_ar")
    assert last("loss_diff") < 0.7 * first("loss_diff")


def test_only_assistant_tokens_are_trained_on(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    x0, eligible = Batcher("tasks.copy", tok, 11, 3, 96, seed=0).get(0, range(2))
    im_end = tok.token_to_id("<|im_end|>")
    for row, ok in zip(x0.tolist(), eligible.tolist()):
        text_ok = tok.decode([t for t, e in zip(row, ok) if e])
        assert "Copy" not in text_ok and "user" not in text_ok  # no prompt tokens
        assert any(t == im_end and e for t, e in zip(row, ok))  # the turn's end is learned


def test_jsonl_errors_name_the_line(tmp_path, tok_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        Batcher(str(bad), Tokenizer.from_dir(tok_dir), 11, 3, 32, 0)
    with pytest.raises(ValueError, match="unknown tasks"):
        Batcher("tasks.divide", Tokenizer.from_dir(tok_dir), 11, 3, 32, 0)


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_hf_causal_lm_conversion_keeps_ar_logits(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    kw = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if arch == "mistral":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    hf.save_pretrained(tmp_path)
    ours = load_hf_causal_lm(tmp_path, mask_token_id=100)
    tokens = torch.randint(0, 300, (1, 40))
    from reference import full_forward

    with torch.no_grad():
        want = hf.eval()(tokens).logits
    got = full_forward(ours.eval(), tokens[0].tolist())
    assert (got - want[0]).abs().max().item() < 1e-4


def test_quick_eval_runs_on_the_model_in_training(tmp_path, tok_dir):
    """Regression: the end-of-run eval wraps the model with `LLM.from_parts`, which lacked the
    attributes `LLM.__init__` had gained (the seed stream), so every `trimode train` failed at its
    last step with an AttributeError; the suite's runs all set eval_examples=0."""
    log = train(small_cfg(tmp_path, steps=2, eval_examples=1), model_for(tok_dir), tok_dir, show_progress=False)
    accuracy = log[-1]["eval"]["accuracy"]
    assert set(accuracy) == {"ar", "diffusion", "selfspec"}
    assert all(0.0 <= row["copy"] <= 1.0 for row in accuracy.values())
