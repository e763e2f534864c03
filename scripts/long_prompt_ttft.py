"""TTFT of short requests sent while a long prompt prefills, against a running `trimode serve`.

Sends one completion whose prompt is PROMPT_TOKENS tokens of standard-library source (max_tokens 1),
then, one second later, SHORTS short streaming requests one after another, and prints each short
request's time to first token and the long request's total time.

Usage: python scripts/long_prompt_ttft.py URL [PROMPT_TOKENS] [SHORTS]
       e.g. python scripts/long_prompt_ttft.py http://127.0.0.1:8000 16384 5
"""

from __future__ import annotations

import inspect
import json
import sys
import threading
import time

import httpx

from trimode.tokenizer import Tokenizer


def long_text(tokens: int) -> str:
    from trimode.llm import EMBEDDED_MODEL_DIR

    tok = Tokenizer.from_dir(EMBEDDED_MODEL_DIR)
    ids = tok.encode(inspect.getsource(json.decoder) * 200, add_special_tokens=False)[:tokens]
    return tok.decode(ids)


def ttft(url: str, model: str, prompt: str) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text": ""' not in line:
                return time.perf_counter() - start
    raise RuntimeError("no text streamed")


def main() -> None:
    url = sys.argv[1]
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
    shorts = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    prompt = long_text(tokens)
    took: dict[str, float] = {}

    def send_long() -> None:
        start = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1}, timeout=3600)
        took["long_s"] = time.perf_counter() - start
        took["long_prompt_tokens"] = r.json()["usage"]["prompt_tokens"]

    thread = threading.Thread(target=send_long)
    thread.start()
    time.sleep(1.0)
    ttfts = [round(ttft(url, model, "def parse(line):"), 3) for _ in range(shorts)]
    thread.join()
    print(json.dumps({"short_ttft_s": ttfts, **took}))


if __name__ == "__main__":
    main()
