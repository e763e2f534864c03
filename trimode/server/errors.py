"""What a client is told when a request fails: OpenAI's error shape, as a response or as the last
event of a stream that has begun, and the handlers that give every failure that shape."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trimode.engine.scheduler import QueueFull
from trimode.engine.tp_workers import WorkerDead
from trimode.server.async_engine import EngineError, ShuttingDown
from trimode.server.guard import error_response

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


def install_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error shape: a 400 naming the field for a request that does not
    validate, the APIError's own status, and a 500 that names only the exception's type."""

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
