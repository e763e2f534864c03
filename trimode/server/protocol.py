"""Request bodies of the OpenAI API as trimode accepts them. Unknown fields and unsupported values
are refused with a message naming the field, never silently ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trimode.sampling_params import MODES, SamplingParams

MAX_TOKENS_LIMIT = 4096
UNSUPPORTED = {  # field -> the only value trimode accepts
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None,), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)
    name: str | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
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
        return stops

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
            mode=self.mode or default_mode, max_tokens=self.max_completion_tokens or self.max_tokens or 128,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=self.stop,
            ignore_eos=self.ignore_eos, block_length=self.block_length or 32,
            threshold=0.9 if self.threshold is None else self.threshold)


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(...)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give exactly one prompt (batching is done by the server)")
            v = v[0]
        if not v or len(v) > 200_000:
            raise ValueError("prompt must be a non-empty string of at most 200000 characters")
        return v


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=256)
