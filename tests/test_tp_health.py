"""A dead tensor-parallel worker (issue 24, item 4): once a worker is gone no forward can run, so
/health answers 503 `worker_dead`, requests get a 503 that says why (not an instant 500 each), and
the server still stops cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from live import in_process, run_client, server_log, start_server

from trimode import LLM, SamplingParams
from trimode.engine.tp_workers import WorkerDead
from trimode.model.transformer import Part, Transformer

KILLED = "tensor-parallel rank 1 exited (killed by SIGKILL)"


class FakeDriver:
    """A tensor-parallel driver whose workers run every forward until `failure` is set."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self.forwards = 0

    def run(self, model: Transformer, parts: list[Part], pools: list) -> list[torch.Tensor]:
        if self.failure is not None:
            raise WorkerDead(self.failure)
        self.forwards += 1
        return model.forward_parts(parts)


def test_a_dead_worker_turns_health_and_new_requests_into_503(llm, monkeypatch):
    """Pins: with a worker dead, /health stayed 200 and every request was an instant 500."""
    engine = llm.engine(max_batch=4)
    driver = FakeDriver()
    monkeypatch.setattr(engine.runner, "tp_driver", driver)
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 2000, "ignore_eos": True, "stream": True}

    async def go(c: httpx.AsyncClient) -> tuple:
        healthy = await c.get("/health")
        stream = asyncio.ensure_future(c.post("/v1/completions", json=body))
        while driver.forwards < 5 and not stream.done():
            await asyncio.sleep(0.01)
        driver.failure = KILLED  # the worker dies mid-stream
        events = [line[6:] for line in (await stream).text.splitlines() if line.startswith("data: ")]
        refused = await c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        return healthy, events, refused, await c.get("/health")

    with in_process(engine, "tiny") as (_, app):
        healthy, events, refused, dead = run_client(app, go)
    assert healthy.status_code == 200 and healthy.json()["status"] == "ok"
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and KILLED in error["message"]
    assert refused.status_code == 503 and KILLED in refused.json()["error"]["message"]
    assert dead.status_code == 503
    assert dead.json()["status"] == "worker_dead" and dead.json()["worker_error"] == KILLED


def test_a_killed_worker_fails_forwards_clearly_and_close_is_clean(tiny_dir):
    """Pins: the driver did not notice a dead worker (each forward failed with gloo's error) and
    close() raised, messaging a group that no longer exists."""
    threads = torch.get_num_threads()
    tp = LLM(tiny_dir, dtype="float32", device="cpu", compile=False, tensor_parallel_size=2)
    driver = tp.runner.tp_driver
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        assert len(tp.generate("def f(x):", params)[0].token_ids) == 4
        assert driver.failure is None
        driver.workers[0].kill()
        driver.workers[0].wait()
        assert driver.failure == KILLED  # seen at once, with no forward running
        with pytest.raises(RuntimeError, match=re.escape(KILLED)):  # WorkerDead, or a request failed by it
            tp.generate("def f(x):", params)
    finally:
        tp.close()  # no stop message to a dead group: no error
    assert torch.get_num_threads() == threads


@pytest.mark.slow  # 6 s; the engine-level killed-worker test stays in the default suite
def test_a_server_whose_worker_is_killed_says_so_and_stops_cleanly(tiny_dir):
    """`trimode serve -tp 2`, the worker SIGKILLed mid-stream: the stream ends with a 503 error
    event, /health answers 503 worker_dead, a new request gets a 503, and SIGTERM exits 0 without
    a traceback (it exited 1, from the stop message sent to the dead worker)."""
    proc, url = start_server(
        "--model", str(tiny_dir), "--dtype", "float32", "--device", "cpu", "-tp", "2", "--served-model-name", "tiny"
    )
    try:
        worker = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        events: list[str] = []
        body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 4000, "ignore_eos": True, "stream": True}

        def read() -> None:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.time() + 30
        while httpx.get(url + "/health").json()["running"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(worker, signal.SIGKILL)
        reader.join(timeout=30)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 503, events[-3:]
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "worker_dead", health.text
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503, r.text
        before = len(server_log(proc))
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    assert code == 0, server_log(proc)[-3000:]
    assert "Traceback" not in server_log(proc)[before:], server_log(proc)[before:]
