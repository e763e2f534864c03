"""KV pool and page tables: per-row lengths, crop after a verify pass, rows joining and leaving, prefix caching."""

from __future__ import annotations

import pytest
import torch

from trimode.engine.model_runner import ModelRunner
from trimode.kv_cache import CAUSAL, KVCache, KVPool, KVPoolExhausted


def pool(pages: int = 8, page_size: int = 4) -> KVPool:
    return KVPool(1, pages, page_size, 1, 4, dtype=torch.float32, device="cpu")


def test_positions_and_mask_follow_per_row_lengths():
    kv = KVCache(pool(), rows=2)
    kv.begin(5)
    kv.commit([3, 5])
    positions, span = kv.begin(2)
    assert positions.tolist() == [[3, 4], [5, 6]] and span == 7
    causal = kv.attention_mask(2, span, causal=True)[:, 0]
    assert causal[0].long().tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]]
    assert causal[1].long().tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    bidir = kv.attention_mask(2, span, causal=False)[:, 0].expand(2, 2, span)
    assert bidir[0].long().tolist() == [[1, 1, 1, 1, 1, 0, 0]] * 2


def test_rows_of_one_length_get_no_materialised_mask():
    kv = KVCache(pool(), rows=2)
    kv.begin(3)
    kv.commit()
    _, span = kv.begin(2)
    assert kv.attention_mask(2, span, causal=False) is None  # every key visible
    shared = kv.attention_mask(2, span, causal=True)  # lower-right causal, one mask for both rows
    assert shared.shape == (1, 1, 2, span) and shared[0, 0].long().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    fresh = KVCache(pool(), rows=2)
    _, span = fresh.begin(3)
    assert span == 3 and fresh.attention_mask(3, span, causal=True) == CAUSAL  # no prefix: SDPA's is_causal
    assert kv.attention_mask(1, span, causal=True) is None  # one query sees everything


def test_commit_crop_select_rows_and_pages_return():
    kv = KVCache(pool(pages=8, page_size=4), rows=3)
    kv.begin(6)
    assert kv.num_allocated_pages == 6 and kv.pool.num_free_pages == 2
    kv.commit([1, 6, 2])  # a verify pass keeps a different prefix per row, and scratch for the next
    assert kv.lengths == [1, 6, 2] and kv.num_allocated_pages == 6  # nothing to return yet
    kv.begin(2)
    kv.commit([1, 0, 0], keep_scratch=False)  # a prefill's: pages past each prefix go back
    assert kv.lengths == [2, 6, 2] and kv.num_allocated_pages == 1 + 2 + 1 and kv.pool.num_free_pages == 4
    kv.select_rows([2, 0])
    assert kv.lengths == [2, 2] and kv.pool.num_free_pages == 6
    kv.release()
    assert kv.pool.num_free_pages == 8 and kv.pool.refs == [0] * 8


def test_rows_join_and_leave_by_page_ids_without_copying_kv():
    shared = pool()
    a, b = KVCache(shared, rows=1), KVCache(shared, rows=1)
    a.begin(4)
    a.commit()
    b.begin(2)
    b.commit()
    before = shared.k[0].data_ptr()
    a.extend(b)
    assert a.lengths == [4, 2] and b.batch_size == 0 and shared.k[0].data_ptr() == before
    (left,) = a.split([[1]])
    assert left.lengths == [2] and a.batch_size == 0


def test_prefix_pages_are_shared_then_cached_then_evicted():
    shared = pool(pages=4, page_size=2)
    first = KVCache(shared)
    context = [5, 6, 7, 8, 9]
    assert first.add_row(context) == 0
    first.begin(len(context))
    first.commit()
    first.register_prefix(0, context)  # two full pages: [5, 6], [7, 8]
    second = KVCache(shared)
    assert second.add_row([5, 6, 7, 8, 1]) == 4 and second.pages[0] == first.pages[0][:2]
    assert KVCache(shared).add_row([5, 6, 9, 9, 9]) == 2  # only the first page matches
    assert KVCache(shared).add_row([5, 6, 7, 8]) == 2  # the last token is always computed
    assert shared.num_prefix_hits == 8 and shared.num_prefix_queries == 19
    page0, page1, page2 = first.pages[0]
    first.release()
    assert shared.refs[page0] == 3 and shared.refs[page1] == 1  # still read by the others
    assert page2 in shared.free  # held token 9 only: not cached, back on the free list


def test_unreferenced_cached_pages_are_reused_when_memory_is_needed():
    shared = pool(pages=2, page_size=2)
    kv = KVCache(shared)
    kv.add_row([1, 2, 3])
    kv.begin(3)
    kv.commit()
    kv.register_prefix(0, [1, 2, 3])
    kv.release()
    assert shared.num_free_pages == 2 and len(shared.evictable) == 1
    shared.release(shared.allocate(2))  # takes the cached page too: its entry is gone
    assert KVCache(shared).add_row([1, 2, 3]) == 0


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
        a.commit([3])
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


def test_an_exhausted_pool_is_an_error_not_a_silent_write():
    kv = KVCache(pool(pages=2, page_size=2), rows=1)
    kv.begin(3)
    kv.commit()
    with pytest.raises(KVPoolExhausted, match="need 1 KV pages, 0 of 2 are free"):
        kv.begin(2)


def test_a_row_on_consecutive_pages_is_read_in_place_and_equals_a_gather():
    shared = pool(pages=8, page_size=2)
    k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    reads = []
    for pages in ([2, 3, 4], [6, 1, 4]):  # one run, then scattered pages
        kv = KVCache(shared, rows=1)
        kv.pages = [list(pages)]
        kv.begin(5)
        assert (kv.view.run is not None) == (pages == [2, 3, 4])
        reads.append(kv.view.write(0, k, v))
    assert torch.equal(reads[0][0], reads[1][0]) and torch.equal(reads[0][1], reads[1][1])
    assert torch.equal(reads[0][0], k)


def test_a_right_padded_prefill_takes_only_each_rows_own_pages():
    """Pins: a short prompt prefilled beside a long one allocated pages for the long one's length
    (then gave them back), so a nearly full pool failed a batch that fitted."""
    kv = KVCache(pool(pages=4, page_size=4), rows=2)
    kv.begin(12, num_fed=[12, 2])  # 3 pages + 1 page: the pool's 4; pad positions go to the trash page
    assert [len(p) for p in kv.pages] == [3, 1] and kv.pool.num_free_pages == 0
    k = torch.randn(2, 1, 12, 4)
    kv.view.write(0, k, k)
    kv.commit([12, 2], keep_scratch=False)
    assert kv.pool.k[0][:16].abs().sum() > 0 and kv.pool.trash not in kv.pages[0] + kv.pages[1]
