"""/v1/models and vLLM's /tokenize and /detokenize: what the server serves and how it reads text."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from trimode.engine.inputs import tokenize_prompt
from trimode.server.errors import APIError
from trimode.server.protocol import DetokenizeRequest, TokenizeRequest, template_messages
from trimode.server.service import Service


def router(service: Service) -> APIRouter:
    routes = APIRouter()
    engine, tokenizer, vocab_size = service.engine, service.tokenizer, service.config.vocab_size

    @routes.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [service.card(n) for n in service.names]}

    @routes.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        service.check_model(name)
        return service.card(name)

    @routes.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        service.check_model(body.model)

        def ids() -> list[int]:
            if body.messages is not None:
                chat = template_messages(body.messages)
                add_bos = bool(body.add_special_tokens)
                return service.chat_ids(chat, add_bos, add_generation_prompt=body.add_generation_prompt)
            special = body.add_special_tokens is not False
            prompt = body.prompt or ""  # set: the request validates that one of prompt and messages is
            return tokenize_prompt(tokenizer, vocab_size, prompt, add_special_tokens=special)[0]

        try:
            tokens = await engine.run_blocking(ids)
        except ValueError as e:
            raise APIError.of(e) from e
        return {"count": len(tokens), "max_model_len": engine.engine.max_model_len, "tokens": tokens}

    @routes.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        service.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"tokens outside [0, {vocab_size}): {bad[:5]}", "invalid_request_error")
        return {"prompt": await engine.run_blocking(tokenizer.decode, body.tokens)}

    return routes
