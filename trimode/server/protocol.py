"""Request bodies of the OpenAI API as trimode accepts them. Unknown fields are accepted and
ignored, as vLLM does: clients (SDK upgrades, agent frameworks, proxies) send fields a server does
not know. The server names them in a log line and a response header (`ignored_fields`). Unknown
fields that change what the answer must be (`REFUSED_FIELDS`) and unsupported values are refused
with a message naming the field. Types are strict: `true`, `1.0` or `"1"` is not an integer, a
number is not text."""

from __future__ import annotations

from typing import Any, Literal, cast

from jinja2.defaults import DEFAULT_NAMESPACE
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from trimode.engine.inputs import chat_messages, message_text
from trimode.sampling_params import MAX_LOGPROBS, MAX_N, MAX_TOP_K, REQUEST_MODES, SEED_RANGE, SamplingParams
from trimode.server.tool_parsers.base import NAME

MAX_TOKENS_LIMIT = 4096
MAX_PROMPT_CHARS = 200_000  # a completion prompt, or all the messages of a chat together
MAX_PROMPTS = 128  # prompts in one completions request (each is a request of its own to the engine)
MAX_STOPS = 64  # stop strings per request, each at most 256 characters
UNSUPPORTED = {  # field -> the only values trimode accepts
    "best_of": (None, 1),
    "suffix": (None, ""),
}
# Names a chat template reads that chat_template_kwargs may not set: the server's template, the
# engine's own variables, and the globals of the template environment (jinja's defaults and
# tokenizer.py's raise_exception), which a variable of the same name would shadow.
RESERVED_TEMPLATE_NAMES = frozenset(
    {"chat_template", "add_generation_prompt", "messages", "bos_token", "tools", "raise_exception", *DEFAULT_NAMESPACE}
)


def _unicode(text: str, what: str) -> str:
    """JSON can carry lone surrogates (`"\\ud800"`), which are not text and no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} holds a lone UTF-16 surrogate at character {e.start}: send valid Unicode text"
        ) from None
    return text


def _function_name(name: object) -> bool:
    return isinstance(name, str) and NAME.fullmatch(name) is not None


def _is_ids(v: object) -> bool:
    return isinstance(v, list) and all(type(t) is int for t in v)  # bool is an int to isinstance


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


# Unknown fields trimode cannot ignore: each asks for an answer of another kind than it gives.
REFUSED_FIELDS = {
    "functions": "the legacy function-calling API: send `tools` instead",
    "function_call": "the legacy function-calling API: send `tool_choice` instead",
    "audio": "trimode answers in text only",
    "modalities": "trimode answers in text only",
    "web_search_options": "trimode does not search the web",
}


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Request messages as the chat template reads them (`inputs.chat_messages`), without fields
    trimode does not know."""
    return chat_messages([m.model_dump(exclude_none=True, exclude=set(m.model_extra or {})) for m in messages])


def ignored_fields(body: BaseModel) -> list[str]:
    """The fields of a request trimode does not know (a message's as `messages.NAME`), which it
    ignores; ValueError naming the first that would change the answer (REFUSED_FIELDS)."""
    names = list(body.model_extra or {})
    for m in getattr(body, "messages", None) or []:
        names += [f"messages.{k}" for k in m.model_extra or {} if f"messages.{k}" not in names]
    for name in names:
        if name in REFUSED_FIELDS:
            raise ValueError(f"`{name}` is not supported: {REFUSED_FIELDS[name]}")
    return names


class Message(BaseModel):
    """An OpenAI chat message. Content is text or a list of text parts (`inputs.message_text`);
    tool calls and results reach the chat template as they are."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=128)  # before content, which reads it
    content: str | list[dict[str, Any]] | None = Field(None, validate_default=True)
    name: str | None = Field(None, max_length=256)
    tool_call_id: str | None = Field(None, max_length=256)

    @field_validator("content")
    @classmethod
    def _text(cls, v: str | list[dict[str, Any]] | None, info: ValidationInfo) -> str:
        # As OpenAI: only an assistant turn that calls tools may leave its content null or out.
        if v is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError(
                "give the message's content: a string or a list of text parts (only an assistant "
                "message with tool_calls may leave it null)"
            )
        text = message_text(v, "the content")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"the content holds {len(text)} characters; at most {MAX_PROMPT_CHARS}")
        return _unicode(text, "the content")


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)  # 0: score the prompt only (echo)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(1, ge=1, le=MAX_N)  # samples per prompt: choices i * n .. i * n + n - 1 for prompt i
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)  # token id (as a string) -> bias
    # vLLM's sampling extras (clients send them through extra_body)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    min_p: float = Field(0.0, ge=0, le=1)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOPS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # Whether a text prompt gets the tokenizer's BOS (vLLM's field): off for text a chat template
    # has already rendered, BOS included. Defaults differ by endpoint, as in vLLM.
    add_special_tokens: bool = True
    # What OpenAI SDKs and agent frameworks send that changes nothing here: accepted and ignored.
    store: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    service_tier: str | None = Field(None, max_length=64)
    # trimode's own fields (OpenAI clients send them through extra_body)
    mode: str | None = None
    block_length: int | None = Field(None, ge=1, le=256)
    spec: Literal["linear", "quadratic"] | None = None  # self-spec: one draft pass per verify, or one pass
    threshold: float | None = Field(None, ge=0, le=1)
    auto_lossy: bool = False  # mode auto may pick diffusion too
    ignore_eos: bool = False
    # Structured output: OpenAI's response_format ({"type": "text" | "json_object" | "json_schema",
    # "json_schema": {"schema": ...}}), or vLLM's guided_* fields / structured_outputs in extra_body.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, max_length=10_000)
    guided_choice: list[str] | None = Field(None, max_length=1024)
    guided_grammar: str | None = Field(None, max_length=100_000)
    structured_outputs: dict[str, Any] | None = None
    # OpenAI fields trimode does not implement: accepted only at their no-op values
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > 256 for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings of at most 256 characters")
        return [_unicode(s, "a stop string") for s in stops]

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        # int() would also read " 5", "\u0665" (Arabic-Indic 5) and "1_0": a token id is ASCII digits.
        bad = next((k for k in v or {} if not (k.isascii() and k.isdigit())), None)
        if bad is not None:
            raise ValueError(f'keys must be token ids written in the digits 0-9, e.g. {{"42": -100}}; got {bad!r}')
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str | None) -> str | None:
        if v is not None and v not in REQUEST_MODES:
            raise ValueError(f"mode must be one of {', '.join(REQUEST_MODES)}")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> _Common:
        for name, allowed in UNSUPPORTED.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` is not supported by trimode; leave it unset")
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` needs stream=true")
        return self

    def sampling_params(self, default_mode: str, defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The request's SamplingParams; `defaults` (the server's `--generation-config`: temperature,
        top_p, top_k, max_tokens) stand in for the fields the request leaves unset."""
        d = defaults or {}

        def unset_or(name: str) -> Any:
            return getattr(self, name) if name in self.model_fields_set else d.get(name, getattr(self, name))

        logprobs, prompt_logprobs = self.logprob_counts()
        asked = next((n for n in (self.max_completion_tokens, self.max_tokens) if n is not None), None)
        if asked == 0 and prompt_logprobs is None:
            raise ValueError("max_tokens 0 only scores a prompt: it needs echo=true and logprobs (completions)")
        return SamplingParams(
            mode=self.mode or default_mode,
            max_tokens=d.get("max_tokens", 128) if asked is None else asked,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            temperature=unset_or("temperature"),
            top_p=unset_or("top_p"),
            top_k=unset_or("top_k"),
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            **self._mode_knobs(),
            auto_lossy=self.auto_lossy,
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=self._logit_bias(),
            min_tokens=self.min_tokens,
            min_p=self.min_p,
            stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            structured=self._structured(),
        )

    def _mode_knobs(self) -> dict[str, Any]:
        """The block modes' knobs the request sets; SamplingParams' defaults stand for the rest."""
        knobs = {"block_length": self.block_length, "spec": self.spec, "threshold": self.threshold}
        return {k: v for k, v in knobs.items() if v is not None}

    def _structured(self) -> dict[str, Any] | None:
        """SamplingParams.structured from whichever way the request asks (at most one)."""
        asked: list[dict[str, Any]] = []
        fmt = self.response_format or {"type": "text"}
        kind = fmt.get("type")
        if kind == "json_object":
            asked.append({"json_object": True})
        elif kind == "json_schema":
            named = fmt.get("json_schema")
            schema = named.get("schema") if isinstance(named, dict) else None
            if not isinstance(schema, dict):
                raise ValueError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
            asked.append({"json": schema})
        elif kind != "text":
            raise ValueError("response_format type must be text, json_object or json_schema")
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice")):
            if getattr(self, name) is not None:
                asked.append({key: getattr(self, name)})
        if self.guided_grammar is not None:
            asked.append({"grammar": self.guided_grammar})
        if self.structured_outputs:
            asked.append(dict(self.structured_outputs))
        if len(asked) > 1:
            raise ValueError("ask for one structured output: response_format, a guided_* field or structured_outputs")
        return asked[0] if asked else None

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's logit_bias (token ids as JSON object keys) with integer keys."""
        return {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(SamplingParams.logprobs, .prompt_logprobs) the request asks for."""
        return None, None


class CompletionRequest(_Common):
    # One prompt or a list: text, token ids, or a list of either (lm-evaluation-harness sends ids).
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the top k at each position, with the chosen
    echo: bool = False  # the prompt first in the text (and its logprobs, with `logprobs`)

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    @field_validator("prompt", mode="before")
    @classmethod
    def _kinds(cls, v: object) -> object:
        """One clear message for a prompt of the wrong type (pydantic's names a member of the union)."""
        several = isinstance(v, list) and (all(isinstance(p, str) for p in v) or all(_is_ids(p) for p in v))
        if not (isinstance(v, str) or _is_ids(v) or several):
            raise ValueError(
                "a prompt is a string or a list of token ids (integers); several prompts, a list of either"
            )
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """`prompt` as its validator leaves it: every prompt, in order."""
        return cast(list[str | list[int]], self.prompt)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
        """Every prompt of the request, in order: text or token ids (their range is checked
        against the vocabulary when they are tokenized)."""
        prompts: list[Any] = [v] if isinstance(v, str) or (v and all(isinstance(t, int) for t in v)) else list(v)
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts; got {len(prompts)}")
        for i, p in enumerate(prompts):
            if not p or len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt {i} must be non-empty and at most {MAX_PROMPT_CHARS} characters or tokens")
            if isinstance(p, str):
                _unicode(p, f"prompt {i}")
        return prompts


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=256)
    add_special_tokens: bool = False  # the chat template writes BOS itself
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)  # passed to the chat template
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(None, max_length=16)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def logprob_counts(self) -> tuple[int | None, int | None]:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None, None

    @field_validator("messages")
    @classmethod
    def _total(cls, v: list[Message]) -> list[Message]:
        total = sum(len(m.content or "") for m in v)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold {total} characters together; at most {MAX_PROMPT_CHARS}")
        return v

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(set(v or {}) & RESERVED_TEMPLATE_NAMES)
        if taken:
            raise ValueError(f"chat_template_kwargs may not set {taken}")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(v or []):
            fn = tool.get("function")
            if tool.get("type") != "function" or not isinstance(fn, dict) or not _function_name(fn.get("name")):
                raise ValueError(
                    f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": {{...}}}}}}, '
                    "its name 1 to 64 letters, digits, _ . or -"
                )
            if not isinstance(fn.get("parameters", {}), dict):
                raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: str | dict | None) -> str | dict | None:
        if v in (None, "none", "auto", "required"):
            return v
        fn = v.get("function") if isinstance(v, dict) else None
        if (
            isinstance(v, dict)
            and v.get("type") == "function"
            and isinstance(fn, dict)
            and _function_name(fn.get("name"))
        ):
            return v
        raise ValueError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        )

    @model_validator(mode="after")
    def _chosen_tool_exists(self) -> ChatCompletionRequest:
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, dict)
        if forced and not self.tools:
            raise ValueError("tool_choice 'required' or a named function needs `tools`")
        if isinstance(self.tool_choice, dict) and not self.forced_tools():
            raise ValueError(
                f"tool_choice names {self.tool_choice['function']['name']!r}, which is not among the tools"
            )
        return self

    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The tools the answer must call (tool_choice "required": any of them; a named function:
        that one); None when the model may answer in text."""
        if self.tool_choice == "required":
            return self.tools
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return [t for t in self.tools or [] if t["function"]["name"] == name]
        return None

    def chat(self) -> list[dict[str, Any]]:
        return template_messages(self.messages)

    def template_kwargs(self) -> dict[str, Any]:
        """The chat template's variables: `chat_template_kwargs`, and `tools` when given."""
        return {**(self.chat_template_kwargs or {}), **({"tools": self.tools} if self.tools else {})}


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give `prompt` or `messages`, one of them")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_PROMPT_CHARS)
