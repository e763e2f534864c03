"""What the server's routes share: the running engine, the names it serves under, and the serving
policy (default mode, seeds, sampling defaults, caps, tool calls). The routes stay thin: they
validate, call this, and shape the answer."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response

from trimode.config import ModelConfig
from trimode.outputs import GenerationOutput, RequestOutput
from trimode.server.async_engine import AsyncEngine, EngineError
from trimode.server.errors import SERVING_ERRORS, APIError
from trimode.server.logprobs import MAX_LOGPROB_ENTRIES, check_logprob_entries
from trimode.server.protocol import ChatCompletionRequest, CompletionRequest, ignored_fields
from trimode.server.tool_parsers import ToolParser
from trimode.tokenizer import Tokenizer

log = logging.getLogger("trimode.server")

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
IGNORED_HEADER = "x-trimode-ignored-fields"  # a response's: the request fields trimode did not use
STALL_S = 30.0  # /health fails once the engine thread has not come round its loop for this long

Body = CompletionRequest | ChatCompletionRequest


@dataclass
class Service:
    """`names`: those clients may send (the first is the one answers carry); `seeds`: where
    requests without a seed get theirs (reproducible runs); `generation_defaults`: sampling
    defaults for fields requests leave unset; `max_logprob_entries`: the most log-probabilities one
    request may ask for (`logprobs.py`); `tool_parser`: the model's tool-call format, which
    tool_choice "required" or a named function forces with a grammar, and which
    `auto_tool_choice` also reads out of free answers."""

    engine: AsyncEngine
    names: list[str]
    default_mode: str = "ar"
    stall_s: float = STALL_S
    seeds: random.Random | None = None
    generation_defaults: dict[str, Any] | None = None
    max_logprob_entries: int = MAX_LOGPROB_ENTRIES
    tool_parser: ToolParser | None = None
    auto_tool_choice: bool = False
    _logged: set[str] = field(default_factory=set)  # ignored field names already logged

    @property
    def model_name(self) -> str:
        return self.names[0]

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.engine.tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.engine.engine.runner.config

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            served = ", ".join(f"`{n}`" for n in self.names)
            raise APIError(
                404, f"model `{name}` does not exist; this server serves {served}", "invalid_request_error", "model"
            )

    def card(self, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "trimode",
            "max_model_len": self.engine.engine.max_model_len,  # positions the model takes
            # The longest sequence it was trained on, where the checkpoint says: answers past it
            # are extrapolation (the embedded model: 256 tokens, of 262,144 positions).
            "training_seq_len": self.engine.engine.training_seq_len,
        }

    def chat_ids(self, chat: list[dict[str, Any]], add_bos: bool, **template: Any) -> list[int]:
        """A rendered chat's ids; `add_bos`: a BOS before what the template writes (vLLM's
        add_special_tokens for chats)."""
        ids = self.tokenizer.encode_chat(chat, **template)
        return [self.config.bos_token_id, *ids] if add_bos else ids

    def ignore_unknown(self, body: Body) -> list[str]:
        """The request's unknown fields (refusing those that change the answer), each logged the
        first time the server meets it."""
        try:
            names = ignored_fields(body)
        except ValueError as e:
            raise APIError.of(e) from e
        for name in sorted(set(names) - self._logged):
            self._logged.add(name)
            log.info("ignoring the request field `%s`, which trimode does not use", name)
        return names

    async def start(
        self,
        body: Body,
        prepare: list[Callable[[], list[int]]],
        prefix: str,
        structured: dict[str, Any] | None = None,
    ) -> tuple[str, list[AsyncIterator[RequestOutput]]]:
        """Tokenize each prompt (`prepare`, on a worker thread), then hand them to the engine, one
        request each; if one is refused, those already queued are aborted. `structured`: a
        grammar the request's own fields may not also set (a forced tool call's)."""
        engine = self.engine
        request_id = engine.new_request_id(prefix)
        submitted: list[str] = []
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            params = body.sampling_params(self.default_mode, self.generation_defaults)
            if structured is not None:
                if params.structured is not None:
                    raise ValueError(
                        "tool_choice 'required' or a named function makes the answer a tool call: leave out "
                        "response_format and the guided_* fields"
                    )
                params = dataclasses.replace(params, structured=structured)
            if params.seed is None and self.seeds is not None:
                params = dataclasses.replace(params, seed=self.seeds.getrandbits(63))
            samples = params.samples()  # n samples of a prompt: n requests, sharing its pages
            # A grammar compiles here, on a worker thread (up to a second for a large schema), not on
            # the engine's; each request gets its own copy of the matcher.
            grammar = await engine.run_blocking(engine.engine.compile_grammar, params)
            prompts = [await engine.run_blocking(fn) for fn in prepare]
            check_logprob_entries(params, [len(ids) for ids in prompts], self.max_logprob_entries)
            for prompt_ids in prompts:
                for sample in samples:
                    index = len(streams)  # the choice's index: i * n + j
                    sub_id = request_id if len(prepare) * len(samples) == 1 else f"{request_id}-{index}"
                    matcher = None if grammar is None else grammar.deep_copy()
                    streams.append(engine.submit(sub_id, prompt_ids, sample, matcher, parent_id=request_id))
                    submitted.append(sub_id)
        except SERVING_ERRORS as e:
            for sub_id in submitted:
                engine.abort(sub_id)
            raise APIError.of(e) from e
        return request_id, streams

    async def collect(
        self, streams: list[AsyncIterator[RequestOutput]], http: Request
    ) -> list[GenerationOutput] | None:
        """Every prompt's finished result, in order; None if the client hung up first. Cancelling a
        collecting task closes its output stream, which aborts the request and frees its KV rows at
        once; one prompt failing cancels the others."""

        async def last(outputs: AsyncIterator[RequestOutput]) -> GenerationOutput:
            final: GenerationOutput | None = None
            async for out in outputs:
                final = out.output or final
            if final is None:
                raise EngineError("the engine ended a request without its result")
            return final

        tasks = [asyncio.ensure_future(last(o)) for o in streams]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION)
                failed = next((e for t in tasks if t.done() and (e := t.exception()) is not None), None)
                if failed is not None:
                    raise failed
                if await http.is_disconnected():
                    return None
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def flag_ignored(response: Any, names: list[str]) -> Any:
    """`response` with the header naming the request fields it ignored."""
    if names and isinstance(response, Response):
        response.headers[IGNORED_HEADER] = ", ".join(names)
    return response


def usage(results: list[GenerationOutput]) -> dict[str, Any]:
    """Token counts of a response, over all its prompts' results."""
    prompt = sum(r.num_prompt_tokens for r in results)
    completion = sum(r.num_generated_tokens for r in results)
    forwards = sum(r.num_forwards for r in results)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "num_forwards": forwards,
        "tokens_per_forward": round(completion / max(forwards, 1), 4),
    }
    served = collections.Counter[str]()
    for r in results:
        served.update(r.decodings or {})
    if any(r.decodings is not None for r in results):  # mode auto: the cycles each decoding served
        out["decodings"] = dict(served)
    return out
