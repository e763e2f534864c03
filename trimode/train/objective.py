"""The joint objective L = L_AR + alpha * L_diff on one doubled-sequence forward (design doc section 7).

Returns sums and counts rather than means so the trainer can average over the global number of
tokens of a whole (gradient-accumulated) batch, not per micro-batch or per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trimode.model.transformer import ForwardContext, Transformer
from trimode.train.masking import sbd_attention_mask


@dataclass
class LossSums:
    ar: torch.Tensor  # sum of next-token cross-entropies on the clean half
    num_ar: int  # loss-eligible next-token targets
    diff: torch.Tensor  # sum over masked positions of cross-entropy / p_mask (zero in AR-only steps)
    num_diff: int  # loss-eligible positions (masked or not): the 1/p weighting makes this the mean


def ar_loss_sums(model: Transformer, x0: torch.Tensor, eligible: torch.Tensor) -> LossSums:
    """AR-only (stage one): a causal pass over the clean sequence alone."""
    n, length = x0.shape
    mask = torch.ones(length, length, dtype=torch.bool, device=x0.device).tril()
    positions = torch.arange(length, device=x0.device).expand(n, -1)
    logits = model(x0, ForwardContext(positions=positions, mask=mask[None, None]))
    return _with_ar(logits, x0, eligible, torch.zeros((), device=x0.device), 0)


def joint_loss_sums(
    model: Transformer,
    x0: torch.Tensor,
    eligible: torch.Tensor,
    is_masked: torch.Tensor,
    p_mask: torch.Tensor,
    mask_id: int,
    block_size: int,
) -> LossSums:
    """x0, eligible, is_masked, p_mask: (N, L). One forward over [x_t | x_0], positions 0..L-1 twice."""
    n, length = x0.shape
    xt = torch.where(is_masked, torch.full_like(x0, mask_id), x0)
    positions = torch.arange(length, device=x0.device).repeat(2).expand(n, -1)
    mask = sbd_attention_mask(length, block_size, x0.device)[None, None]
    logits = model(torch.cat([xt, x0], 1), ForwardContext(positions=positions, mask=mask))
    # Noisy half: a masked position predicts its own clean token (no shift), weighted 1 / p_mask.
    ce = F.cross_entropy(logits[:, :length].transpose(1, 2), x0, reduction="none")
    diff = (ce * is_masked / p_mask).sum()
    return _with_ar(logits[:, length:], x0, eligible, diff, int(eligible.sum()))


def _with_ar(
    clean_logits: torch.Tensor, x0: torch.Tensor, eligible: torch.Tensor, diff: torch.Tensor, num_diff: int
) -> LossSums:
    # Clean half: position i predicts token i + 1 (shifted), where the target is loss-eligible.
    target_ok = eligible[:, 1:]
    ce = F.cross_entropy(clean_logits[:, :-1].transpose(1, 2), x0[:, 1:], reduction="none")
    return LossSums(ar=(ce * target_ok).sum(), num_ar=int(target_ok.sum()), diff=diff, num_diff=num_diff)
