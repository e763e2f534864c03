"""Slow, obviously-correct references: no KV cache, the whole sequence recomputed every pass."""

from __future__ import annotations

import torch

from trimode.model.transformer import ForwardContext, Transformer


def full_forward(
    model: Transformer, seq: list[int], bidirectional_tail: int = 0, use_draft_lora: bool = False
) -> torch.Tensor:
    """Logits (T, V) for `seq` with causal attention, except that the last `bidirectional_tail`
    positions see each other (and the whole prefix) bidirectionally. `use_draft_lora` applies the
    draft LoRA to those tail positions only: the prefix is the clean causal prefix a cache holds."""
    t = len(seq)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    if bidirectional_tail:
        mask[t - bidirectional_tail :, t - bidirectional_tail :] = True
    lora = torch.zeros(1, t, dtype=torch.bool)
    lora[:, t - bidirectional_tail :] = use_draft_lora and bidirectional_tail > 0
    ctx = ForwardContext(positions=torch.arange(t)[None], mask=mask[None, None], use_draft_lora=lora)
    with torch.inference_mode():
        return model(torch.tensor([seq]), ctx)[0]


def diffusion_greedy(
    model: Transformer, prompt: list[int], max_tokens: int, block_length: int, threshold: float | None, mask_id: int
) -> tuple[list[int], list[int], list[float]]:
    """Block diffusion at temperature 0, batch 1, ignoring EOS. Returns (tokens, passes per block,
    each token's log-probability: a seed's from its causal pass, a revealed token's from the pass
    that revealed it). NVIDIA's rule: confidence is the full softmax's probability ([MASK]
    included) and a position is revealed when it is the most confident or its confidence >=
    threshold; [MASK] is no candidate."""
    seq = list(prompt)
    last = full_forward(model, seq)[-1].log_softmax(-1)
    seed = int(last.argmax())
    out, passes, logprobs = [seed], [], [last[seed].item()]
    while len(out) < max_tokens:
        budget = max_tokens - len(out)
        block = [seed] + [mask_id] * (block_length - 1)
        masked = [False] + [True] * (block_length - 1)
        revealed_at = [0.0] * block_length
        n = 0
        while any(masked[1 : budget + 1]):
            probs = torch.softmax(full_forward(model, seq + block, bidirectional_tail=block_length)[-block_length:], -1)
            probs[:, mask_id] = -1.0  # not a candidate, but its mass stays in the normaliser
            conf, cand = probs.max(-1)
            best = max((i for i in range(block_length) if masked[i]), key=lambda i: conf[i].item())
            for i in range(block_length):
                if masked[i] and (i == best or (threshold is not None and conf[i].item() >= threshold)):
                    block[i], masked[i], revealed_at[i] = int(cand[i]), False, conf[i].log().item()
            n += 1
        passes.append(n)
        out += block[1:]
        logprobs += revealed_at[1:]
        seq += block
        if len(out) < max_tokens:
            last = full_forward(model, seq)[-1].log_softmax(-1)
            seed = int(last.argmax())
            out.append(seed)
            logprobs.append(last[seed].item())
    return out[:max_tokens], passes, logprobs[:max_tokens]


def ar_greedy(model: Transformer, prompt: list[int], max_tokens: int) -> list[int]:
    """AR at temperature 0 with no cache: the whole sequence recomputed for every token."""
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(int(full_forward(model, seq)[-1].argmax()))
    return seq[len(prompt) :]


def selfspec_greedy(
    model: Transformer, prompt: list[int], max_tokens: int, block_length: int, mask_id: int
) -> tuple[list[int], list[int]]:
    """Linear self-speculation at temperature 0, no cache. Each cycle drafts with one bidirectional
    forward over [seed, MASK x (b-1)] with the draft LoRA on, verifies with one causal forward over
    [seed, drafts], keeps the agreeing drafts (within the budget) plus one bonus token. Returns
    (tokens, tokens per cycle)."""
    seq = list(prompt)
    seed = int(full_forward(model, seq)[-1].argmax())
    out, cycles = [seed], []
    while len(out) < max_tokens:
        block = [seed] + [mask_id] * (block_length - 1)
        draft_logits = full_forward(model, seq + block, bidirectional_tail=block_length, use_draft_lora=True)
        draft_logits = draft_logits[-block_length + 1 :].clone()
        draft_logits[:, mask_id] = float("-inf")
        drafts = draft_logits.argmax(-1).tolist()
        target = full_forward(model, seq + [seed] + drafts)[-block_length:].argmax(-1).tolist()
        n = 0
        while n < block_length - 1 and drafts[n] == target[n] and n < max_tokens - len(out) - 1:
            n += 1
        emitted = drafts[:n] + [target[n]]
        cycles.append(len(emitted))
        seq += [seed] + drafts[:n]
        seed = target[n]
        out += emitted
    return out[:max_tokens], cycles


def quadratic_greedy(
    model: Transformer, prompt: list[int], max_tokens: int, block_length: int, mask_id: int, blind: bool = False
) -> tuple[list[int], list[int]]:
    """Quadratic self-speculation at temperature 0, no cache: every pass recomputes the accepted
    sequence (causal) followed by the chain [seed, drafts] (causal, after the sequence) and, for
    each g, b masks at positions after chain token g that see the sequence, chain 0..g and each
    other, with the draft LoRA on. Keeps the agreeing drafts (within the budget) and the verifier's
    bonus; the next drafts are the group of the accepted length's predictions after its first mask.
    The first drafts come from the prompt's forward with b masks after it (NVIDIA's reference), or,
    `blind`, the first pass's drafts are masks and none is accepted. Returns (tokens, tokens per cycle)."""
    b = block_length
    seq = list(prompt)
    first = full_forward(model, seq + [mask_id] * b, bidirectional_tail=b, use_draft_lora=True).clone()
    seed = int(first[len(seq) - 1].argmax())
    first[:, mask_id] = float("-inf")
    out, cycles, drafts = [seed], [], None if blind else first[len(seq) + 1 :].argmax(-1).tolist()
    while len(out) < max_tokens:
        chain = [seed] + (drafts or [mask_id] * (b - 1))
        n = len(seq)
        tokens = seq + chain + [mask_id] * (b * b)
        positions = list(range(n + b)) + [n + g + 1 + m for g in range(b) for m in range(b)]
        mask = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
        for i in range(n + b):
            mask[i, : i + 1] = True
        for g in range(b):
            group = n + b + g * b
            mask[group : group + b, : n + g + 1] = True
            mask[group : group + b, group : group + b] = True
        lora = torch.zeros(1, len(tokens), dtype=torch.bool)
        lora[:, n + b :] = True
        ctx = ForwardContext(positions=torch.tensor([positions]), mask=mask[None, None], use_draft_lora=lora)
        with torch.inference_mode():
            logits = model(torch.tensor([tokens]), ctx)[0]
        target = logits[n : n + b].argmax(-1).tolist()
        accepted = 0
        while (
            drafts
            and accepted < b - 1
            and drafts[accepted] == target[accepted]
            and accepted < max_tokens - len(out) - 1
        ):
            accepted += 1
        emitted = chain[1 : 1 + accepted] + [target[accepted]]
        group_logits = logits[n + b + accepted * b : n + b + (accepted + 1) * b].clone()
        group_logits[:, mask_id] = float("-inf")
        drafts = group_logits[1:].argmax(-1).tolist()
        cycles.append(len(emitted))
        seq += chain[: accepted + 1]
        seed = target[accepted]
        out += emitted
    return out[:max_tokens], cycles
