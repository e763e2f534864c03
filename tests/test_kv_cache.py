"""KV cache: per-row lengths, crop/rollback after a verify pass, row selection."""

from __future__ import annotations

import torch

from trimode.engine.model_runner import ModelRunner
from trimode.kv_cache import KVCache


def test_positions_and_mask_follow_per_row_lengths():
    kv = KVCache(1, 2, 1, 4, capacity=16, dtype=torch.float32, device="cpu")
    kv.set_lengths(torch.tensor([3, 5]))
    positions, span = kv.begin(2)
    assert positions.tolist() == [[3, 4], [5, 6]] and span == 7
    causal = kv.attention_mask(2, span, causal=True)[:, 0]
    assert causal[0].long().tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]]
    assert causal[1].long().tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    bidir = kv.attention_mask(2, span, causal=False)[:, 0].expand(2, 2, span)
    assert bidir[0].long().tolist() == [[1, 1, 1, 1, 1, 0, 0]] * 2


def test_commit_crop_and_select_rows():
    kv = KVCache(1, 3, 1, 2, capacity=10, dtype=torch.float32, device="cpu")
    kv.begin(4)
    kv.commit(torch.tensor([1, 4, 2]))  # a verify pass keeps a different prefix per row
    assert kv.lengths.tolist() == [1, 4, 2]
    kv.set_lengths(torch.tensor([1, 2, 2]))  # crop
    kv.select_rows(torch.tensor([2, 0]))
    assert kv.lengths.tolist() == [2, 1] and kv.k.shape[1] == 2


def test_cropped_verify_pass_leaves_the_cache_as_if_only_accepted_tokens_were_fed(llm):
    """Write 6 tokens, keep 3: the next step's logits equal a cache fed only those 3."""
    runner = ModelRunner(llm.model)
    prompt = torch.tensor([llm.tokenizer.encode("def f(x):")])
    extra = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        a = runner.new_cache(1, 64)
        runner.forward(a, prompt, causal=True)
        a.commit()
        runner.forward(a, extra, causal=True)
        a.commit(torch.tensor([3]))
        got = runner.forward(a, torch.tensor([[42]]), causal=True)
        b = runner.new_cache(1, 64)
        runner.forward(b, torch.cat([prompt, extra[:, :3]], 1), causal=True)
        b.commit()
        want = runner.forward(b, torch.tensor([[42]]), causal=True)
    assert torch.allclose(got, want, atol=1e-5)


def test_uncommitted_bidirectional_pass_does_not_change_the_cache(llm):
    runner = ModelRunner(llm.model)
    prompt = torch.tensor([llm.tokenizer.encode("import sys")])
    with torch.inference_mode():
        kv = runner.new_cache(1, 64)
        runner.forward(kv, prompt, causal=True)
        kv.commit()
        before = runner.forward(kv, torch.tensor([[7, 8]]), causal=True)
        runner.forward(kv, torch.tensor([[1, 100, 100, 100]]), causal=False)  # a draft pass, never committed
        after = runner.forward(kv, torch.tensor([[7, 8]]), causal=True)
    assert torch.equal(before, after)


def test_incremental_decode_equals_one_full_causal_pass(llm):
    runner = ModelRunner(llm.model)
    tokens = torch.randint(0, llm.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = runner.forward(runner.new_cache(1, 32), tokens, causal=True)
        kv = runner.new_cache(1, 32)
        steps = [runner.forward(kv, tokens[:, :8], causal=True)]
        kv.commit()
        for i in range(8, 20):
            steps.append(runner.forward(kv, tokens[:, i : i + 1], causal=True))
            kv.commit()
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_overflow_is_an_error_not_a_silent_write():
    kv = KVCache(1, 1, 1, 2, capacity=4, dtype=torch.float32, device="cpu")
    kv.set_lengths(torch.tensor([3]))
    try:
        kv.begin(2)
    except RuntimeError as e:
        assert "overflow" in str(e)
    else:
        raise AssertionError("expected an overflow error")
