"""An answer to /v1/completions or /v1/chat/completions from the engine's output streams: whole
(built off the event loop: with logprobs it can run to megabytes) or as server-sent events, with
choices, logprobs, echoed prompts, tool calls and usage in OpenAI's shapes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from trimode.outputs import GenerationOutput, RequestOutput
from trimode.server.errors import SERVING_ERRORS, APIError
from trimode.server.logprobs import chat_logprobs, completion_logprobs
from trimode.server.protocol import ChatCompletionRequest, CompletionRequest
from trimode.server.service import Body, Service, usage
from trimode.server.tool_parsers import Delta, ToolParser, ToolStream
from trimode.tokenizer import Tokenizer


def completion_choice(
    tokenizer: Tokenizer,
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


def chat_choice_logprobs(
    tokenizer: Tokenizer, body: ChatCompletionRequest, ids: list[int], positions: list | None
) -> Any:
    return chat_logprobs(tokenizer, ids, positions or [], body.top_logprobs or 0) if body.logprobs else None


async def respond(
    service: Service,
    body: Body,
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
            sse(service, body, request_id, created, streams, include_usage, http, echo, tools),
            media_type="text/event-stream",
        )
    try:
        finals = await service.collect(streams, http)
    except SERVING_ERRORS as e:
        raise APIError.of(e) from e
    if finals is None:  # nobody is listening; the status is for the access log only
        return Response(status_code=499)
    http.state.usage = usage(finals)
    # Built and serialised on a worker thread: with logprobs the answer can run to megabytes,
    # and the event loop serves /health and every stream meanwhile.
    return await service.engine.run_blocking(document, service, body, request_id, created, finals, echo, tools)


def document(
    service: Service,
    body: Body,
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
                    "logprobs": chat_choice_logprobs(service.tokenizer, body, f.token_ids, f.logprobs),
                    "finish_reason": finish,
                }
            )
    else:
        choices = [
            completion_choice(
                service.tokenizer,
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
        "model": service.model_name,
        "choices": choices,
        "usage": usage(finals),
    }
    return JSONResponse(doc)


async def sse(
    service: Service,
    body: Body,
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
                choice["logprobs"] = chat_choice_logprobs(service.tokenizer, body, ids, positions)
        else:
            prompt = None
            if first and echo is not None and out is not None:
                prompt = (echo[index], out.prompt_token_ids or [], out.prompt_logprobs)
            choice = completion_choice(
                service.tokenizer, body, index, text, ids, positions, finish, prompt, sent[index]
            )
            sent[index] += len(choice["text"])
        doc = {"id": request_id, "object": kind, "created": created, "model": service.model_name, "choices": [choice]}
        if include_usage:
            doc["usage"] = None
        return f"data: {json.dumps(doc)}\n\n"

    first = [True] * len(streams)
    finals: list[GenerationOutput] = []
    try:
        async for index, out in merged(streams):
            if out.delta_text or out.new_token_ids or first[index]:
                if first[index] and echo is not None:  # the prompt's logprobs: built off the loop
                    yield await service.engine.run_blocking(chunk, index, out, None, True)
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
                "model": service.model_name,
                "choices": [],
                "usage": usage(finals),
            }
            yield f"data: {json.dumps(doc)}\n\n"
    except SERVING_ERRORS as e:
        err = APIError.of(e)
        service.engine.metrics.failed_status(err.status)  # the stream's status (200) is already sent
        yield err.event()
    yield "data: [DONE]\n\n"


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
