"""The OpenAI-compatible HTTP adapter: /v1/models, /v1/completions, /v1/chat/completions, and
vLLM's /tokenize, /detokenize, /version, with /health and /metrics. Thin: the app is the guard,
the error handlers and one router per endpoint family (`routes/`) over a shared `Service`;
generation is the engine's."""

from __future__ import annotations

import random
from typing import Any

from fastapi import FastAPI

from trimode.server.async_engine import AsyncEngine
from trimode.server.errors import install_error_handlers
from trimode.server.guard import Guard
from trimode.server.logprobs import MAX_LOGPROB_ENTRIES
from trimode.server.routes import completions, models, system
from trimode.server.service import STALL_S, Service
from trimode.server.tool_parsers import ToolParser

MAX_BODY_BYTES = 1_000_000


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
    service = Service(
        engine,
        names,
        default_mode,
        stall_s,
        random.Random(seed) if seed is not None else None,
        generation_defaults,
        max_logprob_entries,
        tool_parser,
        auto_tool_choice,
    )
    # No automatic trailing-slash redirect: Starlette builds its Location from the client's Host
    # header. The OpenAPI schema and docs pages are off unless asked for.
    app = FastAPI(
        title="trimode",
        redirect_slashes=False,
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url=None,
    )

    app.add_middleware(
        Guard, max_body_bytes=max_body_bytes, api_key=api_key, metrics=engine.metrics, access_log=access_log
    )

    install_error_handlers(app)
    for family in (system, models, completions):
        app.include_router(family.router(service))
    return app
