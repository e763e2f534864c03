"""What a request's prompt may be, and how it becomes token ids: a string, token ids, or a chat."""

from __future__ import annotations

from collections.abc import Sequence

from trimode.sampling_params import SamplingParams
from trimode.tokenizer import Tokenizer

PromptInput = str | Sequence[int]
Message = dict[str, str]


def is_chat(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def tokenize_prompt(
    tokenizer: Tokenizer, vocab_size: int, prompt: PromptInput | list[Message], name: str = "the prompt"
) -> tuple[list[int], str | None]:
    """(token ids, prompt text) of a string, a list of token ids, or a chat (list of messages,
    rendered with the chat template; message content is text, see `Tokenizer.encode_chat`)."""
    if is_chat(prompt):
        return tokenizer.encode_chat(prompt), tokenizer.apply_chat_template(prompt)  # type: ignore[arg-type]
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{name} is empty: give at least one character")
        return tokenizer.encode(prompt), prompt
    if isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} has token ids outside [0, {vocab_size}): {bad[:5]}")
        return list(prompt), None
    raise ValueError(f"{name} must be a non-empty string or a non-empty list of token ids; got {prompt!r:.60}")


def check_fits(ids: list[int], params: SamplingParams, max_model_len: int, name: str = "the prompt") -> None:
    if len(ids) + params.max_tokens > max_model_len:
        raise ValueError(
            f"{name} has {len(ids)} tokens and max_tokens is {params.max_tokens}: together they "
            f"exceed the context of {max_model_len} tokens; shorten the prompt or lower "
            f"max_tokens to <= {max(max_model_len - len(ids), 0)}"
        )
