"""Helpers for tests that run `trimode serve` as a subprocess on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

MODEL = "trimode-embedded"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str, env: dict[str, str] | None = None, port: int | None = None):
    """Start a server and wait until /health answers; returns (process, base URL). The server's
    output goes to a file (a pipe nobody reads would fill and block it): `server_log(proc)` reads it."""
    port = port or free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="trimode-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimode", "serve", "--port", str(port), *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    proc.log_path = Path(log.name)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise RuntimeError("server did not start: " + server_log(proc))


@contextlib.contextmanager
def serving(*flags: str, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`start_server`'s (process, URL) for a `with` block; the server is stopped at its end."""
    proc, url = start_server(*flags, env=env)
    try:
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def in_process(engine: Any, model: str, **app_args: Any) -> Iterator[tuple[Any, Any]]:
    """An `LLMEngine` served in this process (its queue bound is its config's max_queue): (its
    AsyncEngine, started, and the app over it); shut down at the end of the `with` block.
    `app_args`: build_app's keywords."""
    from trimode.server.app import build_app
    from trimode.server.async_engine import AsyncEngine

    served = AsyncEngine(engine)
    served.start()
    try:
        yield served, build_app(served, model, **app_args)
    finally:
        served.shutdown()


def run_client(
    app: Any, fn: Callable[[httpx.AsyncClient], Awaitable[Any]], timeout: float = 60, raise_app_exceptions: bool = True
) -> Any:
    """`fn(client)` against an in-process app over ASGI; what it returns. Without
    `raise_app_exceptions`, a handler's exception reaches the client as the server's 500."""

    async def main() -> Any:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=timeout) as c:
            return await fn(c)

    return asyncio.run(main())


def write_report(report: dict, out: Path | None) -> None:
    """A figures script's JSON report: printed, and written to `out` when given."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def server_log(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def metric(url: str, name: str, labels: str = "") -> float:
    """The value of `name` (with `labels`, e.g. 'reason="not_found"', if given) in /metrics; 0 if absent
    for a labelled series, an error for a plain one."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if labels and line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
        if not labels and (line.startswith(name + " ") or line.startswith(name + "{")):
            return float(line.rsplit(" ", 1)[1])
    if labels:
        return 0.0
    raise AssertionError(f"{name} not in /metrics")
