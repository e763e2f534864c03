"""One model forward per engine step, over several batches: AR rows ride in other groups' passes and
in prefills, block-mode groups beside each other within the step's token budget, every part of a
step is read in one host transfer, and no group's pass feeds more than that budget. Riding never
changes what a request decodes."""

from __future__ import annotations

from collections import Counter

from conftest import PROMPTS

from trimode import SamplingParams
from trimode.bench.host_syncs import HostSyncCounter


def record_forwards(runner, monkeypatch) -> list[list[str]]:
    """Per model forward from now on: the kinds of its parts, in order."""
    calls: list[list[str]] = []
    real = runner.forward_parts

    def forward_parts(parts):
        calls.append([fwd.kind for _, fwd in parts])
        return real(parts)

    monkeypatch.setattr(runner, "forward_parts", forward_parts)
    return calls


def drive(engine, arrivals: dict[int, list[tuple[str, str, SamplingParams]]]) -> tuple[dict, dict, Counter]:
    """Step until idle, adding arrivals[k] before step k: (outputs, errors, host syncs per step)."""
    results, errors, syncs, step = {}, {}, Counter(), 0
    while step <= max(arrivals) or engine.has_unfinished_requests():
        for job in arrivals.get(step, []):
            engine.add_request(*job)
        with HostSyncCounter() as c:
            outputs = engine.step()
        syncs[c.total] += 1
        for out in outputs:
            if out.error is not None:
                errors[out.request_id] = out.error
            elif out.finished:
                results[out.request_id] = out.output
        step += 1
    return results, errors, syncs


def test_ar_rows_ride_in_block_passes_and_prefills_and_decode_as_alone(llm, monkeypatch):
    ar = SamplingParams(temperature=0.0, mode="ar", max_tokens=40, ignore_eos=True)
    block = [
        SamplingParams(temperature=0.0, mode="diffusion", block_length=8, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.0, mode="selfspec", block_length=8, max_tokens=24, ignore_eos=True),
    ]
    alone = {p: llm.generate(p, ar)[0] for p in PROMPTS[:2]}
    alone_block = [llm.generate(PROMPTS[2 + i], sp)[0] for i, sp in enumerate(block)]
    calls = record_forwards(llm.runner, monkeypatch)
    arrivals = {
        0: [(f"ar{i}", p, ar) for i, p in enumerate(PROMPTS[:2])],
        2: [("diffusion", PROMPTS[2], block[0])],
        5: [("selfspec", PROMPTS[3], block[1])],
    }
    results, errors, syncs = drive(llm.engine(max_batch=8), arrivals)
    assert not errors
    for i, p in enumerate(PROMPTS[:2]):
        assert results[f"ar{i}"].token_ids == alone[p].token_ids
        assert results[f"ar{i}"].num_forwards == alone[p].num_forwards
    for name, want in zip(("diffusion", "selfspec"), alone_block):
        assert results[name].token_ids == want.token_ids and results[name].num_forwards == want.num_forwards
    beside = Counter(tuple(kinds) for kinds in calls if len(kinds) > 1)
    assert beside[("prefill", "ar")] >= 2  # the AR rows' tokens came with the later prefills
    blocks = {"denoise", "commit", "draft", "verify"}
    assert sum(n for kinds, n in beside.items() if "ar" in kinds and blocks & set(kinds)) >= 5
    # Within the step's budget the diffusion and self-spec passes share forwards too.
    assert sum(n for kinds, n in beside.items() if sum(k in blocks for k in kinds) >= 2) >= 5, beside
    # Rows shared forwards: fewer forwards ran than the requests took part in.
    assert len(calls) < sum(r.num_forwards for r in results.values()) - 10
    assert max(syncs) == 1, syncs  # one packed transfer per step, whatever it held


def test_a_group_pass_stays_within_the_token_budget(llm):
    """max_num_batched_tokens 16 with blocks of 8: at most 2 rows per diffusion group; the rest
    form further groups, which take turns, and every request decodes as alone."""
    params = SamplingParams(temperature=0.0, mode="diffusion", block_length=8, max_tokens=24, ignore_eos=True)
    prompts = [p[:12] for p in PROMPTS] + ["x = 1"]
    engine = llm.engine(max_batch=8, max_num_batched_tokens=16)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    results, most_groups = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.output
        assert all(len(g.requests) <= 2 for g in engine.groups.values())
        most_groups = max(most_groups, len(engine.groups))
    assert most_groups >= 2
    for i, p in enumerate(prompts):
        assert results[str(i)].token_ids == llm.generate(p, params)[0].token_ids


def test_a_forward_that_fails_with_riders_fails_its_lead_alone(llm, monkeypatch):
    """A prefill whose forward raises, with AR rows riding in it: the forward is run again without
    them and fails alone, so only that request fails; the riders decode exactly as alone."""
    ar = SamplingParams(temperature=0.0, mode="ar", max_tokens=30, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], ar)[0]
    poison = llm.tokenizer.encode("zzzz poison", add_special_tokens=False)
    calls, real = [], llm.runner.forward_parts

    def forward_parts(parts):
        calls.append(len(parts))
        if any(row[1 : 1 + len(poison)] == poison for _, fwd in parts for row in fwd.tokens.tolist()):
            raise RuntimeError("injected fault")
        return real(parts)

    monkeypatch.setattr(llm.runner, "forward_parts", forward_parts)
    arrivals = {0: [("ar", PROMPTS[0], ar)], 3: [("poison", "zzzz poison", SamplingParams(temperature=0.0, mode="ar"))]}
    results, errors, _ = drive(llm.engine(max_batch=8), arrivals)
    assert list(errors) == ["poison"] and "injected fault" in errors["poison"]
    assert results["ar"].token_ids == alone.token_ids and results["ar"].num_forwards == alone.num_forwards
    assert 2 in calls  # the poison's prefill was first tried with the AR row riding
