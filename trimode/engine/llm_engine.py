"""LLMEngine: requests arrive and leave at any time; every mode runs in the same engine, and
`LLM.generate` is this engine stepped to completion.

Continuous batching: each step is one model forward, and returns what each request newly
committed. Its lead is a prefill (newcomers together, within `max_num_batched_tokens` prompt tokens;
a longer prompt a chunk at a time) or one running group's pass (`Groups`: requests of one mode and
block shape share a decode batch, at most a step's token budget of rows). Groups whose pass feeds
one token per row (AR) ride in every step's forward beside the lead (`trimode.engine.step`), and
block-mode groups beside a pass while the step's block tokens fit its budget: the dense layers run
over all parts' tokens at once and attention per part, so an AR row beside block-mode rows or a
prefill gets a token every step for a few percent of that forward's work. Different block shapes
stay separate parts, never padded to the widest pass. Mode-auto rows move between exact decodings
at cycle boundaries as the scheduler plans (`StepPlan.moves`). Decoders treat rows
independently, so a request decodes exactly as it would alone (temperature 0; and with the same seed
at temperature > 0), whatever else is running or riding.

KV memory is one pool of pages, allocated here (`KVPool`); every batch holds page tables into it.
Finished and aborted requests leave their group at once and their pages return. A step that needs
pages the pool lacks first preempts the most recently arrived requests, which wait at the head of
the queue and resume by recomputing their prompt and output (`Request.preempt`).

A failure while serving a request fails that request, not its neighbours: a forward that raises
with riders is run again without them; a prefill that raises is retried one newcomer at a time (it
builds fresh batches, so nothing running has changed), and only the newcomers that fail alone are
finished with an error. A decode pass that raises fails the group it ran (its batch state may be
half-updated); the other groups go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from trimode.config import EngineConfig
from trimode.decoding import (
    EXACT_DECODINGS,
    LOSSY_DECODINGS,
    Decoder,
    batch_key,
    choice_of,
    decoding,
    decoding_name,
    make_decoder,
)
from trimode.decoding.base import DecodeBatch, HostEmission
from trimode.engine.auto import AutoPolicy, PassCosts
from trimode.engine.groups import Groups
from trimode.engine.inputs import Message, PromptInput, check_fits, tokenize_prompt
from trimode.engine.model_runner import ModelRunner
from trimode.engine.prefill import accept_chunk, accept_prefill, new_batch, offer_prefixes, plan_chunk, plan_prefill
from trimode.engine.request import Request, apply_step, record_prompt_logprobs, streamable_text
from trimode.engine.scheduler import PoolPages, Prefilling, RunningGroup, Scheduler, StepPlan
from trimode.engine.step import StepPart, run_parts
from trimode.kv_cache import KVCache
from trimode.outputs import RequestOutput
from trimode.sampling_params import SamplingParams, Spec
from trimode.structured import Grammars
from trimode.tokenizer import Tokenizer

logger = logging.getLogger("trimode.engine")
CALIBRATION_SIZES = (1, 8, 32, 128, 512)  # tokens of the forwards mode auto times when it starts


@dataclass
class _Chunked:
    """A prompt longer than one prefill step, in its own one-row batch until its prefill is done."""

    request: Request
    batch: DecodeBatch


def _decodings(requests: list[Request], choice: tuple[str, int, str]) -> list[SamplingParams]:
    """Each auto request's params decoded as `choice`, made once per params object (an offline
    batch shares one)."""
    made: dict[int, SamplingParams] = {}
    for req in requests:
        if id(req.params) not in made:
            made[id(req.params)] = decoding(req.params, choice)
    return [made[id(r.params)] for r in requests]


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        eos_token_ids: set[int],
        max_model_len: int,
        config: EngineConfig = EngineConfig(),
        training_seq_len: int | None = None,
    ) -> None:
        """`config`: the engine's sizes (its queue, batch, KV pool and token budgets).
        `training_seq_len`: the longest sequence the model was trained on, where its checkpoint says
        (a request that may run past it is served, with one warning per engine: positions up to
        max_model_len work, but answers there are the model's extrapolation)."""
        self.config = config
        self.scheduler = Scheduler(config)
        self.pool = runner.new_pool(config.kv_cache_tokens, config.page_size)  # all the KV memory it will use
        self.num_preemptions = 0
        logger.info(
            "KV cache: %d pages of %d slots (%d tokens), %.1f MiB",
            self.pool.num_pages,
            config.page_size,
            self.pool.num_tokens,
            self.pool.num_bytes / 2**20,
        )
        runner.capture_graphs(config.max_batch, min(max_model_len, self.pool.num_tokens))
        self._grammars = Grammars(tokenizer, runner.config.vocab_size, eos_token_ids)
        self.runner, self.tokenizer, self.eos_token_ids = runner, tokenizer, eos_token_ids
        self.max_model_len = max_model_len
        self.training_seq_len, self._warned_past_training = training_seq_len, False
        self._chunked: list[_Chunked] = []  # long prompts being prefilled a chunk per prefill step
        self.groups = Groups()
        self._sent: dict[str, tuple[int, int]] = {}  # request id -> (tokens, characters) already returned
        self._ids: set[str] = set()

    @property
    def num_running(self) -> int:
        return len(self.running())

    def running(self) -> list[Request]:
        return [r for g in self.groups.values() for r in g.requests] + [c.request for c in self._chunked]

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_kv_slots_allocated(self) -> int:
        """KV slots in pages some request holds (shared prefix pages count once)."""
        return self.pool.num_used_pages * self.pool.page_size

    def has_unfinished_requests(self) -> bool:
        return bool(self.num_running or self.num_waiting)

    def add_request(
        self,
        request_id: str,
        prompt: PromptInput | list[Message],
        params: SamplingParams,
        parent_id: str | None = None,
    ) -> None:
        """Validate and queue; raises ValueError for bad input and QueueFull when the queue is full.
        `parent_id`: the client request it is one sample or prompt of (`add_tokenized`)."""
        ids, text = tokenize_prompt(self.tokenizer, self.runner.config.vocab_size, prompt)
        self.add_tokenized(request_id, ids, params, text, parent_id=parent_id)

    def add_tokenized(
        self,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
        text: str | None = None,
        name: str = "the prompt",
        grammar: Any = None,
        parent_id: str | None = None,
    ) -> None:
        """`add_request` for a prompt already tokenized (`text`: what it reads, if known; `name`: what
        errors call it; `grammar`: its structured output's fresh matcher, `compile_grammar`'s, when
        the caller compiled it off the engine's thread; `parent_id`: the client request it is one
        sample or prompt of, which shares rows and queue places fairly with other parents)."""
        if request_id in self._ids:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_fits(ids, params, name)
        longest = len(ids) + params.max_tokens
        if self.training_seq_len and longest > self.training_seq_len and not self._warned_past_training:
            self._warned_past_training = True
            logger.warning(
                "%s plus max_tokens runs to %d tokens, past the %d the model was trained on: it is served, but "
                "answers past its training length are extrapolation (said once)",
                name,
                longest,
                self.training_seq_len,
            )
        if params.n != 1:
            raise ValueError(
                "the engine takes one sample per request: give n samples as n requests (LLM and the server do)"
            )
        req = Request(text, ids, params, request_id=request_id, arrival=time.perf_counter(), parent_id=parent_id)
        req.grammar = grammar if grammar is not None else self.compile_grammar(params)
        if req.is_auto:
            self.auto_policy()  # made, and the forwards timed, before its first step
        self.scheduler.add(req)
        self._ids.add(request_id)
        self._sent[request_id] = (0, 0)

    def auto_policy(self) -> AutoPolicy:
        """Mode auto's policy: the runner's, made (and its forwards timed) on the first auto request."""
        if self.runner.auto is None:
            # The sizes this engine's pool has room for now (larger ones are extrapolated, then
            # measured as the engine runs them).
            room = self.pool.num_free_pages * self.pool.page_size
            costs = PassCosts()
            costs.calibrate(self._timed_forward, tuple(n for n in CALIBRATION_SIZES if n < room) or (1,))
            self.runner.auto = AutoPolicy(EXACT_DECODINGS, costs, lossy=LOSSY_DECODINGS)
        return self.runner.auto

    def _timed_forward(self, tokens: int) -> None:
        """One causal forward of `tokens` tokens into scratch slots of this engine's pool (calibration)."""
        kv = KVCache(self.pool, 1)
        try:
            self.runner.forward(kv, torch.zeros(1, tokens, dtype=torch.long, device=self.runner.device), True)
            if self.runner.device.type == "cuda":
                torch.cuda.synchronize(self.runner.device)
        finally:
            kv.release()

    def compile_grammar(self, params: SamplingParams) -> Any:
        """A fresh llguidance matcher for `params.structured` (None without one); ValueError naming
        what is wrong with the grammar. Thread-safe: the server compiles on its worker threads."""
        return None if params.structured is None else self._grammars.matcher(params.structured, params.min_tokens)

    def check_fits(self, ids: list[int], params: SamplingParams, name: str = "the prompt") -> None:
        """ValueError when the prompt plus max_tokens exceeds the context, or the request would not
        fit the KV pool even alone."""
        check_fits(ids, params, self.max_model_len, name)
        req = Request(None, ids, params)
        if req.pass_width > self.config.decode_tokens:
            raise ValueError(
                f"block_length {params.block_length} with spec {Spec(params.spec).value!r} feeds {req.pass_width} "
                f"tokens per row per pass, more than the engine's max_num_batched_tokens of "
                f"{self.config.decode_tokens}: lower block_length or raise max_num_batched_tokens"
            )
        self.scheduler.check_fits(req)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request wherever it is; its KV rows are freed at once. False if unknown or done."""
        if self.scheduler.remove(request_id) is not None:
            self._forget(request_id)
            return True
        for job in self._chunked:  # between two chunks of its prefill: its cache goes with it
            if job.request.request_id == request_id:
                self._chunked.remove(job)
                job.batch.release()
                self._forget(request_id)
                return True
        found = self.groups.find(request_id)
        if found is not None:
            self.groups.drop_row(*found)
            self._forget(request_id)
            return True
        return False

    def _release(self, req: Request, why: str) -> None:
        """Carry out a planned preemption (`Scheduler.schedule` has requeued `req`): its row leaves
        its group, or its chunked prefill stops, and its pages return to the pool."""
        for job in self._chunked:
            if job.request is req:
                self._chunked.remove(job)
                job.batch.release()
                break
        else:
            found = self.groups.find(req.request_id)
            if found is None:
                raise RuntimeError(f"planned to preempt {req.request_id}, which is not running")
            self.groups.drop_row(*found)
        self.num_preemptions += 1
        logger.info("request %s preempted (%s); it resumes where it was when it is admitted again", req.request_id, why)

    def _forget(self, request_id: str) -> None:
        self._ids.discard(request_id)
        self._sent.pop(request_id, None)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """schedule -> run -> update. Returns the requests that committed something this step.

        A step is one model forward, planned by `Scheduler.schedule` (its preemptions, its lead:
        newcomers' prefill, a long prompt's next chunk or a running group's pass, and the groups
        riding with it), then run, and each part's requests updated from what it emitted."""
        plan = self._plan()
        if plan.moves:  # mode auto: rows change decoding, and the forward is planned on their groups
            for move in plan.moves:
                group = self.groups[move.key]
                self._move(move.key, list(move.rows), _decodings([group.requests[i] for i in move.rows], move.choice))
            plan = self._plan()
        for req, why in plan.preempt:
            self._release(req, why)
        for choice in {c for _, c in plan.first}:
            new = [r for r, c in plan.first if c == choice]
            for req, params in zip(new, _decodings(new, choice)):
                req.decoding = params
        outputs: list[RequestOutput] = []
        if plan.prefill and plan.chunked:
            req = plan.prefill[0]
            try:
                self._chunked.append(_Chunked(req, new_batch(self.runner, self.pool, [req], self.eos_token_ids)))
            except Exception as e:
                return [self._fail(req, e)]
            lead = [self._chunk_part(self._chunked[-1])]
        elif plan.prefill:
            try:
                lead = [self._prefill_part(list(plan.prefill))]
            except Exception as e:
                return self._prefill_isolated(list(plan.prefill), e)
        elif plan.chunk is not None:
            lead = [self._chunk_part(next(job for job in self._chunked if job.request is plan.chunk))]
        elif plan.lead is not None:
            lead = [self._decode_part(plan.lead)]
        else:
            return outputs
        return outputs + self._run(lead, [self._decode_part(key) for key in plan.riders])

    def _plan(self) -> StepPlan:
        groups = [self._running_group(key) for key in self.groups]
        prefilling = [self._prefilling(job) for job in self._chunked]
        pool = PoolPages(self.pool.num_free_pages, self.pool.refs)
        return self.scheduler.schedule(groups, prefilling, pool, self.runner.fuses_parts, self.runner.auto)

    def _move(self, key: tuple, rows: list[int], decodings: list[SamplingParams]) -> None:
        """Rows `rows` of group `key` leave it to decode as `decodings` (one decoding of
        `EXACT_DECODINGS`, or for lossy rows `LOSSY_DECODINGS`): their decoder state starts afresh,
        as after a prefill without drafting masks."""
        group = self.groups[key]
        stay = [i for i in range(len(group.requests)) if i not in rows]
        movers = [group.requests[i] for i in rows]
        if stay:
            group.batch, part = group.batch.split([stay, rows])
            group.requests = [group.requests[i] for i in stay]
        else:
            part = group.batch
            del self.groups[key]
        for req, params in zip(movers, decodings):
            req.decoding = params
        decoder = make_decoder(movers[0].decode_params)
        part.decoding = part.prefill_drafts = None
        decoder.start(part)
        cap = max(1, self.config.decode_tokens // decoder.width)
        self.groups.add(batch_key(movers[0].decode_params), decoder, part, movers, cap)

    def _running_group(self, key: tuple) -> RunningGroup:
        """What the scheduler sees of group `key`."""
        group = self.groups[key]
        kv = group.batch.kv
        auto = next((r for r in group.requests if r.is_auto), None)
        return RunningGroup(
            key,
            tuple(group.requests),
            tuple(kv.pages),
            tuple(kv.row_pages_needed(group.decoder.width)),
            tuple(group.decoder.pending_commit(group.batch)),
            group.vtime,
            group.decoder.width,
            None if auto is None else choice_of(auto.decode_params),
            () if auto is None else tuple(group.decoder.at_boundary(group.batch)),
        )

    def _prefilling(self, job: _Chunked) -> Prefilling:
        kv = job.batch.kv
        return Prefilling(job.request, kv.pages[0], kv.pages_needed(self._chunk_tokens(job)))

    def _chunk_tokens(self, job: _Chunked) -> int:
        """Context tokens the next chunk of `job` feeds."""
        return min(self.config.max_num_batched_tokens, len(job.request.context_ids) - job.batch.kv.lengths[0])

    def _run(self, lead: list[StepPart], riders: list[StepPart]) -> list[RequestOutput]:
        """One model forward for `lead` and `riders`. A forward that fails with riders is run
        again without them (they have only written scratch slots), so a failed forward is always
        its lead's."""
        sizes = [(p.group, p.batch.size) for p in lead + riders if p.group is not None]
        try:
            outputs, seconds = run_parts(self.runner, lead + riders)
            if self.runner.auto is not None:
                self.runner.auto.costs.observe(sum(p.forward.tokens.numel() for p in lead + riders), seconds)
                self.runner.auto.step(lead[0].group is None, seconds)
        except Exception as e:
            if riders:  # run_parts discarded every part's pass: try the lead alone
                return self._run(lead, [])
            return [out for p in lead for out in p.fail(e)]
        self.groups.charge(sizes, seconds)
        return outputs

    def _decode_part(self, key: tuple) -> StepPart:
        """Group `key`'s next pass: its decoder plans and accepts, its rows take what they emitted."""
        group = self.groups[key]
        before = list(group.requests)

        def finish(emitted: list[list[int]] | None, host: HostEmission | None) -> list[RequestOutput]:
            self._count_cycles(before, emitted or [])
            group.requests = apply_step(group.batch, before, emitted or [], self.eos_token_ids, self.tokenizer, host)
            if not group.requests:
                del self.groups[key]
            return [self._output(r, group.decoder, group.batch) for r in before]

        def fail(error: Exception) -> list[RequestOutput]:
            # Its batch state may be half-updated: the group ends.
            self.groups.pop(key, None)
            group.batch.release()
            return [self._fail(r, error) for r in before]

        fwd = group.decoder.plan(group.batch)
        return StepPart(
            group.batch,
            fwd,
            lambda logits: group.decoder.accept(group.batch, logits),
            finish,
            fail,
            key,
        )

    def _count_cycles(self, requests: list[Request], emitted: list[list[int]]) -> None:
        """Mode auto: one group's rows ran a pass of their (shared) decoding; the auto ones that
        emitted count a cycle, and the policy learns from what each emitted (`AutoPolicy.cycles`)."""
        auto = [i for i, r in enumerate(requests) if r.is_auto]
        if not auto:
            return
        params = requests[auto[0]].decode_params
        tokens = [len(emitted[i]) if i < len(emitted) else 0 for i in auto]
        name = decoding_name(params)
        for i, n in zip(auto, tokens):
            if n:
                requests[i].cycles[name] += 1
        if self.runner.auto is not None:
            self.runner.auto.cycles(choice_of(params), tokens)

    def _chunk_part(self, job: _Chunked) -> StepPart:
        """The next chunk of a long prompt's prefill; after its last, the request joins its group."""

        def finish(first: list[list[int]] | None, host: HostEmission | None) -> list[RequestOutput]:
            if host is not None and host.prompt_logprobs is not None:
                record_prompt_logprobs([job.request], host.prompt_logprobs, [chunk_start], self.tokenizer)
            if not first:  # None, or no row: the context is not all in yet
                return []
            offer_prefixes(job.batch, [job.request])
            self._chunked.remove(job)
            return self._join([job.request], job.batch, first, host)

        def fail(error: Exception) -> list[RequestOutput]:
            if job in self._chunked:
                self._chunked.remove(job)
            job.batch.release()
            return [self._fail(job.request, error)]

        chunk_start = job.batch.kv.lengths[0]
        fwd = plan_chunk(self.runner, job.batch, job.request, self.config.max_num_batched_tokens)
        accept = partial(accept_chunk, job.batch, job.request, fwd)
        return StepPart(job.batch, fwd, accept, finish, fail)

    def _prefill_part(self, admitted: list[Request]) -> StepPart:
        """A prefill is the same causal pass in every mode: one forward for all newcomers, then each
        joins its mode's group. Running groups change only once everything else has succeeded; if
        it fails, each newcomer is tried alone and only those that fail alone fail."""
        batch, fwd = plan_prefill(self.runner, self.pool, admitted, self.eos_token_ids)
        starts = list(batch.kv.lengths)  # where each row's fed positions begin (past its cached prefix)

        def finish(first: list[list[int]] | None, host: HostEmission | None) -> list[RequestOutput]:
            if host is not None and host.prompt_logprobs is not None:
                record_prompt_logprobs(admitted, host.prompt_logprobs, starts, self.tokenizer)
            offer_prefixes(batch, admitted)
            return self._join(admitted, batch, first, host) if first is not None else []

        def fail(error: Exception) -> list[RequestOutput]:
            batch.release()
            return self._prefill_isolated(admitted, error)

        return StepPart(
            batch,
            fwd,
            partial(accept_prefill, batch, admitted, fwd),
            finish,
            fail,
        )

    def _prefill_isolated(self, admitted: list[Request], error: Exception) -> list[RequestOutput]:
        if len(admitted) == 1:
            return [self._fail(admitted[0], error)]
        outputs = []
        for req in admitted:  # find the request that fails alone; its neighbours are served as usual
            if not req.num_resumed and req.resume_seed is None:  # a resumed one has emitted nothing new
                req.reset()
                self._sent[req.request_id] = (0, 0)
            try:
                part = self._prefill_part([req])
            except Exception as e:
                outputs.append(self._fail(req, e))
                continue
            outputs += self._run([part], [])
        return outputs

    def _join(
        self, admitted: list[Request], batch: DecodeBatch, first: list[list[int]], host: HostEmission | None
    ) -> list[RequestOutput]:
        """Prefilled requests emit their first token and join their mode's group."""
        by_key: dict[tuple, list[int]] = {}
        for i, req in enumerate(admitted):
            by_key.setdefault(batch_key(req.decode_params), []).append(i)
        touched: list[tuple[Request, Decoder, DecodeBatch]] = []
        joining: list[tuple[tuple, Decoder, DecodeBatch, list[Request]]] = []
        for (key, rows), part in zip(by_key.items(), batch.split(list(by_key.values()))):
            reqs = [admitted[i] for i in rows]
            left = apply_step(part, reqs, [first[i] for i in rows], self.eos_token_ids, self.tokenizer, host, rows)
            decoder = make_decoder(reqs[0].decode_params)
            touched += [(r, decoder, part) for r in reqs]
            if left:
                decoder.start(part)
                part.prefill_drafts = None  # drafted from, or not this decoder's
                joining.append((key, decoder, part, left))
        outputs = [self._output(r, d, b) for r, d, b in touched]
        for key, decoder, part, left in joining:
            self.groups.add(key, decoder, part, left, max(1, self.config.decode_tokens // decoder.width))
        return outputs

    def _fail(self, req: Request, error: Exception) -> RequestOutput:
        logger.error("request %s failed inside the engine", req.request_id, exc_info=error)
        self._forget(req.request_id)
        return RequestOutput(req.request_id, "", [], True, error=f"{type(error).__name__}: {error}")

    def _output(self, req: Request, decoder: Decoder, batch: DecodeBatch) -> RequestOutput:
        if req.error is not None:  # its grammar failed (`Request.emit`): an error, not text outside it
            logger.info("request %s ended: %s", req.request_id, req.error)
            self._forget(req.request_id)
            return RequestOutput(req.request_id, "", [], True, error=req.error, is_request_error=True)
        sent_tokens, sent_chars = self._sent[req.request_id]
        safe = streamable_text(req)
        out = RequestOutput(
            req.request_id,
            safe[sent_chars:],
            req.token_ids[sent_tokens:],
            req.finish_reason is not None,
            new_logprobs=None if req.logprobs is None else req.logprobs[sent_tokens:],
        )
        if (sent_tokens, sent_chars) == (0, 0):
            out.prompt_token_ids, out.prompt_logprobs = req.prompt_ids, req.prompt_logprobs
        self._sent[req.request_id] = (len(req.token_ids), max(sent_chars, len(safe)))
        if out.finished:
            out.output = req.output(decoder, batch.timings.mean_ms(), time.perf_counter() - req.arrival)
            self._forget(req.request_id)
        return out
