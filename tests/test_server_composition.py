"""Rows compose through the server (issue 24): a streaming request of any feature family, joined
after its third chunk by a newcomer of any family, in every mode; both answers equal their answers
alone. The generated offline matrix is tests/test_composition.py; the 120-second soak is
tests/soak.py."""

from __future__ import annotations

import concurrent.futures
import itertools
import random

import httpx
import pytest
from soak import MODES, Alone, answer, body, same, stream_choices

pytest.importorskip("fastapi")

# Five families (n samples are seeded sampling) x five x the three modes: the hostile run's join
# matrix. Quadratic self-spec's joins are in the offline matrix and the soak (its pass is wide: the
# default suite's time is bounded).
FAMILIES = ["greedy", "controls", "grammar", "logprobs", "n"]
PAIRS = [(mode, a, b) for mode in MODES if mode != "quadratic" for a in FAMILIES for b in FAMILIES]


@pytest.fixture(scope="module")
def url(tool_server):
    """The session's shared server (the default --max-batch 32; its tool-call flags touch no
    request here, and every sampled request here is seeded)."""
    return tool_server[1]


def test_a_newcomer_joining_a_stream_changes_neither_answer(url):
    alone = Alone(url)

    def pair(case: tuple[str, str, str]) -> list[str]:
        mode, running, newcomer = case
        rng = random.Random("|".join(case))
        victim = {**body(running, mode, rng, stream=True), "max_tokens": 16}
        joining = body(newcomer, mode, rng)
        with httpx.stream("POST", url + "/v1/chat/completions", json=victim, timeout=120) as r:
            assert r.status_code == 200
            lines, head = r.iter_lines(), []
            for line in lines:  # its first three chunks
                head.append(line)
                if sum(h.startswith("data: ") for h in head) == 3:
                    break
            with concurrent.futures.ThreadPoolExecutor(1) as ex:
                joined = ex.submit(answer, url, joining)
                got = {"running": stream_choices(itertools.chain(head, lines)), "newcomer": joined.result()}
        want = {"running": alone(victim), "newcomer": alone(joining)}
        return [f"{case} {role}: {got[role]} != {want[role]}" for role in got if not same(got[role], want[role])]

    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        failures = [f for fs in ex.map(pair, PAIRS) for f in fs]
    assert not failures, failures[:5]
