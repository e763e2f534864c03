"""The OpenAI-compatible HTTP adapter: /v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics. Thin: validation, streaming and error shapes here; generation is the engine's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from trimode.engine.generate import RequestOutput
from trimode.engine.scheduler import QueueFull
from trimode.outputs import GenerationOutput
from trimode.server.async_engine import AsyncEngine, EngineError, ShuttingDown
from trimode.server.guard import Guard, error_response
from trimode.server.protocol import ChatCompletionRequest, CompletionRequest

MAX_BODY_BYTES = 1_000_000
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
STALL_S = 30.0  # /health fails once the engine thread has not come round its loop for this long
# What validation and the engine raise for one request; APIError.of says what the client is told.
SERVING_ERRORS = (ValueError, QueueFull, ShuttingDown, EngineError)


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers

    @classmethod
    def of(cls, exc: ValueError | QueueFull | ShuttingDown | EngineError) -> APIError:
        """What the client is told about an error from validation or the engine."""
        if isinstance(exc, QueueFull):
            return cls(429, str(exc), "rate_limit_error", headers={"Retry-After": "1"})
        if isinstance(exc, ShuttingDown):
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


def usage(res: GenerationOutput) -> dict[str, Any]:
    return {
        "prompt_tokens": res.num_prompt_tokens,
        "completion_tokens": res.num_generated_tokens,
        "total_tokens": res.num_prompt_tokens + res.num_generated_tokens,
        "num_forwards": res.num_forwards,
        "tokens_per_forward": round(res.tokens_per_forward, 4),
    }


def build_app(
    engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    default_mode: str = "ar",
    max_body_bytes: int = MAX_BODY_BYTES,
    access_log: bool = False,
    docs: bool = False,
    stall_s: float = STALL_S,
) -> FastAPI:
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
        longer than `stall_s`, or a dead thread, answers 503 with the reason."""
        age = engine.heartbeat_age
        status = "ok"
        if not engine.is_alive:
            status = "engine_dead"
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
        return JSONResponse(doc, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        engine.metrics.heartbeat.set(engine.heartbeat_age)
        return PlainTextResponse(
            generate_latest(engine.metrics.registry).decode(), media_type="text/plain; version=0.0.4"
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "trimode"}]}

    def check_model(body: CompletionRequest | ChatCompletionRequest) -> None:
        if body.model != model_name:
            raise APIError(
                404,
                f"model `{body.model}` does not exist; this server serves `{model_name}`",
                "invalid_request_error",
                "model",
            )

    async def start(
        body: CompletionRequest | ChatCompletionRequest, fn: Any, arg: Any, prefix: str
    ) -> tuple[str, AsyncIterator[RequestOutput]]:
        """Tokenize `arg` with `fn` on a worker thread, then hand the request to the engine."""
        try:
            params = body.sampling_params(default_mode)
            prompt_ids = await engine.run_blocking(fn, arg)
            request_id = engine.new_request_id(prefix)
            return request_id, engine.submit(request_id, prompt_ids, params)
        except SERVING_ERRORS as e:
            raise APIError.of(e) from e

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        check_model(body)
        request_id, outputs = await start(body, engine.engine.tokenizer.encode, body.prompt, "cmpl")
        return await respond(body, request_id, outputs, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request) -> Any:
        check_model(body)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        request_id, outputs = await start(body, engine.engine.tokenizer.encode_chat, messages, "chatcmpl")
        return await respond(body, request_id, outputs, http, chat=True)

    async def collect(outputs: AsyncIterator[RequestOutput], http: Request) -> GenerationOutput | None:
        """The finished result; None if the client hung up first. Cancelling the collecting task closes
        the output stream, which aborts the request and frees its KV rows at once."""

        async def last() -> GenerationOutput | None:
            final = None
            async for out in outputs:
                final = out.output or final
            return final

        task = asyncio.ensure_future(last())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await http.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
        return task.result()

    async def respond(
        body: CompletionRequest | ChatCompletionRequest,
        request_id: str,
        outputs: AsyncIterator[RequestOutput],
        http: Request,
        chat: bool,
    ) -> Any:
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                sse(request_id, created, outputs, chat, include_usage, http), media_type="text/event-stream"
            )
        try:
            final = await collect(outputs, http)
        except SERVING_ERRORS as e:
            raise APIError.of(e) from e
        if final is None:  # nobody is listening; the status is for the access log only
            return Response(status_code=499)
        http.state.usage = usage(final)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": final.text},
                "finish_reason": final.finish_reason,
            }
        else:
            choice = {"index": 0, "text": final.text, "logprobs": None, "finish_reason": final.finish_reason}
        return {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model_name,
            "choices": [choice],
            "usage": usage(final),
        }

    async def sse(
        request_id: str,
        created: int,
        outputs: AsyncIterator[RequestOutput],
        chat: bool,
        include_usage: bool,
        http: Request,
    ) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = (
                    {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
                )
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            doc = {"id": request_id, "object": kind, "created": created, "model": model_name, "choices": [choice]}
            if include_usage:
                doc["usage"] = None
            return f"data: {json.dumps(doc)}\n\n"

        first = True
        try:
            async for out in outputs:
                if out.delta_text or first:
                    yield chunk(out.delta_text, None, first)
                    first = False
                if out.output is not None:
                    http.state.usage = usage(out.output)
                    yield chunk(None, out.output.finish_reason)
                    if include_usage:
                        doc = {
                            "id": request_id,
                            "object": kind,
                            "created": created,
                            "model": model_name,
                            "choices": [],
                            "usage": usage(out.output),
                        }
                        yield f"data: {json.dumps(doc)}\n\n"
        except SERVING_ERRORS as e:
            err = APIError.of(e)
            engine.metrics.failed_status(err.status)  # the stream's status (200) is already sent
            yield err.event()
        yield "data: [DONE]\n\n"

    return app
