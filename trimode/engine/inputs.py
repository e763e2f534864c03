"""What a request's prompt may be, and how it becomes token ids: a string, token ids, a prompt dict
(vLLM's `{"prompt": text}` / `{"prompt_token_ids": ids}`), or a chat."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from trimode.sampling_params import SamplingParams
from trimode.tokenizer import Tokenizer

PromptInput = str | Sequence[int] | dict[str, Any]
Message = dict[str, Any]
# Message fields a chat template may read besides role and content (tool calls and their results).
MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id"}
ROLES = ("system", "developer", "user", "assistant", "tool")


def is_chat(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def chat_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """OpenAI chat messages as the chat template reads them: content as one string (text parts
    joined by newlines, as vLLM does; None, an assistant turn that only calls tools, as ""), and
    `developer`, which OpenAI defines as the system turn of newer models, as `system`."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} must be a dict with a 'role' and a 'content'; got {m!r:.60}")
        unknown = set(m) - MESSAGE_FIELDS
        if unknown:
            raise ValueError(f"message {i} has fields trimode does not take: {sorted(unknown)}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        out.append(
            {
                **{k: v for k, v in m.items() if v is not None},
                "role": "system" if m["role"] == "developer" else m["role"],
                "content": message_text(m.get("content"), f"message {i}"),
            }
        )
    return out


def message_text(content: object, name: str) -> str:
    """A message's content as text: a string, None, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(f"{name}: content must be a string or a list of content parts; got {content!r:.60}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"content parts of type {kind!r}" if kind else f"the content part {part!r:.40}"
            raise ValueError(f"{name}: {what} are not supported (this model reads text): send text parts")
        texts.append(part["text"])
    return "\n".join(texts)


def tokenize_prompt(
    tokenizer: Tokenizer,
    vocab_size: int,
    prompt: PromptInput | list[Message],
    name: str = "the prompt",
    add_special_tokens: bool = True,
) -> tuple[list[int], str | None]:
    """(token ids, prompt text) of a string, a list of token ids, a prompt dict, or a chat (list of
    messages, rendered with the chat template; see `chat_messages` and `Tokenizer.encode_chat`).
    `add_special_tokens`: whether a text prompt gets the tokenizer's BOS (a text already rendered
    by a chat template has its own)."""
    if is_chat(prompt):
        messages = chat_messages(prompt)  # type: ignore[arg-type]
        return tokenizer.encode_chat(messages), tokenizer.apply_chat_template(messages)
    if isinstance(prompt, dict):
        prompt = _prompt_of(prompt, name)
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{name} is empty: give at least one character")
        return tokenizer.encode(prompt, add_special_tokens=add_special_tokens), prompt
    if isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = cast(list[int], list(prompt))
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} has token ids outside [0, {vocab_size}): {bad[:5]}")
        return ids, None
    raise ValueError(
        f"{name} must be a non-empty string, a non-empty list of token ids, {{'prompt': text}} or "
        f"{{'prompt_token_ids': ids}}; got {prompt!r:.60}"
    )


def _prompt_of(prompt: dict[str, Any], name: str) -> str | list[int]:
    """vLLM's TextPrompt / TokensPrompt: the text or the ids it holds."""
    keys = set(prompt)
    if keys == {"prompt"} and isinstance(prompt["prompt"], str):
        return prompt["prompt"]
    if keys == {"prompt_token_ids"} and isinstance(prompt["prompt_token_ids"], list):
        return prompt["prompt_token_ids"]
    raise ValueError(
        f"{name} is a dict with keys {sorted(keys)}: give exactly {{'prompt': text}} or "
        "{'prompt_token_ids': [ids]} (trimode takes no multi-modal data)"
    )


def check_fits(ids: list[int], params: SamplingParams, max_model_len: int, name: str = "the prompt") -> None:
    if len(ids) + params.max_tokens > max_model_len:
        raise ValueError(
            f"{name} has {len(ids)} tokens and max_tokens is {params.max_tokens}: together they "
            f"exceed the context of {max_model_len} tokens; shorten the prompt or lower "
            f"max_tokens to <= {max(max_model_len - len(ids), 0)}"
        )
