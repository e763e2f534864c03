"""/v1/completions and /v1/chat/completions: validate, tokenize, hand the requests to the engine
(`Service.start`) and answer (`answers.respond`), whole or streamed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from trimode.engine.inputs import tokenize_prompt
from trimode.server.answers import respond
from trimode.server.errors import APIError
from trimode.server.protocol import ChatCompletionRequest, CompletionRequest
from trimode.server.service import Service, flag_ignored


def router(service: Service) -> APIRouter:
    routes = APIRouter()
    tokenizer, vocab_size = service.tokenizer, service.config.vocab_size

    @routes.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        service.check_model(body.model)
        ignored = service.ignore_unknown(body)
        many = len(body.prompts) > 1

        def prepare(i: int, prompt: str | list[int]) -> Callable[[], list[int]]:
            name = f"prompt {i}" if many else "the prompt"
            return lambda: tokenize_prompt(tokenizer, vocab_size, prompt, name, body.add_special_tokens)[0]

        request_id, streams = await service.start(body, [prepare(i, p) for i, p in enumerate(body.prompts)], "cmpl")
        echo = None
        if body.echo:  # each choice's text begins with its prompt's
            texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompts]
            echo = [t for t in texts for _ in range(body.n)]
        return flag_ignored(await respond(service, body, request_id, streams, http, echo=echo), ignored)

    @routes.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request) -> Any:
        service.check_model(body.model)
        ignored = service.ignore_unknown(body)

        def prepare() -> list[int]:
            return service.chat_ids(body.chat(), body.add_special_tokens, **body.template_kwargs())

        parser, forced, structured = service.tool_parser, body.forced_tools(), None
        if forced is not None:
            if parser is None:
                raise APIError(
                    400,
                    "tool_choice 'required' or a named function needs a server started with --tool-call-parser NAME "
                    "(the model's tool-call format)",
                    "invalid_request_error",
                    "tool_choice",
                )
            structured = {"grammar": parser.grammar(forced, body.parallel_tool_calls is not False)}
        reads_calls = forced is not None or (service.auto_tool_choice and body.tool_choice in (None, "auto"))
        tools = parser if body.tools and reads_calls else None
        request_id, streams = await service.start(body, [prepare], "chatcmpl", structured)
        return flag_ignored(await respond(service, body, request_id, streams, http, tools=tools), ignored)

    return routes
