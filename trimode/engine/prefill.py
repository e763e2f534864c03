"""The prefill, the step every request starts with, in the decoders' plan/accept shape: the one
causal forward that feeds newcomers' contexts together (with the masks a self-spec row drafts its
first block from), or one chunk of a long context; then each row's first token, the prompt's
logprobs when asked for, and the prefix offered to later requests."""

from __future__ import annotations

import torch

from trimode import logit_controls
from trimode.decoding.base import DecodeBatch, Emission, keep_counts, logprob_table
from trimode.engine.model_runner import ModelRunner
from trimode.engine.request import Request, set_remaining
from trimode.forward import Forward
from trimode.kv_cache import KVCache, KVPool
from trimode.sampler import Sampler, new_stream
from trimode.sampling_params import MAX_LOGPROBS


def new_batch(runner: ModelRunner, pool: KVPool, requests: list[Request], eos_ids: set[int]) -> DecodeBatch:
    """An empty batch for `requests` over `pool`; each row starts with its context's cached prefix."""
    device = runner.device
    params = [r.params for r in requests]
    kv = KVCache(pool)
    streams = []  # each row's random numbers, kept by its request across preemption
    for r in requests:
        # A prompt to score is fed whole: cached prefix pages would skip its positions.
        kv.add_row([] if r.wants_prompt_logprobs else r.context_ids)
        r.stream = stream = r.stream or new_stream(r.params)
        streams.append(stream)
    batch = DecodeBatch(
        kv=kv,
        sampler=Sampler.of(params, device, streams),
        seeds=torch.zeros(len(requests), dtype=torch.long, device=device),
        remaining=torch.zeros(len(requests), dtype=torch.long, device=device),  # set_remaining, below
        eos_ids=torch.tensor(sorted(eos_ids), device=device),
        stop_on_eos=torch.tensor([not sp.ignore_eos for sp in params], device=device),
        mask_id=runner.config.mask_token_id,
        num_forwards=[0] * len(requests),
        stats=[r.stats for r in requests],
        logprobs=[r.params.logprobs for r in requests],
        grammar=[r.grammar for r in requests],
        controls=logit_controls.start(
            params,
            [r.prompt_ids for r in requests],
            [r.token_ids for r in requests],
            eos_ids,
            runner.config.vocab_size,
            device,
        ),
    )
    set_remaining(batch, requests)
    return batch


def plan_prefill(
    runner: ModelRunner, pool: KVPool, requests: list[Request], eos_ids: set[int]
) -> tuple[DecodeBatch, Forward]:
    """A new batch for `requests` and the one causal forward that prefills them together: each row
    feeds its context past its cached prefix, right-padded (pad slots lie past the row's length and
    stay invisible), then the masks its decoder drafts its first block from (`Decoder.prefill_tail`:
    bidirectional among themselves, draft LoRA on, scratch like a pad)."""
    batch = new_batch(runner, pool, requests, eos_ids)
    starts = list(batch.kv.lengths)  # cached prefixes are not fed again
    todo = [len(r.context_ids) - n for r, n in zip(requests, starts)]
    tails = [r.prefill_tail for r in requests]
    fed = [t + k for t, k in zip(todo, tails)]
    width = max(fed)
    padded = torch.zeros(len(requests), width, dtype=torch.long)
    for i, (r, n) in enumerate(zip(requests, starts)):
        padded[i, : todo[i]] = torch.tensor(r.context_ids[n:])
        padded[i, todo[i] : fed[i]] = runner.config.mask_token_id
    # Scoring a prompt wants the logits of every fed position; otherwise the last one's (and the
    # drafting masks': `tail_index`).
    logit_index = None if any(r.wants_prompt_logprobs for r in requests) else tail_index(todo, tails)
    fwd = Forward("prefill", padded, True, logit_index=logit_index, num_fed=fed)
    if any(tails):
        pattern = torch.ones(width, width, dtype=torch.bool).tril().repeat(len(requests), 1, 1)
        lora = torch.zeros(len(requests), width, dtype=torch.bool)
        for i, (t, k) in enumerate(zip(todo, tails)):
            pattern[i, t : t + k, t : t + k] = lora[i, t : t + k] = True
        fwd.pattern, fwd.use_draft_lora = pattern, lora
    for name in ("tokens", "logit_index", "pattern", "use_draft_lora"):
        value = getattr(fwd, name)
        if isinstance(value, torch.Tensor):
            setattr(fwd, name, value.to(runner.device))
    return batch, fwd


def tail_index(todo: list[int], tails: list[int]) -> torch.Tensor:
    """Per row, the prefill positions whose logits are wanted: its last context token's, then
    those of its drafting masks after the first (which sits at the seed's position); (B,) without
    masks, else (B, K), rows with fewer repeating their last context position."""
    if not any(tails):
        return torch.tensor(todo) - 1
    k = max(tails)
    return torch.tensor([[t - 1] + [t + j if j < n else t - 1 for j in range(1, k)] for t, n in zip(todo, tails)])


def accept_prefill(batch: DecodeBatch, requests: list[Request], fwd: Forward, logits: torch.Tensor) -> Emission:
    """Each row's first token, and the logits its decoder drafts from (`DecodeBatch.prefill_drafts`);
    the emission keeps each row's context past its cached prefix, and none of its drafting masks
    or right padding (`offer_prefixes` then offers the prefixes to later requests)."""
    contexts = [r.context_ids for r in requests]
    starts = list(batch.kv.lengths)
    todo = [len(c) - n for c, n in zip(contexts, starts)]
    if fwd.logit_index is not None:
        if logits.shape[1] > 1:
            batch.prefill_drafts = logits[:, 1:]
        return first_tokens(batch, requests, todo, logits[:, :1])
    wanted = tail_index(todo, [f - t for f, t in zip(fwd.num_fed or todo, todo)]).to(logits.device)
    rows = torch.arange(len(requests), device=logits.device)
    if wanted.dim() == 2:
        batch.prefill_drafts = logits[rows[:, None], wanted[:, 1:]]
        wanted = wanted[:, 0]
    targets = [c[n + 1 : n + 1 + t] for c, n, t in zip(contexts, starts, todo)]
    return first_tokens(batch, requests, todo, logits[rows, wanted][:, None], logits, targets)


def offer_prefixes(batch: DecodeBatch, requests: list[Request]) -> None:
    """After a prefill's (or its last chunk's) commit: each row's context, now its prefix, is
    offered to later requests (prefix caching)."""
    for row, r in enumerate(requests):
        batch.kv.register_prefix(row, r.context_ids)


def plan_chunk(runner: ModelRunner, batch: DecodeBatch, request: Request, max_tokens: int) -> Forward:
    """The forward that feeds the next (at most `max_tokens`) context tokens of a one-row batch."""
    done = batch.kv.lengths[0]
    chunk = request.context_ids[done : done + max_tokens]
    logit_index = None if request.wants_prompt_logprobs else torch.tensor([len(chunk) - 1], device=runner.device)
    return Forward("prefill", torch.tensor([chunk], device=runner.device), True, logit_index=logit_index)


def accept_chunk(batch: DecodeBatch, request: Request, fwd: Forward, logits: torch.Tensor) -> Emission | None:
    """The chunk joins the prefix (the step commits all of it); once the whole context is in, the
    row's first token (else None, or only the chunk's prompt entries when the prompt is scored)."""
    start = batch.kv.lengths[0]
    context = request.context_ids
    scored = request.wants_prompt_logprobs  # then `plan_chunk` asked for every position's logits
    targets = [context[start + 1 : start + 1 + logits.shape[1]]] if scored else None
    if start + fwd.tokens.shape[1] < len(context):
        if targets is None:
            return None
        table = prompt_table(logits, targets)
        return Emission(logits.new_zeros(1, 0, dtype=torch.long), lambda rows: [], prompt_logprobs=table)
    return first_tokens(batch, [request], [fwd.tokens.shape[1]], logits[:, -1:], logits if scored else None, targets)


def prompt_table(logits: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """`logprob_table` of every fed position (B, T, V) for the context token it predicts (rows'
    `targets`, right-padded: a row's last position predicts no context token)."""
    b, t, _ = logits.shape
    ids = torch.zeros(b, t, dtype=torch.long)
    for i, row in enumerate(targets):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return logprob_table(logits.float().log_softmax(-1), ids.to(logits.device), MAX_LOGPROBS)


def first_tokens(
    batch: DecodeBatch,
    requests: list[Request],
    fed: list[int],
    logits: torch.Tensor,
    every: torch.Tensor | None = None,
    targets: list[list[int]] | None = None,
) -> Emission:
    """After a prefill: each row's seed is what it picked from its last position's `logits`
    (B, 1, V), emitted as its first token, or for a resumed request the seed it had (already emitted
    before its preemption). The emission keeps each row's `fed` context tokens (not its drafting
    masks or right padding) and no scratch: its next pass, a decoder's, has another width. `every`
    (B, T, V): the logits of every fed position, when a prompt is scored against `targets`."""
    known = [r.resume_seed for r in requests]
    # A resumed row knows its seed and draws nothing: its random stream stays where its preemption
    # left it, so a sampled request resumes with the numbers it would have drawn anyway.
    drawing = [i for i, s in enumerate(known) if s is None]
    picked = batch.sampler.pick(batch.controlled(logits), drawing if len(drawing) < len(known) else None)[:, 0]
    if any(s is not None for s in known):
        fill = torch.tensor([-1 if s is None else s for s in known], device=picked.device)
        picked = torch.where(fill >= 0, fill, picked)
    batch.seeds = picked
    return Emission(
        picked[:, None],
        lambda rows: [row if s is None else [] for row, s in zip(rows, known)],
        batch.logprobs_of(logits, picked[:, None]),
        None if every is None or targets is None else prompt_table(every, targets),
        keep=keep_counts(fed),
        keep_scratch=False,
    )
