"""Request bodies of the OpenAI API as trimode accepts them. Unknown fields and unsupported values
are refused with a message naming the field, never silently ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trimode.sampling_params import MAX_TOP_K, MODES, SEED_RANGE, SamplingParams

MAX_TOKENS_LIMIT = 4096
MAX_PROMPT_CHARS = 200_000  # a completion prompt, or all the messages of a chat together
UNSUPPORTED = {  # field -> the only value trimode accepts
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


def _unicode(text: str, what: str) -> str:
    """JSON can carry lone surrogates (`"\\ud800"`), which are not text and no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} holds a lone UTF-16 surrogate at character {e.start}: send valid Unicode text"
        ) from None
    return text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)
    name: str | None = Field(None, max_length=256)

    @field_validator("content")
    @classmethod
    def _text(cls, v: str) -> str:
        return _unicode(v, "the content")


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # trimode's own fields (OpenAI clients send them through extra_body)
    mode: str | None = None
    block_length: int | None = Field(None, ge=1, le=256)
    threshold: float | None = Field(None, ge=0, le=1)
    ignore_eos: bool = False
    # OpenAI fields trimode does not implement: accepted only at their no-op values
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings of at most 256 characters")
        return [_unicode(s, "a stop string") for s in stops]

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str | None) -> str | None:
        if v is not None and v not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> _Common:
        for name, allowed in UNSUPPORTED.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` is not supported by trimode; leave it unset")
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` needs stream=true")
        return self

    def sampling_params(self, default_mode: str) -> SamplingParams:
        return SamplingParams(
            mode=self.mode or default_mode,
            max_tokens=self.max_completion_tokens or self.max_tokens or 128,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            block_length=self.block_length or 32,
            threshold=0.9 if self.threshold is None else self.threshold,
        )


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(...)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give exactly one prompt (batching is done by the server)")
            v = v[0]
        if not v or len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt must be a non-empty string of at most {MAX_PROMPT_CHARS} characters")
        return _unicode(v, "the prompt")


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=256)

    @field_validator("messages")
    @classmethod
    def _total(cls, v: list[Message]) -> list[Message]:
        total = sum(len(m.content) for m in v)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold {total} characters together; at most {MAX_PROMPT_CHARS}")
        return v
