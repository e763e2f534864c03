"""Tool-call parsers (`trimode serve --enable-auto-tool-choice --tool-call-parser NAME`): one
format per file, registered here by name."""

from __future__ import annotations

from trimode.server.tool_parsers.base import Delta, ToolCall, ToolParser, ToolStream
from trimode.server.tool_parsers.hermes import HermesParser
from trimode.server.tool_parsers.mistral import MistralParser

PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (MistralParser, HermesParser)}


def tool_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"--tool-call-parser must be one of {', '.join(sorted(PARSERS))}; got {name!r}")
    return PARSERS[name]()


__all__ = ["PARSERS", "Delta", "ToolCall", "ToolParser", "ToolStream", "tool_parser"]
