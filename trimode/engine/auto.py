"""`mode="auto"`: which exact decoding an auto row runs next, from what this engine measures.

Every exact decoding (`decoding.EXACT_DECODINGS`: AR, linear self-spec at b 4..32, quadratic at b
2..8) emits AR's tokens, so a row may move between them at any cycle boundary (its KV prefix is
AR's in all of them) and the choice is only about speed. The expected rate of running the auto rows
as decoding d is

    rows x tokens per cycle (d)  /  (forwards per cycle (d) x seconds of a pass of rows x width (d) tokens)

(all rows in one group: a wider pass slows every row in it). What it needs is measured:
- `PassCosts`: seconds of a forward by the tokens it feeds, from every forward the engine runs,
  seeded by a calibration of a few forwards when the first auto request arrives (printed);
- tokens per cycle per decoding: an exponential average over the cycles auto rows ran, seeded with
  an optimistic prior (half the drafts accepted) so each decoding gets tried, and measured after;
- the share of time that steps prefilling arriving requests take, and how many there are: every
  decoding waits for them, but AR rows ride in them (a token each), which under a server's
  arrivals favours AR.
All of it belongs to the model runner, so every engine over it (each `LLM.generate` call, a server's
engine) starts from what the ones before it measured.
"""

from __future__ import annotations

import bisect
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Choice = tuple[str, int, str]  # (mode, block length, spec): decoding.EXACT_DECODINGS or LOSSY_DECODINGS
SMOOTHING = 0.2  # weight of the newest forward's seconds in `PassCosts`' averages
# Weight of one row's cycle in a decoding's tokens-per-cycle average: a batch of 64 rows updates it
# 64 times a step, and a cycle cut short by its row's end is one observation among many.
ACCEPTANCE_SMOOTHING = 0.05
STEP_DECAY = 0.99  # per step: the weight the steps before keep in the prefill share (~100 steps)
# Rows move off their decoding only for one expected to be this much faster: a move costs a draft
# (linear: a draft pass emits nothing; quadratic: its first pass accepts nothing), and estimates
# this close are within their noise.
SWITCH_MARGIN = 0.1


def forwards_per_cycle(choice: Choice) -> int:
    """Linear self-spec drafts and verifies in two forwards; AR and quadratic take one. A
    diffusion cycle is one denoising pass (its tokens per cycle: those it reveals per pass)."""
    mode, block, spec = choice
    return 2 if mode == "selfspec" and spec == "linear" and block > 1 else 1


def width(choice: Choice) -> int:
    """Tokens a row feeds per pass."""
    mode, block, spec = choice
    if mode == "ar":
        return 1
    return block * (block + 1) if spec == "quadratic" and mode == "selfspec" else block


def prior_tokens_per_cycle(choice: Choice) -> float:
    """Before any cycle of `choice` ran: half its drafts accepted, plus the verifier's token
    (diffusion: a quarter of its block revealed per pass)."""
    mode, block, _ = choice
    if mode == "diffusion":
        return block / 4
    return 1.0 if mode == "ar" else 1.0 + (block - 1) / 2


@dataclass
class PassCosts:
    """Seconds of one forward by the tokens it feeds: an exponential average per power-of-two
    bucket of tokens, interpolated between buckets (linearly in tokens) and extrapolated past the
    largest at its per-token cost."""

    seconds: dict[int, float] = field(default_factory=dict)  # bucket (tokens, a power of two) -> seconds

    def observe(self, tokens: int, seconds: float) -> None:
        """A forward of `tokens` took `seconds`: it updates the nearest power of two (in log scale)."""
        bucket = 1 << round(math.log2(max(tokens, 1)))
        old = self.seconds.get(bucket)
        self.seconds[bucket] = seconds if old is None else (1 - SMOOTHING) * old + SMOOTHING * seconds

    def __call__(self, tokens: int) -> float:
        if not self.seconds:
            raise ValueError("no forward has been timed yet: calibrate first")
        buckets = sorted(self.seconds)
        if tokens <= buckets[0]:
            return self.seconds[buckets[0]]
        if tokens >= buckets[-1]:
            return self.seconds[buckets[-1]] * tokens / buckets[-1]
        i = bisect.bisect_left(buckets, tokens)
        lo, hi = buckets[i - 1], buckets[i]
        share = (tokens - lo) / (hi - lo)
        return self.seconds[lo] + share * (self.seconds[hi] - self.seconds[lo])

    def calibrate(self, forward: Callable[[int], None], sizes: tuple[int, ...]) -> None:
        """Time `forward(tokens)` at each size (best of three, after one warm-up), once, and say so."""
        began = time.perf_counter()
        for tokens in sizes:
            forward(tokens)
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                forward(tokens)
                runs.append(time.perf_counter() - start)
            self.seconds[tokens] = min(runs)
        figures = ", ".join(f"{n} tokens {1e3 * self.seconds[n]:.1f} ms" for n in sizes)
        print(f"trimode: auto mode timed forwards ({figures}) in {time.perf_counter() - began:.1f} s", file=sys.stderr)


@dataclass
class AutoPolicy:
    """Picks the decoding of an engine's auto rows, and learns from what they ran."""

    choices: tuple[Choice, ...]
    costs: PassCosts
    tokens_per_cycle: dict[Choice, float] = field(default_factory=dict)
    lossy: tuple[Choice, ...] = ()  # also open to rows that opted in (`SamplingParams.auto_lossy`)
    # Decayed sums over the engine's recent steps: steps a prefill led, their seconds, all seconds.
    prefill_steps: float = 0.0
    prefill_seconds: float = 0.0
    step_seconds: float = 0.0

    def expected_rate(
        self, choice: Choice, rows: int, pass_tokens: int | None = None, left: Sequence[int] = ()
    ) -> float:
        """Tokens per second of `rows` auto rows all decoding as `choice`, in groups of at most
        `pass_tokens` tokens a pass (the engine's step budget), each group its own passes. `left`:
        each row's tokens left in its budget, which no cycle emits more than (rows near their end
        gain nothing from a long block, and a move's first cycle may be their last).

        Prefill steps of arriving requests take their share of the time whatever the auto rows
        run (arrivals set it, not the decoding), and AR rows ride in them, a token each:
            rate = (1 - prefill time share) x rows x tokens per cycle / seconds per cycle
                   (+ rows x prefill steps per second, for AR)."""
        per_cycle = self.tokens_per_cycle.get(choice, prior_tokens_per_cycle(choice))
        if left:
            per_cycle = sum(min(per_cycle, n) for n in left) / len(left)
        per_group = rows if pass_tokens is None else max(1, min(rows, pass_tokens // width(choice)))
        seconds = forwards_per_cycle(choice) * -(-rows // per_group) * self.costs(per_group * width(choice))
        if seconds <= 0:
            return math.inf
        share, rides = 0.0, 0.0
        if self.step_seconds > 0:
            share = self.prefill_seconds / self.step_seconds
            rides = self.prefill_steps / self.step_seconds if width(choice) == 1 else 0.0
        return (1 - share) * rows * per_cycle / seconds + rides * rows

    def step(self, prefill: bool, seconds: float) -> None:
        """The engine ran a step of `seconds`, led by a prefill or not."""
        self.prefill_steps = STEP_DECAY * self.prefill_steps + prefill
        self.prefill_seconds = STEP_DECAY * self.prefill_seconds + prefill * seconds
        self.step_seconds = STEP_DECAY * self.step_seconds + seconds

    def choose(
        self,
        rows: int,
        current: Choice | None = None,
        pass_tokens: int | None = None,
        lossy: bool = False,
        left: Sequence[int] = (),
    ) -> Choice:
        """The decoding with the most expected tokens per second for `rows` auto rows (`lossy`: rows
        that may also run the lossy decodings; `left`: their tokens left, as `expected_rate`);
        `current` (what they run now) unless the best is SWITCH_MARGIN faster."""
        rows = max(rows, 1)

        def rate(c: Choice) -> float:
            return self.expected_rate(c, rows, pass_tokens, left)

        best = max(self.choices + self.lossy * lossy, key=rate)
        if current is not None and rate(best) <= (1 + SWITCH_MARGIN) * rate(current):
            return current
        return best

    def cycles(self, choice: Choice, tokens: list[int]) -> None:
        """Rows decoding as `choice` ran a pass and emitted `tokens` (one count a row, 0 for none):
        the average moves as far as that many one-row updates would, towards their mean. A
        diffusion cycle is a pass, so its rows count 0 until their block is done; a self-spec
        cycle ends in the pass that emits (a linear draft pass emits nothing). An AR cycle always
        emits one token, so AR has nothing to learn."""
        if choice[0] != "diffusion":
            tokens = [n for n in tokens if n]
        if not tokens or choice[0] == "ar":
            return
        old = self.tokens_per_cycle.get(choice, prior_tokens_per_cycle(choice))
        keep = (1 - ACCEPTANCE_SMOOTHING) ** len(tokens)
        self.tokens_per_cycle[choice] = keep * old + (1 - keep) * sum(tokens) / len(tokens)
