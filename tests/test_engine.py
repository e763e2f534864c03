"""LLMEngine: continuous batching across modes equals offline generation; aborts and limits."""

from __future__ import annotations

import pytest

from trimode import LLM, SamplingParams
from trimode.engine.request import Request, streamable_text
from trimode.engine.scheduler import QueueFull
from trimode.tasks import TASKS, held_out


@pytest.fixture(scope="module")
def embedded():
    return LLM()


def workload():
    chats = [e.messages() for t in TASKS for e in held_out(t, 3)]
    params = [
        SamplingParams(temperature=0.0, mode=m, max_tokens=24, block_length=b)
        for m, b in (("ar", 32), ("diffusion", 8), ("selfspec", 16), ("diffusion", 32), ("selfspec", 8))
    ]
    jobs = [(f"r{i}", chat, params[i % len(params)]) for i, chat in enumerate(chats)]
    jobs.append(("code", "def parse(line):", SamplingParams(temperature=0.0, mode="selfspec", max_tokens=30)))
    return jobs


def run(engine, jobs, arrive_every=1):
    """Requests arrive one per `arrive_every` steps while others run (all at once for 0)."""
    results, pending, step = {}, list(jobs), 0
    while pending or engine.has_unfinished_requests():
        while pending and (arrive_every == 0 or step % arrive_every == 0):
            rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
            if arrive_every:
                break
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.output
        step += 1
    return results


@pytest.mark.parametrize("arrive_every", [1, 0])
def test_continuous_batching_equals_offline_generation(embedded, arrive_every):
    # All at once: every mode is admitted in the same step, prefilled by one forward and split.
    jobs = workload()
    results = run(embedded.engine(max_batch=6 if arrive_every else 32), jobs, arrive_every)
    for rid, prompt, params in jobs:
        alone = (embedded.chat(prompt, params) if isinstance(prompt, list) else embedded.generate(prompt, params))[0]
        assert results[rid].token_ids == alone.token_ids, rid
        assert results[rid].num_forwards == alone.num_forwards, rid
        assert results[rid].text == alone.text


def test_streamed_deltas_add_up_to_the_final_text(embedded):
    engine = embedded.engine()
    engine.add_request(
        "s",
        "import os\n\n\ndef walk(top):",
        SamplingParams(temperature=0.0, mode="selfspec", max_tokens=40, stop=["raise"]),
    )
    text, final = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.delta_text
            final = out.output or final
    assert final is not None and text == final.text
    assert "raise" not in text


def test_stream_holds_back_partial_stop_strings_and_utf8(embedded):
    req = Request(None, [1], SamplingParams(temperature=0.0, stop=["STOP"]))
    tok = embedded.tokenizer
    req.emit(tok.encode("abc ST", add_special_tokens=False), set(), tok, 0.0)  # the stop search follows emit
    assert streamable_text(req) == "abc "
    req = Request(None, [1], SamplingParams(temperature=0.0, stop=["STOP"]))
    req.text = "abc \ufffd"
    assert streamable_text(req) == "abc "
    req.finish_reason = "length"
    assert streamable_text(req) == "abc \ufffd"


def test_abort_frees_the_row_and_others_continue(embedded):
    engine = embedded.engine()
    p = SamplingParams(temperature=0.0, mode="ar", max_tokens=30, ignore_eos=True)
    engine.add_request("keep", "def f(x):", p)
    engine.add_request("drop", "class A:", p)
    engine.step()
    engine.step()
    assert engine.num_running == 2
    assert engine.abort_request("drop") and not engine.abort_request("drop")
    assert engine.num_running == 1
    kv = next(iter(engine.groups.values())).batch.kv
    assert kv.batch_size == 1 and engine.pool.num_used_pages == kv.num_allocated_pages  # its pages are back
    done = run(engine, [])
    assert done["keep"].token_ids == embedded.generate("def f(x):", p)[0].token_ids


def test_queue_limit_and_bad_requests(embedded):
    engine = embedded.engine(max_batch=1, max_queue=2, kv_cache_tokens=200)
    engine.add_request("a", "x", SamplingParams(temperature=0.0, max_tokens=4))
    engine.add_request("b", "y", SamplingParams(temperature=0.0, max_tokens=4))
    with pytest.raises(QueueFull):
        engine.add_request("c", "z", SamplingParams(temperature=0.0, max_tokens=4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", "x", SamplingParams(temperature=0.0, max_tokens=4))
    with pytest.raises(ValueError, match="KV slots"):
        engine.add_request("big", "x", SamplingParams(temperature=0.0, max_tokens=210))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", "", SamplingParams(temperature=0.0))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1  # max_batch=1 holds the second back
    assert engine.abort_request("b") and engine.num_waiting == 0


class CountingTokenizer:
    """Wraps a Tokenizer and counts full decodes."""

    def __init__(self, tok) -> None:
        self.tok, self.decodes = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decodes += 1
        return self.tok.decode(ids, skip_special_tokens)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_detokenisation_is_incremental_and_equals_a_full_decode(embedded):
    """Pins: every emitted token re-decoded the whole output (O(L^2) per request). Emitting 600
    tokens one at a time decodes the whole output once (at the end), and the text equals it."""
    tok = CountingTokenizer(embedded.tokenizer)
    ids = embedded.generate("import os\n", SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True))[
        0
    ].token_ids
    req = Request(None, [1], SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True))
    texts = []
    for t in ids:
        req.emit([t], set(), tok, 0.0)
        texts.append(req.text)
    assert tok.decodes == 1 and req.text == embedded.tokenizer.decode(ids)
    assert all(req.text.startswith(t) for t in texts)  # streamed text only ever grows


@pytest.mark.parametrize("stop", ["__init__", "= mode\n", "):\n"])
def test_stop_strings_straddling_emits_cut_at_the_same_token(embedded, stop):
    """A stop string whose characters arrive over several emits (one token at a time) cuts the same
    tokens and text as when they arrive in one emit."""
    ids = embedded.generate("class Stack:", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))[
        0
    ].token_ids
    whole = Request(None, [1], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, stop=[stop]))
    whole.emit(ids, set(), embedded.tokenizer, 0.0)
    one_by_one = Request(None, [1], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, stop=[stop]))
    for t in ids:
        if one_by_one.finish_reason is None:
            one_by_one.emit([t], set(), embedded.tokenizer, 0.0)
    full = embedded.tokenizer.decode(ids)
    assert stop in full
    assert whole.text == one_by_one.text == full[: full.index(stop)]
    assert whole.token_ids == one_by_one.token_ids and whole.finish_reason == "stop"
    assert embedded.tokenizer.decode(whole.token_ids).find(stop) >= 0  # the cut keeps the whole stop string
    assert stop not in embedded.tokenizer.decode(whole.token_ids[:-1])


def test_a_request_past_the_training_length_is_served_with_one_warning(caplog):
    """The embedded model was trained on 256-token sequences (its training_args.json); longer ones
    are served, with one warning per engine, not refused."""
    llm = LLM(compile=False)
    assert llm.training_seq_len == 256
    engine = llm.engine()
    with caplog.at_level("WARNING", logger="trimode.engine"):
        engine.add_request("short", "x = 1", SamplingParams(temperature=0.0, max_tokens=8))
        assert not caplog.records
        for rid in ("long", "longer"):
            engine.add_request(rid, "x = 1", SamplingParams(temperature=0.0, max_tokens=300))
    (warning,) = caplog.records
    assert "past the 256 the model was trained on" in warning.getMessage()
