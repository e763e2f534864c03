"""A tool-call format: how a model writes calls in its text, read back as OpenAI `tool_calls`, and
the grammar that makes a model write them (`tool_choice` "required" or a named function).

A parser reads the markup after its `start` string; the text before it is the message's content.
Malformed markup is content: the answer is never lost and never an error. `ToolStream` streams the
same result: content until `start` could begin (a possible prefix of it is held back, so markup
never leaks into content), then each call once it parses whole, as a name delta and then its
arguments; whatever cannot be parsed when the stream ends goes out as content.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

# OpenAI's rule for function names.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def message(self) -> dict[str, Any]:
        """The call as an assistant message's `tool_calls` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_call(name: object, arguments: object) -> ToolCall | None:
    """A call from a parsed name and arguments (an object, or JSON text of one); None if malformed."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not NAME.fullmatch(name) or not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def json_value(text: str) -> tuple[Any, str] | None:
    """The JSON value `text` starts with (after whitespace) and the text after it; None if none."""
    stripped = text.lstrip()
    try:
        value, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        return None
    return value, stripped[end:]


def function_name(tool: dict[str, Any]) -> str:
    """A request's tool's function name (the request validated its shape)."""
    return tool["function"]["name"]


def arguments_rule(index: int, tool: dict[str, Any]) -> str:
    """The Lark rule `args_<index>`: JSON matching the tool's `parameters` schema (any object
    without one), closed: an object whose schema lists its properties gets no others unless the
    schema says so. JSON Schema allows extra properties by default, and a forced model left that
    freedom (measured on the embedded model with a Pydantic schema) invents keys until max_tokens."""
    return f"args_{index}: %json {json.dumps(closed(tool['function'].get('parameters') or {'type': 'object'}))}"


def closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` wherever it lists `properties` and says nothing
    of others, at every depth (through properties, $defs, items, anyOf and the like)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalItems", "additionalProperties", "contains", "not", "if", "then", "else"):
        if key in out:
            out[key] = closed(out[key])
    for key in ("anyOf", "allOf", "oneOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def lark_string(text: str) -> str:
    """`text` as a Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text)


class ToolParser(ABC):
    name: str
    start: str  # the markup that opens the calls

    def parse(self, text: str, truncated: bool = False) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole answer: the text before `start` and the calls after it; the
        whole text and no calls when there is no markup, or when any of it is malformed. A
        `truncated` answer (max_tokens) keeps its whole calls and drops the call it was cut in."""
        at = text.find(self.start)
        if at < 0:
            return text, []
        calls, rest = self.calls(text[at:])
        if not calls or (rest.strip() and not truncated):
            return text, []
        return text[:at], calls

    def calls(self, markup: str) -> tuple[list[ToolCall], str]:
        """The whole calls `markup` (which begins with `start`) starts with, and the text after them:
        one `call` after each `start`, whitespace allowed between a call and the next `start`."""
        calls: list[ToolCall] = []
        while markup.startswith(self.start):
            one = self.call(markup[len(self.start) :])
            if one is None:
                break
            calls.append(one[0])
            markup = one[1].lstrip() if one[1].lstrip().startswith(self.start) else one[1]
        return calls, markup

    @abstractmethod
    def call(self, body: str) -> tuple[ToolCall, str] | None:
        """The whole call `body` (the text after one `start`) begins with, and the text after it;
        None if it begins with none."""

    @abstractmethod
    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) for one call of one of `tools`, whose arguments
        match its schema, or for one or more when `parallel`."""

    @staticmethod
    def alternatives(calls: list[str], parallel: bool) -> str:
        """`start` over per-tool call rules."""
        rules = "\n".join(calls)
        choice = " | ".join(f"call_{i}" for i in range(len(calls)))
        return f"start: call{'+' if parallel else ''}\ncall: {choice}\n{rules}\n"


@dataclass
class Delta:
    """What one step of a stream adds: content text, and tool-call deltas in OpenAI's shape."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class ToolStream:
    """One streamed choice's text split into content and tool-call deltas as it grows."""

    def __init__(self, parser: ToolParser, limit: int | None = None) -> None:
        """`limit`: the most calls to send (1 for parallel_tool_calls=false); later ones are read
        and dropped, as a whole answer's are."""
        self.parser = parser
        self.limit = limit
        self.text = ""
        self.sent = 0  # characters of `text` sent, as content or as calls
        self.calls = 0  # calls read

    def feed(self, delta: str) -> Delta:
        self.text += delta
        start = self.parser.start
        at = self.text.find(start, self.sent)
        if at < 0 and self.calls == 0:
            # Hold back an end of the text that could begin `start`.
            keep = next(
                (k for k in range(min(len(start) - 1, len(self.text)), 0, -1) if start.startswith(self.text[-k:])), 0
            )
            content = self.text[self.sent : len(self.text) - keep]
            self.sent += len(content)
            return Delta(content=content)
        out = Delta(content=self.text[self.sent : at] if at >= 0 and self.calls == 0 else "")
        if at >= 0:
            self.sent = max(self.sent, at)
        calls, rest = self.parser.calls(self.text[self.sent :])
        for call in calls:
            index, self.calls = self.calls, self.calls + 1
            if self.limit is None or index < self.limit:
                out.tool_calls += deltas(call, index)
        if calls:
            self.sent = len(self.text) - len(rest)
        return out

    def finish(self, truncated: bool = False) -> Delta:
        """The end of the stream: what was held back, as content (after calls in a `truncated`
        answer, dropped: the call it was cut in)."""
        out = Delta(content="" if truncated and self.calls else self.text[self.sent :])
        self.sent = len(self.text)
        return out


def deltas(call: ToolCall, index: int) -> list[dict[str, Any]]:
    """A call as two stream deltas: its id and name, then its arguments."""
    head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    return [head, {"index": index, "function": {"arguments": call.arguments}}]
