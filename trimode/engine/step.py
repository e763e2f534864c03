"""One engine step's model forward over several batches ("parts"), and what follows it: each part's
accept, the step's one host transfer, and each part's update.

It owns each pass's KV transaction, in this order: the forward begins it (the runner's
`KVCache.begin`: the pass's K/V go to scratch slots); after the accept and the host read, the part's
`Emission.keep` is committed (`KVCache.commit`: those tokens join the rows' prefixes, the rest stay
scratch); a forward that fails is discarded for every part (nothing of it joins). Decoders never
touch the transaction; they only say what to keep."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trimode.decoding.base import DecodeBatch, Emission, HostEmission, transfer
from trimode.engine.model_runner import ModelRunner
from trimode.forward import Forward
from trimode.outputs import RequestOutput


@dataclass
class StepPart:
    """One batch's share of a step's forward: what it feeds, how its logits are accepted (into what
    the step's host transfer carries for it), and how its requests are updated from what they
    emitted, or failed."""

    batch: DecodeBatch
    forward: Forward
    accept: Callable[[torch.Tensor], Emission | None]
    # The tokens each row emitted (None: the accept left nothing), and the host copy they were
    # read from, whose logprob entries go with them.
    finish: Callable[[list[list[int]] | None, HostEmission | None], list[RequestOutput]]
    fail: Callable[[Exception], list[RequestOutput]]
    group: tuple | None = None  # the running group it decodes, if any


def run_parts(runner: ModelRunner, parts: list[StepPart]) -> tuple[list[RequestOutput], float]:
    """One model forward for `parts`; returns their outputs and the forward's seconds. An accept or
    update that raises fails its own part; what the forward raises propagates, before any part has
    changed (each has only written its scratch KV slots). Parts are updated last to first, so a
    lead's newcomers join a group that rode with it only after that group took its own tokens."""
    try:
        logits, seconds = runner.execute([(p.batch.kv, p.forward, p.batch.timings) for p in parts])
    except Exception:
        for p in parts:  # nothing of the pass joins any prefix
            p.batch.kv.discard()
        raise
    for p in parts:  # every row took part in this forward
        p.batch.num_forwards = [n + 1 for n in p.batch.num_forwards]
    outputs, accepted = [], []
    for p, part_logits in zip(parts, logits):
        try:
            accepted.append((p, p.accept(part_logits)))
        except Exception as e:
            outputs += p.fail(e)
    host = iter(transfer([em for _, em in accepted if em is not None]))
    copies = [None if em is None else next(host) for _, em in accepted]
    for (p, em), h in reversed(list(zip(accepted, copies))):
        try:
            if em is None or h is None:  # nothing for the host: the whole pass joins the prefixes
                p.batch.kv.commit()
                outputs += p.finish(None, None)
                continue
            emitted = em.read(h.values)
            p.batch.kv.commit(em.keep(emitted), em.keep_scratch)
            outputs += p.finish(emitted, h)
        except Exception as e:
            outputs += p.fail(e)
    return outputs, seconds
