"""The ASGI layer in front of every route: API key, a body size bound counted as the bytes arrive,
failure metrics by status, and an access log line per request.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which hides client disconnects from the
handlers behind it. The body is read here, up to the limit, whatever the transfer encoding: a
Content-Length over the limit is refused before reading, and a chunked body is refused with 413 the
moment its bytes pass the limit, so nothing past it is ever read or held. (The time a client may take
to send its request is bounded by the HTTP protocol, see http_server.py.)
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trimode.server.metrics import Metrics

access_logger = logging.getLogger("trimode.access")


def error_response(
    status: int, message: str, type_: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": status}},
        status_code=status,
        headers=headers,
    )


def authorized(header: str, api_key: str) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 9110 11.1), the key compared in
    constant time."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


class Guard:
    def __init__(
        self, app: ASGIApp, max_body_bytes: int, api_key: str | None, metrics: Metrics, access_log: bool = False
    ) -> None:
        self.app, self.max_body_bytes, self.api_key = app, max_body_bytes, api_key
        self.metrics, self.access_log = metrics, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, seen = time.perf_counter(), {"status": 0}

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, observed_send)
        finally:
            status = seen["status"]
            if status >= 400 and status != 499:  # 499: the client left; counted as an abort
                self.metrics.failed_status(status)
            if self.access_log:
                self._log(scope, status, time.perf_counter() - start)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        if (
            self.api_key is not None
            and (scope["path"].startswith("/v1/") or scope["path"] in ("/tokenize", "/detokenize"))
            and not authorized(headers.get("authorization", ""), self.api_key)
        ):
            response = error_response(
                401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"
            )
            return await response(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body: dict[str, Any] | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()  # after the body: disconnect notices, for the handlers

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body larger than {self.max_body_bytes} bytes", "invalid_request_error")
        await response(scope, receive, send)

    @staticmethod
    def _log(scope: Scope, status: int, seconds: float) -> None:
        """One line per request: who, what, outcome, tokens, latency. Never the prompt or the output."""
        client = scope.get("client")
        usage = scope.get("state", {}).get("usage") or {}
        access_logger.info(
            '%s "%s %s" %d prompt_tokens=%s completion_tokens=%s latency_ms=%.1f',
            f"{client[0]}:{client[1]}" if client else "-",
            scope["method"],
            scope["path"],
            status,
            usage.get("prompt_tokens", "-"),
            usage.get("completion_tokens", "-"),
            1000 * seconds,
        )
