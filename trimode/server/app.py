"""The OpenAI-compatible HTTP adapter: /v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics. Thin: validation, streaming and error shapes here; generation is the engine's."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from trimode.engine.llm_engine import RequestOutput
from trimode.engine.scheduler import QueueFull
from trimode.outputs import GenerationOutput
from trimode.server.async_engine import AsyncEngine
from trimode.server.protocol import ChatCompletionRequest, CompletionRequest

MAX_BODY_BYTES = 1_000_000
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status, headers=headers)


def usage(res: GenerationOutput) -> dict[str, Any]:
    return {"prompt_tokens": res.num_prompt_tokens, "completion_tokens": res.num_generated_tokens,
            "total_tokens": res.num_prompt_tokens + res.num_generated_tokens, "num_forwards": res.num_forwards,
            "tokens_per_forward": round(res.tokens_per_forward, 4)}


class Guard:
    """Refuses oversized bodies (by Content-Length; the body itself is bounded by the request models)
    and, with an API key, unauthenticated /v1/ calls. Plain ASGI rather than Starlette's
    BaseHTTPMiddleware, which hides client disconnects from the handlers behind it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None) -> None:
        self.app, self.max_body_bytes, self.api_key = app, max_body_bytes, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                response = error_response(413, f"request body larger than {self.max_body_bytes} bytes",
                                          "invalid_request_error")
                return await response(scope, receive, send)
            if self.api_key is not None and scope["path"].startswith("/v1/"):
                given = headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    response = error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                              "authentication_error")
                    return await response(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, default_mode: str = "ar",
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="trimode", docs_url=None, redoc_url=None)
    app.state.engine = engine

    app.add_middleware(Guard, max_body_bytes=max_body_bytes, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            message, param = "the body is not valid JSON (or not UTF-8)", None
        elif err.get("type") == "extra_forbidden":
            message = f"unknown field `{param}`"
        elif param:
            message = f"`{param}`: {message}"
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": engine.engine.num_running, "waiting": engine.engine.num_waiting}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(engine.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "trimode"}]}

    async def start(body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], prefix: str
                    ) -> tuple[str, AsyncIterator[RequestOutput]]:
        if body.model != model_name:
            raise APIError(404, f"model `{body.model}` does not exist; this server serves `{model_name}`",
                           "invalid_request_error", "model")
        try:
            params = body.sampling_params(default_mode)
            request_id = engine.new_request_id(prefix)
            return request_id, engine.submit(request_id, prompt_ids, params)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"}) from e
        except ValueError as e:
            raise APIError(400, str(e), "invalid_request_error") from e

    def tokenize(fn: Any, *args: Any) -> list[int]:
        try:
            return fn(*args)
        except ValueError as e:
            raise APIError(400, str(e), "invalid_request_error") from e

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        ids = tokenize(engine.engine.llm.tokenizer.encode, body.prompt)
        request_id, outputs = await start(body, ids, "cmpl")
        return await respond(body, request_id, outputs, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request) -> Any:
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        ids = tokenize(engine.engine.llm.tokenizer.encode_chat, messages)
        request_id, outputs = await start(body, ids, "chatcmpl")
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

    async def respond(body: CompletionRequest | ChatCompletionRequest, request_id: str,
                      outputs: AsyncIterator[RequestOutput], http: Request, chat: bool) -> Any:
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(request_id, created, outputs, chat, include_usage),
                                     media_type="text/event-stream")
        try:
            final = await collect(outputs, http)
        except ValueError as e:
            raise APIError(400, str(e), "invalid_request_error") from e
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"}) from e
        if final is None:  # nobody is listening; the status is for the access log only
            return Response(status_code=499)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": final.text},
                      "finish_reason": final.finish_reason}
        else:
            choice = {"index": 0, "text": final.text, "logprobs": None, "finish_reason": final.finish_reason}
        return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": usage(final)}

    async def sse(request_id: str, created: int, outputs: AsyncIterator[RequestOutput], chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else \
                    ({"content": text} if text else {})
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
                    yield chunk(None, out.output.finish_reason)
                    if include_usage:
                        doc = {"id": request_id, "object": kind, "created": created, "model": model_name,
                               "choices": [], "usage": usage(out.output)}
                        yield f"data: {json.dumps(doc)}\n\n"
        except (ValueError, QueueFull, RuntimeError) as e:
            err = {"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": 400}}
            yield f"data: {json.dumps(err)}\n\n"
        yield "data: [DONE]\n\n"

    return app
