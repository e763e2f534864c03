"""What one request costs the requests beside it, on a live server (issue 24's hostile run).

1. Stop strings: 16 concurrent requests with 64 stop strings of 256 characters each, against the
   same 16 without stop strings (interleaved, `--repeats` times): wall seconds of each batch.
2. Head-of-line: one request with n = 64, max_tokens 512, logprobs 20, then a 4-token request
   0.5 s later: the small request's latency, and alone.
3. Grammars: K = 1, 4, 8 requests under the largest regex of the issue's shape the server accepts,
   beside a plain stream: the stream's median chunk gap, and what the issue's `(a{700}){700}` gets.

Usage: python scripts/neighbour_figures.py [--repeats 3] [--pythonpath DIR] [--out FILE]
(`--pythonpath DIR`: run the server from another checkout, for before/after figures; run this script
from DIR too, since `python -m trimode` puts the working directory first on the path.)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from live import MODEL, serving, write_report  # noqa: E402

BODY = {"model": MODEL, "prompt": "def parse(line):", "max_tokens": 64, "ignore_eos": True, "temperature": 0}


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=600)


def batch_seconds(url: str, body: dict, n: int = 16) -> float:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        statuses = [r.status_code for r in ex.map(lambda _: post(url, body), range(n))]
    assert statuses == [200] * n, statuses
    return time.perf_counter() - start


def stop_strings(url: str, repeats: int) -> dict:
    stops = [("x" * 255) + chr(0x4E00 + i) for i in range(64)]  # never matched: every step searches all
    plain, stopped = [], []
    for _ in range(repeats):  # ABAB
        plain.append(batch_seconds(url, BODY))
        stopped.append(batch_seconds(url, {**BODY, "stop": stops}))
    return {"16 requests, seconds": plain, "16 requests with 64 stop strings of 256 chars, seconds": stopped}


def head_of_line(url: str) -> dict:
    alone = time.perf_counter()
    assert post(url, {**BODY, "max_tokens": 4}).status_code == 200
    alone = time.perf_counter() - alone
    big = {**BODY, "n": 64, "max_tokens": 512, "logprobs": 20}
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        running = ex.submit(post, url, big)
        time.sleep(0.5)
        start = time.perf_counter()
        small = post(url, {**BODY, "max_tokens": 4})
        behind = time.perf_counter() - start
        big_status = running.result().status_code
    return {
        "4-token request alone, s": round(alone, 3),
        "behind n=64 x 512 tokens with logprobs 20, s": round(behind, 3),
        "statuses (small, big)": [small.status_code, big_status],
    }


def chunk_gaps(url: str, body: dict) -> list[float]:
    gaps, last = [], None
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    return gaps


def grammars(url: str, regex: str) -> dict:
    out = {}
    hostile = post(url, {**BODY, "guided_regex": "(a{700}){700}"})
    out["(a{700}){700}"] = f"{hostile.status_code}: {hostile.text[:120]}"
    for k in (0, 1, 4, 8):
        with concurrent.futures.ThreadPoolExecutor(k + 1) as ex:
            heavy = [ex.submit(post, url, {**BODY, "max_tokens": 200, "guided_regex": regex}) for _ in range(k)]
            time.sleep(0.3 if k else 0)
            gaps = chunk_gaps(url, {**BODY, "max_tokens": 48})
            statuses = [h.result().status_code for h in heavy]
        out[f"K={k} x {regex}: stream median chunk gap, s"] = round(statistics.median(gaps), 4)
        out[f"K={k} statuses"] = statuses
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pythonpath", help="run the server from this checkout")
    parser.add_argument("--regex", default="(a{220}){220}")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    env = {"PYTHONPATH": args.pythonpath} if args.pythonpath else None
    with serving("--max-batch", "32", env=env) as (_, url):
        report = {
            "stop strings": stop_strings(url, args.repeats),
            "head of line": head_of_line(url),
            "grammars": grammars(url, args.regex),
        }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
