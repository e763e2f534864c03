"""Slow, obviously-correct references: no KV cache, the whole sequence recomputed every pass."""

from __future__ import annotations

import torch

from trimode.model.transformer import ForwardContext, Transformer


def full_forward(model: Transformer, seq: list[int], bidirectional_tail: int = 0) -> torch.Tensor:
    """Logits (T, V) for `seq` with causal attention, except that the last `bidirectional_tail`
    positions see each other (and the whole prefix) bidirectionally."""
    t = len(seq)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    if bidirectional_tail:
        mask[t - bidirectional_tail :, t - bidirectional_tail :] = True
    ctx = ForwardContext(positions=torch.arange(t)[None], mask=mask[None, None])
    with torch.inference_mode():
        return model(torch.tensor([seq]), ctx)[0]


def diffusion_greedy(
    model: Transformer, prompt: list[int], max_tokens: int, block_length: int, threshold: float | None, mask_id: int
) -> tuple[list[int], list[int]]:
    """Block diffusion at temperature 0, batch 1, ignoring EOS. Returns (tokens, passes per block).
    NVIDIA's rule: confidence is the full softmax's probability ([MASK] included) and a position is
    revealed when it is the most confident or its confidence >= threshold; [MASK] is no candidate."""
    seq = list(prompt)
    seed = int(full_forward(model, seq)[-1].argmax())
    out, passes = [seed], []
    while len(out) < max_tokens:
        budget = max_tokens - len(out)
        block = [seed] + [mask_id] * (block_length - 1)
        masked = [False] + [True] * (block_length - 1)
        n = 0
        while any(masked[1 : budget + 1]):
            probs = torch.softmax(full_forward(model, seq + block, bidirectional_tail=block_length)[-block_length:], -1)
            probs[:, mask_id] = -1.0  # not a candidate, but its mass stays in the normaliser
            conf, cand = probs.max(-1)
            best = max((i for i in range(block_length) if masked[i]), key=lambda i: conf[i].item())
            for i in range(block_length):
                if masked[i] and (i == best or (threshold is not None and conf[i].item() >= threshold)):
                    block[i], masked[i] = int(cand[i]), False
            n += 1
        passes.append(n)
        out += block[1:]
        seq += block
        if len(out) < max_tokens:
            seed = int(full_forward(model, seq)[-1].argmax())
            out.append(seed)
    return out[:max_tokens], passes
