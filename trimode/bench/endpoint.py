"""Drive any OpenAI-compatible server over HTTP with streaming requests, closed-loop: `concurrency`
clients each send a request, read its stream to the end, and send the next, for `duration` seconds
(or until every prompt has run once). Timing is the client's: TTFT is the first chunk with text,
inter-token latency is (last chunk - first chunk) / (completion tokens - 1), the same per-request
figure the offline bench reports; chunk gaps are what a reader of the stream sees between updates.

As offline, configurations are interleaved: the load is cut into `repeats` rounds, and in each
round every configuration runs one slice (duration / repeats seconds, or every prompt once), in a
shuffled order, reversed on every other round (ABBA). Each slice is a unit for the bootstrap
intervals (`trimode.bench.stats`); speed-ups are paired by round; an A/A control and the
tokens-per-forward bound check the run (`trimode.bench.runner.add_intervals`).

trimode's own fields (`mode`, `block_length`, `threshold`, `spec`) are sent only when a mode is named; mode
`default` sends none, so vLLM or SGLang are measured with the same requests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from trimode.bench.metrics import add_speedup_vs_ar, latency
from trimode.bench.runner import Unit, add_intervals, unit_samples
from trimode.bench.suites import BenchPrompt
from trimode.decoding import uses
from trimode.sampling_params import MODES, REQUEST_MODES

ENDPOINT_MODES = (*REQUEST_MODES, "mixed", "default")  # and mixes of request modes, "diffusion+auto"


def client_modes(mode: str) -> tuple[str, ...] | None:
    """The request modes a configuration's clients take turns over: a mix such as
    "diffusion+auto", "mixed" (the three decoding modes), or one mode; None for "default" (the
    server's). ValueError naming the parts that are not modes."""
    if mode == "default":
        return None
    if mode == "mixed":
        return MODES
    parts = tuple(m.strip() for m in mode.split("+"))
    if not all(m in REQUEST_MODES for m in parts):
        raise ValueError(
            f"mode {mode!r}: each part of a mix must be one of {', '.join(REQUEST_MODES)} (e.g. diffusion+auto), "
            f"or give mixed or default"
        )
    return parts


@dataclass(frozen=True)
class EndpointConfig:
    mode: str  # a mode (auto too), a mix "diffusion+auto" or "mixed" (clients round-robin), or "default"
    concurrency: int
    block_length: int | None = None
    threshold: float | None = None
    control: bool = False  # the A/A control: a second measurement of the same configuration
    spec: str | None = None  # self-spec's kind (`--spec`); None leaves the server's default

    @property
    def load(self) -> int:
        return self.concurrency

    @property
    def label(self) -> str:
        parts = [self.mode, f"c{self.concurrency}"]
        if self.block_length is not None:
            parts.append(f"B{self.block_length}")
        if self.threshold is not None:
            parts.append(f"t{self.threshold:g}")
        if self.spec is not None and self.spec != "linear":
            parts.append(self.spec)
        return " ".join(parts + ["(A/A)"] * self.control)

    def request_mode(self, k: int) -> str | None:
        """The mode client `k` asks for (None: the server's default)."""
        modes = client_modes(self.mode)
        return None if modes is None else modes[k % len(modes)]


@dataclass
class Sample:
    mode: str | None
    sent: float
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    tokens: int = 0
    forwards: int | None = None
    error: str | None = None
    correct: bool | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent if self.chunk_times else float("nan")

    @property
    def itl(self) -> float:
        if self.tokens < 2 or not self.chunk_times:
            return float("nan")
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.tokens - 1)


def request_body(
    prompt: BenchPrompt, model: str, cfg: EndpointConfig, mode: str | None, max_tokens: int, seed: int
) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": prompt.max_tokens or max_tokens,
        "temperature": 0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if mode is not None:
        body["mode"] = mode
        if uses(mode, "block_length") and cfg.block_length is not None:
            body["block_length"] = cfg.block_length
        if uses(mode, "threshold") and cfg.threshold is not None:
            body["threshold"] = cfg.threshold
        if uses(mode, "spec") and cfg.spec is not None:
            body["spec"] = cfg.spec
    if prompt.messages:
        return "/chat/completions", {**body, "messages": prompt.chat()}
    return "/completions", {**body, "prompt": prompt.prompt}


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any], sample: Sample) -> None:
    """One streaming request; fills `sample` (its error instead of raising)."""
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                sample.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                doc = json.loads(data)
                if "error" in doc:
                    sample.error = f"stream error: {doc['error'].get('message')}"
                    return
                for choice in doc.get("choices") or ():
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        sample.chunk_times.append(time.perf_counter())
                        sample.text += text
                if doc.get("usage"):
                    sample.tokens = doc["usage"]["completion_tokens"]
                    sample.forwards = doc["usage"].get("num_forwards")
            if not done:
                sample.error = "stream ended without [DONE]"
            elif not sample.tokens:  # a server without usage in streams: count chunks
                sample.tokens = len(sample.chunk_times)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as e:
        sample.error = f"{type(e).__name__}: {e}"


async def run_load(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    prompts: list[BenchPrompt],
    cfg: EndpointConfig,
    max_tokens: int,
    duration: float | None,
    seed: int = 0,
) -> tuple[list[Sample], float]:
    """`cfg.concurrency` closed-loop clients; new requests stop at `duration` (every prompt once if None),
    and the requests in flight then run to the end. Returns the samples and the wall seconds."""
    counter = itertools.count()
    start = time.perf_counter()
    deadline = None if duration is None else start + duration
    samples: list[Sample] = []

    async def worker() -> None:
        while True:
            k = next(counter)
            if (deadline is None and k >= len(prompts)) or (deadline is not None and time.perf_counter() >= deadline):
                return
            prompt, mode = prompts[k % len(prompts)], cfg.request_mode(k)
            path, body = request_body(prompt, model, cfg, mode, max_tokens, seed)
            sample = Sample(mode, time.perf_counter())
            await send(client, base_url + path, body, sample)
            if sample.error is None:
                sample.correct = prompt.is_correct(sample.text)
            samples.append(sample)

    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    return samples, time.perf_counter() - start


def summarize_load(samples: list[Sample], seconds: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    forwards = [s.forwards for s in ok]
    checked = [s.correct for s in ok if s.correct is not None]
    gaps = [b - a for s in ok for a, b in zip(s.chunk_times, s.chunk_times[1:])]
    return {
        "num_requests": len(ok),
        "num_failed": len(samples) - len(ok),
        "failures": sorted({s.error for s in samples if s.error})[:5],
        "num_generated_tokens": tokens,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 2),
        "requests_per_s": round(len(ok) / seconds, 3),
        # Only servers that report forwards in `usage` (trimode) have tokens per forward.
        "tokens_per_forward": round(tokens / max(sum(f or 0 for f in forwards), 1), 4)
        if ok and None not in forwards
        else None,
        "ttft_ms": latency([s.ttft for s in ok]),
        "itl_ms": latency([s.itl for s in ok]),
        "chunk_gap_ms": latency(gaps),
        "e2e_ms": latency([s.chunk_times[-1] - s.sent for s in ok if s.chunk_times]),
        "accuracy": round(sum(checked) / len(checked), 4) if checked else None,
        "num_checked": len(checked),
    }


async def served_model(client: httpx.AsyncClient, base_url: str) -> str:
    r = await client.get(base_url + "/models")
    if r.status_code != 200:
        raise ValueError(f"GET {base_url}/models answered HTTP {r.status_code}: {r.text[:200]}")
    data = r.json().get("data") or []
    if not data:
        raise ValueError(f"GET {base_url}/models lists no model; pass --served-model")
    return data[0]["id"]


@dataclass
class EndpointRun:
    model: str
    results: list[dict[str, Any]]
    units: dict[EndpointConfig, list[Unit]]  # a configuration's slices, one per round
    warnings: list[str]

    def samples(self) -> dict[str, list[dict[str, Any]]]:
        return unit_samples(self.units)


async def bench_endpoint(
    base_url: str,
    prompts: list[BenchPrompt],
    configs: list[EndpointConfig],
    max_tokens: int,
    duration: float | None,
    warmup: int,
    repeats: int = 1,
    seed: int = 0,
    api_key: str | None = None,
    model: str | None = None,
    on_slice: Callable[[EndpointConfig, int], None] | None = None,
) -> EndpointRun:
    """`warmup` rounds of `concurrency` requests per configuration (not measured), then `repeats`
    rounds of one slice per configuration, interleaved (module docstring)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(c.concurrency for c in configs) + 4)
    timeout = httpx.Timeout(600, connect=10)
    per_slice = None if duration is None else duration / repeats
    slices: dict[EndpointConfig, list[tuple[list[Sample], float]]] = {cfg: [] for cfg in configs}
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        try:
            model = model or await served_model(client, base_url)
        except httpx.HTTPError as e:
            raise ValueError(f"cannot reach {base_url}: {e}") from e
        if warmup:
            for cfg in configs:
                await run_load(client, base_url, model, prompts[: warmup * cfg.concurrency], cfg, max_tokens, None)
        for r in range(repeats):
            order = list(configs)
            random.Random(seed + r // 2).shuffle(order)
            for cfg in order if r % 2 == 0 else order[::-1]:
                if on_slice is not None:
                    on_slice(cfg, r)
                slices[cfg].append(await run_load(client, base_url, model, prompts, cfg, max_tokens, per_slice))
    results = []
    for cfg in configs:
        samples = [s for batch, _ in slices[cfg] for s in batch]
        seconds = sum(t for _, t in slices[cfg])
        result = {
            "label": cfg.label,
            "mode": cfg.mode,
            "concurrency": cfg.concurrency,
            "block_length": cfg.block_length,
            "threshold": cfg.threshold,
            "spec": cfg.spec,
            "control": cfg.control,
            **summarize_load(samples, seconds),
        }
        mix = client_modes(cfg.mode)
        if mix is not None and len(mix) > 1:
            result["by_mode"] = {m: summarize_load([s for s in samples if s.mode == m], seconds) for m in mix}
        results.append(result)
    units = {
        cfg: [
            Unit(0, r, sum(s.tokens for s in batch if s.error is None), t) for r, (batch, t) in enumerate(slices[cfg])
        ]
        for cfg in configs
    }
    add_speedup_vs_ar(results, _concurrency)
    return EndpointRun(model, results, units, add_intervals(results, list(units.values()), _concurrency))


def _concurrency(r: dict[str, Any]) -> int:
    return r["concurrency"]


def endpoint_configs(
    modes: list[str],
    concurrencies: list[int],
    block_lengths: list[int | None],
    thresholds: list[float | None],
    specs: list[str | None] | None = None,
) -> list[EndpointConfig]:
    """Block lengths apply to every mode but AR, thresholds to diffusion and mixed, self-spec's
    kinds to selfspec and mixed; None leaves the server's default."""
    configs = []
    for c in concurrencies:
        for mode in modes:
            sends = client_modes(mode) or ()  # a mix sends each mode's own fields; default sends none
            blocks = block_lengths if any(uses(m, "block_length") for m in sends) else [None]
            ts = thresholds if any(uses(m, "threshold") for m in sends) else [None]
            kinds = specs if specs and any(uses(m, "spec") for m in sends) else [None]
            configs += [EndpointConfig(mode, c, b, t, spec=s) for b in blocks for s in kinds for t in ts]
    return configs
