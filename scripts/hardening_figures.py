"""The hostile-client figures of the server hardening (README, serving section), on a live server.

1. Big chats: 8 concurrent chats of 199,000 characters (the largest a chat may be) while a client
   polls /health and another streams: /health latency and the stream's largest chunk gap.
2. Slow clients: 2,000 connections that never finish their request: how many the server holds
   (file descriptors), how fast /health answers once --read-timeout has evicted them.
3. Shutdown: SIGTERM during a 4,096-token stream: seconds until the process has exited, and how the
   stream ended.

Usage: python scripts/hardening_figures.py
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from live import MODEL, start_server  # noqa: E402


def big_chats(url: str) -> dict:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Sort: 4 2 9 " * 16_583}], "max_tokens": 1}
    stream_body = {"model": MODEL, "prompt": "import os\n", "max_tokens": 600, "ignore_eos": True, "stream": True}
    health, gaps, done = [], [], threading.Event()

    def poll() -> None:
        while not done.is_set():
            start = time.perf_counter()
            httpx.get(url + "/health", timeout=60)
            health.append(time.perf_counter() - start)
            time.sleep(0.02)

    def stream() -> None:
        last = None
        with httpx.stream("POST", url + "/v1/completions", json=stream_body, timeout=120) as r:
            for line in r.iter_lines():
                now = time.perf_counter()
                if line.startswith("data: ") and last is not None:
                    gaps.append(now - last)
                last = now

    streamer, poller = threading.Thread(target=stream), threading.Thread(target=poll)
    streamer.start()
    time.sleep(1.0)
    poller.start()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = [
            r.status_code
            for r in pool.map(lambda _: httpx.post(url + "/v1/chat/completions", json=chat, timeout=300), range(8))
        ]
    done.set()
    poller.join()
    streamer.join()
    return {
        "chat_status": codes,
        "health_ms_p50": round(1000 * statistics.median(health), 1),
        "health_ms_max": round(1000 * max(health), 1),
        "stream_gap_ms_p50": round(1000 * statistics.median(gaps), 1),
        "stream_gap_ms_max": round(1000 * max(gaps), 1),
    }


def slow_clients(url: str, proc: subprocess.Popen, read_timeout: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(2000):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        socks.append(s)
    time.sleep(1.0)
    fds_held = len(os.listdir(f"/proc/{proc.pid}/fd"))
    time.sleep(read_timeout + 1.0)
    fds_after = len(os.listdir(f"/proc/{proc.pid}/fd"))
    start = time.perf_counter()
    status = httpx.get(url + "/health", timeout=10).status_code
    seconds = time.perf_counter() - start
    for s in socks:
        s.close()
    return {
        "server_fds_with_2000_slow_clients": fds_held,
        "server_fds_after_read_timeout": fds_after,
        "health_after": status,
        "health_ms_after": round(1000 * seconds, 1),
    }


def shutdown(shutdown_timeout: float) -> dict:
    proc, url = start_server("--shutdown-timeout", str(shutdown_timeout))
    events: list[str] = []
    body = {"model": MODEL, "prompt": "import os\n", "max_tokens": 4096, "ignore_eos": True, "stream": True}

    def read() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(2.0)
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    reader.join()
    return {
        "shutdown_timeout_s": shutdown_timeout,
        "exit_s": round(time.perf_counter() - start, 2),
        "last_events": events[-2:],
        "num_events": len(events),
    }


def main() -> None:
    read_timeout = 5.0
    proc, url = start_server("--read-timeout", str(read_timeout))
    try:
        results = {"big_chats": big_chats(url), "slow_clients": slow_clients(url, proc, read_timeout)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    results["shutdown"] = shutdown(2.0)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
