"""Hermes' format (Qwen, Hermes and many ChatML templates): one
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` per call."""

from __future__ import annotations

from typing import Any

from trimode.server.tool_parsers.base import (
    ToolCall,
    ToolParser,
    arguments_rule,
    function_name,
    json_value,
    lark_string,
    tool_call,
)

END = "</tool_call>"


class HermesParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"

    def call(self, body: str) -> tuple[ToolCall, str] | None:
        parsed = json_value(body)
        if parsed is None or not isinstance(parsed[0], dict) or not parsed[1].lstrip().startswith(END):
            return None
        call = tool_call(parsed[0].get("name"), parsed[0].get("arguments"))
        return None if call is None else (call, parsed[1].lstrip()[len(END) :])

    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        rules = []
        for i, t in enumerate(tools):
            head = lark_string(f'{self.start}\n{{"name": "{function_name(t)}", "arguments": ')
            rules.append(f"call_{i}: {head} args_{i} {lark_string('}' + chr(10) + END)}\n{arguments_rule(i, t)}")
        return self.alternatives(rules, parallel)
