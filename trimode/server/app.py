"""The OpenAI-compatible HTTP adapter: /v1/models, /v1/completions, /v1/chat/completions, and
vLLM's /tokenize, /detokenize, /version, with /health and /metrics. Thin: validation, streaming
and error shapes here; generation is the engine's."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from trimode import __version__
from trimode.engine.inputs import tokenize_prompt
from trimode.engine.scheduler import QueueFull
from trimode.engine.tp_workers import WorkerDead
from trimode.outputs import GenerationOutput, RequestOutput
from trimode.server.async_engine import AsyncEngine, EngineError, ShuttingDown
from trimode.server.guard import Guard, error_response
from trimode.server.logprobs import (
    MAX_LOGPROB_ENTRIES,
    chat_logprobs,
    check_logprob_entries,
    completion_logprobs,
)
from trimode.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    ignored_fields,
    template_messages,
)
from trimode.server.tool_parsers import Delta, ToolParser, ToolStream

log = logging.getLogger("trimode.server")

MAX_BODY_BYTES = 1_000_000
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
IGNORED_HEADER = "x-trimode-ignored-fields"  # a response's: the request fields trimode did not use
STALL_S = 30.0  # /health fails once the engine thread has not come round its loop for this long
# What validation and the engine raise for one request; APIError.of says what the client is told.
SERVING_ERRORS = (ValueError, QueueFull, ShuttingDown, WorkerDead, EngineError)


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers

    @classmethod
    def of(cls, exc: ValueError | QueueFull | ShuttingDown | WorkerDead | EngineError) -> APIError:
        """What the client is told about an error from validation or the engine."""
        if isinstance(exc, QueueFull):
            return cls(429, str(exc), "rate_limit_error", headers={"Retry-After": "1"})
        if isinstance(exc, (ShuttingDown, WorkerDead)):  # not this request's fault, nor a bug: unavailable
            return cls(503, str(exc), "server_error")
        if isinstance(exc, ValueError):
            return cls(400, str(exc), "invalid_request_error")
        return cls(500, str(exc), "server_error")  # EngineError: says it is internal

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.headers)

    def event(self) -> str:
        """The same error as a server-sent event, for a stream that has already begun."""
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        return f"data: {json.dumps({'error': err})}\n\n"


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


def build_app(
    engine: AsyncEngine,
    model_name: str | list[str],
    api_key: str | None = None,
    default_mode: str = "ar",
    max_body_bytes: int = MAX_BODY_BYTES,
    access_log: bool = False,
    docs: bool = False,
    stall_s: float = STALL_S,
    seed: int | None = None,
    generation_defaults: dict[str, Any] | None = None,
    max_logprob_entries: int = MAX_LOGPROB_ENTRIES,
    tool_parser: ToolParser | None = None,
    auto_tool_choice: bool = False,
) -> FastAPI:
    """The app over a running `engine`. `model_name`: the name, or names, clients may send (the
    first is the one responses carry); `seed`: where requests without one get theirs (reproducible
    runs); `generation_defaults`: sampling defaults for fields requests leave unset;
    `max_logprob_entries`: the most log-probabilities one request may ask for (`logprobs.py`);
    `tool_parser`: the model's tool-call format, which tool_choice "required" or a named function
    forces with a grammar, and which `auto_tool_choice` also reads out of free answers."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    model_name = names[0]
    seeds = random.Random(seed) if seed is not None else None
    # No automatic trailing-slash redirect: Starlette builds its Location from the client's Host
    # header. The OpenAPI schema and docs pages are off unless asked for.
    app = FastAPI(
        title="trimode",
        redirect_slashes=False,
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url=None,
    )
    app.state.engine = engine
    tokenizer = engine.engine.tokenizer
    config = engine.engine.runner.config

    app.add_middleware(
        Guard, max_body_bytes=max_body_bytes, api_key=api_key, metrics=engine.metrics, access_log=access_log
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            message, param = "the body is not valid JSON (or not UTF-8)", None
        elif err.get("type") == "string_unicode":  # what pydantic says of lone surrogates in some fields
            message = f"`{param}` holds a lone UTF-16 surrogate: send valid Unicode text"
        elif err.get("type") == "extra_forbidden":
            message = f"unknown field `{param}`"
        elif param:
            message = f"`{param}`: {message}"
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 only while the engine thread is alive and coming round its loop: a step running
        longer than `stall_s`, a dead thread, or a dead tensor-parallel worker (no forward can run
        again) answers 503 with the reason."""
        age = engine.heartbeat_age
        status = "ok"
        failure = engine.worker_failure
        if not engine.is_alive:
            status = "engine_dead"
        elif failure is not None:
            status = "worker_dead"
        elif age > stall_s:
            status = "engine_stalled"
        elif engine.is_draining:
            status = "shutting_down"
        doc = {
            "status": status,
            "engine_alive": engine.is_alive,
            "heartbeat_age_s": round(age, 3),
            "running": engine.status.running,
            "waiting": engine.status.waiting,
        }
        if failure is not None:
            doc["worker_error"] = failure
        return JSONResponse(doc, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        engine.metrics.heartbeat.set(engine.heartbeat_age)
        return PlainTextResponse(
            generate_latest(engine.metrics.registry).decode(), media_type="text/plain; version=0.0.4"
        )

    def card(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "trimode",
            "max_model_len": engine.engine.max_model_len,  # positions the model takes
            # The longest sequence it was trained on, where the checkpoint says: answers past it
            # are extrapolation (the embedded model: 256 tokens, of 262,144 positions).
            "training_seq_len": engine.engine.training_seq_len,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(n) for n in names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return card(name)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    def check_model(name: str | None) -> None:
        if name is not None and name not in names:
            served = ", ".join(f"`{n}`" for n in names)
            raise APIError(
                404, f"model `{name}` does not exist; this server serves {served}", "invalid_request_error", "model"
            )

    def chat_ids(chat: list[dict[str, Any]], add_bos: bool, **template: Any) -> list[int]:
        """A rendered chat's ids; `add_bos`: a BOS before what the template writes (vLLM's
        add_special_tokens for chats)."""
        ids = tokenizer.encode_chat(chat, **template)
        return [config.bos_token_id, *ids] if add_bos else ids

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)

        def ids() -> list[int]:
            if body.messages is not None:
                chat = template_messages(body.messages)
                return chat_ids(chat, bool(body.add_special_tokens), add_generation_prompt=body.add_generation_prompt)
            special = body.add_special_tokens is not False
            prompt = body.prompt or ""  # set: the request validates that one of prompt and messages is
            return tokenize_prompt(tokenizer, config.vocab_size, prompt, add_special_tokens=special)[0]

        try:
            tokens = await engine.run_blocking(ids)
        except ValueError as e:
            raise APIError.of(e) from e
        return {"count": len(tokens), "max_model_len": engine.engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < config.vocab_size]
        if bad:
            raise APIError(400, f"tokens outside [0, {config.vocab_size}): {bad[:5]}", "invalid_request_error")
        return {"prompt": await engine.run_blocking(tokenizer.decode, body.tokens)}

    async def start(
        body: CompletionRequest | ChatCompletionRequest,
        prepare: list[Callable[[], list[int]]],
        prefix: str,
        structured: dict[str, Any] | None = None,
    ) -> tuple[str, list[AsyncIterator[RequestOutput]]]:
        """Tokenize each prompt (`prepare`, on a worker thread), then hand them to the engine, one
        request each; if one is refused, those already queued are aborted. `structured`: a
        grammar the request's own fields may not also set (a forced tool call's)."""
        request_id = engine.new_request_id(prefix)
        submitted: list[str] = []
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            params = body.sampling_params(default_mode, generation_defaults)
            if structured is not None:
                if params.structured is not None:
                    raise ValueError(
                        "tool_choice 'required' or a named function makes the answer a tool call: leave out "
                        "response_format and the guided_* fields"
                    )
                params = dataclasses.replace(params, structured=structured)
            if params.seed is None and seeds is not None:
                params = dataclasses.replace(params, seed=seeds.getrandbits(63))
            samples = params.samples()  # n samples of a prompt: n requests, sharing its pages
            # A grammar compiles here, on a worker thread (up to a second for a large schema), not on
            # the engine's; each request gets its own copy of the matcher.
            grammar = await engine.run_blocking(engine.engine.compile_grammar, params)
            prompts = [await engine.run_blocking(fn) for fn in prepare]
            check_logprob_entries(params, [len(ids) for ids in prompts], max_logprob_entries)
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

    logged: set[str] = set()  # ignored field names already logged

    def ignore_unknown(body: CompletionRequest | ChatCompletionRequest) -> list[str]:
        """The request's unknown fields (refusing those that change the answer), each logged the
        first time the server meets it."""
        try:
            names = ignored_fields(body)
        except ValueError as e:
            raise APIError.of(e) from e
        for name in sorted(set(names) - logged):
            logged.add(name)
            log.info("ignoring the request field `%s`, which trimode does not use", name)
        return names

    def flag_ignored(response: Any, names: list[str]) -> Any:
        """`response` with the header naming the fields it ignored."""
        if names and isinstance(response, Response):
            response.headers[IGNORED_HEADER] = ", ".join(names)
        return response

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        check_model(body.model)
        ignored = ignore_unknown(body)
        many = len(body.prompts) > 1

        def prepare(i: int, prompt: str | list[int]) -> Callable[[], list[int]]:
            name = f"prompt {i}" if many else "the prompt"
            return lambda: tokenize_prompt(tokenizer, config.vocab_size, prompt, name, body.add_special_tokens)[0]

        request_id, streams = await start(body, [prepare(i, p) for i, p in enumerate(body.prompts)], "cmpl")
        echo = None
        if body.echo:  # each choice's text begins with its prompt's
            texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompts]
            echo = [t for t in texts for _ in range(body.n)]
        return flag_ignored(await respond(body, request_id, streams, http, echo=echo), ignored)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request) -> Any:
        check_model(body.model)
        ignored = ignore_unknown(body)

        def prepare() -> list[int]:
            return chat_ids(body.chat(), body.add_special_tokens, **body.template_kwargs())

        forced, structured = body.forced_tools(), None
        if forced is not None:
            if tool_parser is None:
                raise APIError(
                    400,
                    "tool_choice 'required' or a named function needs a server started with --tool-call-parser NAME "
                    "(the model's tool-call format)",
                    "invalid_request_error",
                    "tool_choice",
                )
            structured = {"grammar": tool_parser.grammar(forced, body.parallel_tool_calls is not False)}
        reads_calls = forced is not None or (auto_tool_choice and body.tool_choice in (None, "auto"))
        tools = tool_parser if body.tools and reads_calls else None
        request_id, streams = await start(body, [prepare], "chatcmpl", structured)
        return flag_ignored(await respond(body, request_id, streams, http, tools=tools), ignored)

    async def collect(streams: list[AsyncIterator[RequestOutput]], http: Request) -> list[GenerationOutput] | None:
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

    def completion_choice(
        body: CompletionRequest,
        index: int,
        text: str,
        ids: list[int],
        positions: list | None,
        finish: str | None,
        echo: tuple[str, list[int], list | None] | None = None,
        start: int = 0,
    ) -> dict[str, Any]:
        """A completions choice (or a stream chunk's), with its logprobs when asked for; `echo`:
        (the prompt's text, ids and logprobs) to put first, `start`: where `text` begins in the
        choice's whole text."""
        logprobs = None
        if echo is not None:
            text, start = echo[0] + text, 0
            ids, positions = echo[1] + ids, (echo[2] or [None] * len(echo[1])) + (positions or [])
        if body.logprobs is not None:
            logprobs = completion_logprobs(tokenizer, ids, positions or [], body.logprobs, start)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chat_choice_logprobs(body: ChatCompletionRequest, ids: list[int], positions: list | None) -> Any:
        return chat_logprobs(tokenizer, ids, positions or [], body.top_logprobs or 0) if body.logprobs else None

    async def respond(
        body: CompletionRequest | ChatCompletionRequest,
        request_id: str,
        streams: list[AsyncIterator[RequestOutput]],
        http: Request,
        echo: list[str] | None = None,
        tools: ToolParser | None = None,
    ) -> Any:
        """`tools`: the parser that reads tool calls out of each chat choice's text."""
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                sse(body, request_id, created, streams, include_usage, http, echo, tools),
                media_type="text/event-stream",
            )
        try:
            finals = await collect(streams, http)
        except SERVING_ERRORS as e:
            raise APIError.of(e) from e
        if finals is None:  # nobody is listening; the status is for the access log only
            return Response(status_code=499)
        http.state.usage = usage(finals)
        # Built and serialised on a worker thread: with logprobs the answer can run to megabytes,
        # and the event loop serves /health and every stream meanwhile.
        return await engine.run_blocking(document, body, request_id, created, finals, echo, tools)

    def document(
        body: CompletionRequest | ChatCompletionRequest,
        request_id: str,
        created: int,
        finals: list[GenerationOutput],
        echo: list[str] | None,
        tools: ToolParser | None = None,
    ) -> JSONResponse:
        """A whole (not streamed) answer."""
        chat = isinstance(body, ChatCompletionRequest)
        if isinstance(body, ChatCompletionRequest):
            choices = []
            for i, f in enumerate(finals):
                message: dict[str, Any] = {"role": "assistant", "content": f.text}
                finish = f.finish_reason
                calls = tools.parse(f.text, f.finish_reason == "length") if tools is not None else (f.text, [])
                if calls[1]:
                    one = body.parallel_tool_calls is False
                    kept = calls[1][:1] if one else calls[1]
                    message = {
                        "role": "assistant",
                        "content": calls[0] or None,
                        "tool_calls": [c.message() for c in kept],
                    }
                    finish = "tool_calls"
                choices.append(
                    {
                        "index": i,
                        "message": message,
                        "logprobs": chat_choice_logprobs(body, f.token_ids, f.logprobs),
                        "finish_reason": finish,
                    }
                )
        else:
            choices = [
                completion_choice(
                    body,
                    i,
                    f.text,
                    f.token_ids,
                    f.logprobs,
                    f.finish_reason,
                    None if echo is None else (echo[i], f.prompt_token_ids, f.prompt_logprobs),
                )
                for i, f in enumerate(finals)
            ]
        doc = {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model_name,
            "choices": choices,
            "usage": usage(finals),
        }
        return JSONResponse(doc)

    async def sse(
        body: CompletionRequest | ChatCompletionRequest,
        request_id: str,
        created: int,
        streams: list[AsyncIterator[RequestOutput]],
        include_usage: bool,
        http: Request,
        echo: list[str] | None,
        tools: ToolParser | None = None,
    ) -> AsyncIterator[str]:
        chat = isinstance(body, ChatCompletionRequest)
        kind = "chat.completion.chunk" if chat else "text_completion"
        sent = [0] * len(streams)  # characters of each choice's text streamed so far
        # Per choice, its text split into content and tool calls as it streams.
        limit = 1 if isinstance(body, ChatCompletionRequest) and body.parallel_tool_calls is False else None
        calls = [ToolStream(tools, limit) for _ in streams] if tools is not None else None

        def chunk(index: int, out: RequestOutput | None, finish: str | None, first: bool = False) -> str:
            text, ids = (out.delta_text, out.new_token_ids) if out is not None else ("", [])
            positions = out.new_logprobs if out is not None else None
            if isinstance(body, ChatCompletionRequest):
                split = Delta(content=text)
                if calls is not None:
                    split = calls[index].feed(text) if finish is None else calls[index].finish(finish == "length")
                    if calls[index].calls and finish is not None:
                        finish = "tool_calls"
                delta: dict[str, Any] = {"role": "assistant", "content": split.content} if first else {}
                if split.content and not first:
                    delta["content"] = split.content
                if split.tool_calls:
                    delta["tool_calls"] = split.tool_calls
                choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
                if ids and body.logprobs:
                    choice["logprobs"] = chat_choice_logprobs(body, ids, positions)
            else:
                prompt = None
                if first and echo is not None and out is not None:
                    prompt = (echo[index], out.prompt_token_ids or [], out.prompt_logprobs)
                choice = completion_choice(body, index, text, ids, positions, finish, prompt, sent[index])
                sent[index] += len(choice["text"])
            doc = {"id": request_id, "object": kind, "created": created, "model": model_name, "choices": [choice]}
            if include_usage:
                doc["usage"] = None
            return f"data: {json.dumps(doc)}\n\n"

        first = [True] * len(streams)
        finals: list[GenerationOutput] = []
        try:
            async for index, out in merged(streams):
                if out.delta_text or out.new_token_ids or first[index]:
                    if first[index] and echo is not None:  # the prompt's logprobs: built off the loop
                        yield await engine.run_blocking(chunk, index, out, None, True)
                    else:
                        yield chunk(index, out, None, first[index])
                    first[index] = False
                if out.output is not None:
                    finals.append(out.output)
                    http.state.usage = usage(finals)
                    yield chunk(index, None, out.output.finish_reason)
            if include_usage:
                doc = {
                    "id": request_id,
                    "object": kind,
                    "created": created,
                    "model": model_name,
                    "choices": [],
                    "usage": usage(finals),
                }
                yield f"data: {json.dumps(doc)}\n\n"
        except SERVING_ERRORS as e:
            err = APIError.of(e)
            engine.metrics.failed_status(err.status)  # the stream's status (200) is already sent
            yield err.event()
        yield "data: [DONE]\n\n"

    return app


async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of several streams as they come, each with its stream's index. The first error
    ends it; closing it (the client went away) closes every stream, aborting their requests."""
    if len(streams) == 1:  # no tasks for the common case
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in outputs:
                queue.put_nowait((index, out))
            queue.put_nowait((index, None))
        except Exception as e:
            queue.put_nowait((index, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
