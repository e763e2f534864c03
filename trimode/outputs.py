"""What requests return: a finished request's GenerationOutput (vLLM's shape), and the
RequestOutput the engine gives each request per step (its new text and tokens, streamed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Logprob:
    """A token's log-probability at one position, and its rank there (1 = most likely): vLLM's."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# Per position: the chosen token's entry first, then the most likely tokens (vLLM's shape).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One completion of a request, in vLLM's shape (`GenerationOutput.outputs`)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[PositionLogprobs] | None = None  # per token, when logprobs were asked for
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (EOS: None)

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the chosen tokens' logprobs (vLLM's), when logprobs were asked for."""
        if self.logprobs is None:
            return None
        return sum(p[t].logprob for p, t in zip(self.logprobs, self.token_ids))


@dataclass
class GenerationOutput:
    """A finished request: its completion's fields at the top level (trimode's shape), and the
    same as `outputs[0]` (vLLM's `RequestOutput` shape)."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    mode: str
    num_forwards: int  # every forward the request took part in, its prefill included
    seconds: float  # wall time of the batch the request ran in
    token_times: list[float] = field(default_factory=list)  # per token: seconds after the batch started
    # The mode's per-step statistic: selfspec "tokens_per_cycle", diffusion "denoise_passes_per_block".
    mode_stats: dict[str, list[int]] = field(default_factory=dict)
    forward_ms: dict[str, float] = field(default_factory=dict)  # mean ms per forward kind, in its batch
    decodings: dict[str, int] | None = None  # mode auto: cycles per decoding that served it
    # Filled when asked for (SamplingParams.logprobs / prompt_logprobs), in vLLM's shapes: per
    # generated token, and per prompt token (None for the first, which nothing predicts).
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # With n > 1: every sample (the fields above are the first's; num_forwards counts all of them).
    completions: list[CompletionOutput] = field(default_factory=list)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (EOS: None)
    request_id: str = ""  # offline: its place among every prompt this LLM was given ("0", "1", ...)

    @property
    def finished(self) -> bool:
        """vLLM's: a result here is always whole."""
        return True

    @property
    def outputs(self) -> list[CompletionOutput]:
        """Every sample (n > 1), or this one."""
        return self.completions or [
            CompletionOutput(0, self.text, self.token_ids, self.finish_reason, self.logprobs, self.stop_reason)
        ]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def time_to_first_token(self) -> float:
        return self.token_times[0] if self.token_times else float("nan")

    @property
    def inter_token_latency(self) -> float:
        """Mean seconds per output token after the first (TPOT)."""
        if len(self.token_times) < 2:
            return float("nan")
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def tokens_per_forward(self) -> float:
        return self.num_generated_tokens / max(self.num_forwards, 1)

    def summary(self) -> dict[str, Any]:
        """The JSON object `trimode generate --json` prints."""
        d = asdict(self)
        del d["prompt_token_ids"], d["token_times"]
        for name in ("logprobs", "prompt_logprobs", "completions"):
            if d[name] is None or d[name] == []:
                del d[name]
        d.update(
            num_prompt_tokens=self.num_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens,
            tokens_per_forward=round(self.tokens_per_forward, 4),
        )
        for name, values in self.mode_stats.items():
            d[f"mean_{name}"] = round(sum(values) / len(values), 4) if values else None
        return d


@dataclass
class RequestOutput:
    """What one engine step gave one request: its new text and tokens, its whole result once it
    finished, or the error that ended it."""

    request_id: str
    delta_text: str  # newly committed text, safe to stream (no split UTF-8, no partial stop string)
    new_token_ids: list[int]
    finished: bool
    output: GenerationOutput | None = None  # the whole result, once finished
    error: str | None = None  # set when serving the request failed
    # Whether `error` is the request's own (its grammar failed while decoding: a 400 on the server),
    # not the engine's (a bug: a 500).
    is_request_error: bool = False
    new_logprobs: list[PositionLogprobs] | None = None  # new_token_ids' logprobs, when asked for
    # In its first output: its prompt's ids, and their logprobs when asked for.
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
