"""Unknown request fields, as SDK upgrades, agent frameworks and proxies send them: accepted and
ignored, named once in the log and on every response that ignored them; those that would change
what the answer must be are refused by name."""

from __future__ import annotations

import httpx
import pytest
from live import MODEL, server_log

from trimode.server.protocol import REFUSED_FIELDS
from trimode.server.service import IGNORED_HEADER

CHAT = [{"role": "user", "content": "Sort: 3 1 2", "refusal": None}]


@pytest.fixture(scope="module")
def served(tool_server):
    return tool_server


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_fields_are_ignored_and_named(served, stream):
    proc, url = served
    plain = {"model": MODEL, "messages": [{"role": "user", "content": "Sort: 3 1 2"}], "max_tokens": 6}
    want = httpx.post(url + "/v1/chat/completions", json={**plain, "temperature": 0}, timeout=30)
    body = {**plain, "messages": CHAT, "temperature": 0, "reasoning_effort": "low", "x_proxy_trace": {"a": 1}}
    r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
    assert r.status_code == 200 and IGNORED_HEADER not in want.headers
    assert r.headers[IGNORED_HEADER] == "reasoning_effort, x_proxy_trace, messages.refusal"
    if not stream:  # the same answer as without them
        assert r.json()["choices"][0]["message"] == want.json()["choices"][0]["message"]
    r = httpx.post(
        url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "priority": 3}, timeout=30
    )
    assert r.status_code == 200 and r.headers[IGNORED_HEADER] == "priority"
    log = server_log(proc)
    for name in ("reasoning_effort", "x_proxy_trace", "messages.refusal", "priority"):
        assert log.count(f"ignoring the request field `{name}`") == 1  # once, however often it comes


@pytest.mark.parametrize("field", sorted(REFUSED_FIELDS))
def test_fields_that_change_the_answer_are_refused_by_name(served, field):
    _, url = served
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, field: ["text"]}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(f"`{field}` is not supported: ")
