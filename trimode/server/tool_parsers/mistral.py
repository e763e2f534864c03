"""Mistral's format, which NLD inherits from Ministral-3: `[TOOL_CALLS]name[ARGS]{json}` per call
(tokenizers v11 and later), or one `[TOOL_CALLS]` before a JSON array of
`{"name": ..., "arguments": {...}}` (earlier ones)."""

from __future__ import annotations

from typing import Any

from trimode.server.tool_parsers.base import (
    NAME,
    ToolCall,
    ToolParser,
    arguments_rule,
    function_name,
    json_value,
    lark_string,
    tool_call,
)

ARGS = "[ARGS]"


class MistralParser(ToolParser):
    name = "mistral"
    start = "[TOOL_CALLS]"

    def calls(self, markup: str) -> tuple[list[ToolCall], str]:
        body = markup[len(self.start) :]
        return self._array(markup, body) if body.lstrip().startswith("[") else super().calls(markup)

    def call(self, body: str) -> tuple[ToolCall, str] | None:
        name, sep, after = body.partition(ARGS)
        parsed = json_value(after) if sep and NAME.fullmatch(name) else None
        call = tool_call(name, parsed[0]) if parsed else None
        return None if parsed is None or call is None else (call, parsed[1])

    def _array(self, markup: str, body: str) -> tuple[list[ToolCall], str]:
        parsed = json_value(body)
        if parsed is None or not isinstance(parsed[0], list):
            return [], markup
        calls = [
            c
            for item in parsed[0]
            if isinstance(item, dict) and (c := tool_call(item.get("name"), item.get("arguments")))
        ]
        return (calls, parsed[1]) if len(calls) == len(parsed[0]) else ([], markup)

    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        rules = [
            f"call_{i}: {lark_string(self.start + function_name(t) + ARGS)} args_{i}\n{arguments_rule(i, t)}"
            for i, t in enumerate(tools)
        ]
        return self.alternatives(rules, parallel)
