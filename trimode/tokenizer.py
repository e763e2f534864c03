"""Tokenizer (`tokenizer.json` via the `tokenizers` library) and chat template (jinja2).

The one place the special tokens are named. Their ids live in the checkpoint's `config.json`
(bos, eos, mask) and must agree with `tokenizer.json`; `check_special_ids` enforces that.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
IM_START, IM_END, MASK = "<|im_start|>", "<|im_end|>", "<|mask|>"
THINK, END_THINK = "<think>", "</think>"

# Ids of our generated tokenizers, chosen to match the release's config.json (bos 1, eos 11,
# mask 100); a real checkpoint brings its own tokenizer and config, which we read, not assume.
SPECIAL_TOKEN_IDS = {UNK: 0, BOS: 1, EOS: 2, PAD: 3, THINK: 4, END_THINK: 5, IM_START: 10, IM_END: 11, MASK: 100}
NUM_RESERVED_IDS = 128  # ids [0, 128) are special; unnamed ones become <SPECIAL_i>

# ChatML with an empty system turn and reasoning off by default (the assistant turn then starts
# with an empty <think></think>), as the release's template does. Tools, assistant tool calls and
# tool results are written in Hermes' format (`--tool-call-parser hermes` reads the calls back): the
# tools as JSON lines in <tools> at the end of the system turn, each call in <tool_call>, each
# result as a user turn in <tool_response>. A chat without them renders as it always has.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% set tools_block %}{% if tools %}{% if messages[0]['role'] == 'system' %}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>{% endif %}{% endset %}"
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n{{ tools_block }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user, assistant or tool') }}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% if loop.first and message['role'] == 'system' %}{{ tools_block }}{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% if message['content'] or not loop.first %}\n{% endif %}"
    "<tool_call>\n{\"name\": \"{{ call['function']['name'] }}\", "
    "\"arguments\": {{ call['function']['arguments'] }}}\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% else %}<think></think>{% endif %}"
    "{% endif %}"
)


def _encode(tok: HFTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    # encode_batch, not encode: only the batch call releases the GIL while it works, and a server
    # tokenizing a 200k-character prompt on a worker thread must not freeze its event loop (~0.3 s).
    return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None, bos_token: str | None) -> None:
        self._tok = tokenizer
        # A copy that reads special-token text as plain text, for message content (see encode_chat).
        self._plain = HFTokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self._special_texts = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        self.bos_token = bos_token or ""
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._env.globals["raise_exception"] = _raise_exception
        self._compiled: dict[str, Template] = {}
        self._template = self._compile(chat_template) if chat_template else None

    def set_chat_template(self, chat_template: str) -> None:
        """Render chats with `chat_template` (Jinja) from now on, in place of the checkpoint's."""
        self._template = self._compile(chat_template)

    def _compile(self, chat_template: str) -> Template:
        """A chat template (Jinja, sandboxed) ready to render, compiled once per text."""
        if chat_template not in self._compiled:
            try:
                self._compiled[chat_template] = self._env.from_string(chat_template)
            except TemplateError as e:
                raise ValueError(f"the chat template does not parse: {e}") from e
        return self._compiled[chat_template]

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file, cfg_file = path / "tokenizer.json", path / "tokenizer_config.json"
        for f in (tok_file, cfg_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} is missing: a checkpoint directory needs tokenizer.json and tokenizer_config.json"
                )
        cfg = json.loads(cfg_file.read_text())
        bos = cfg.get("bos_token")
        if isinstance(bos, dict):  # AddedToken serialised as a dict
            bos = bos.get("content")
        return cls(HFTokenizer.from_file(str(tok_file)), cfg.get("chat_template"), bos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def check_special_ids(self, named: dict[str, int]) -> None:
        """Fail if config.json's special ids (e.g. {'mask_token_id': 100}) are outside the tokenizer."""
        for name, token_id in named.items():
            if self._tok.id_to_token(token_id) is None:
                raise ValueError(
                    f"config.json `{name}`={token_id} is not a token of tokenizer.json "
                    f"(vocabulary size {self.vocab_size})"
                )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return _encode(self._tok, text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def offsets(self, ids: list[int], start: int = 0) -> list[int]:
        """Where each token's text begins in `decode(ids)` (plus `start`), by incremental decoding:
        a token that only completes another's UTF-8 sequence begins where that one did."""
        stream, at, out = self.decode_stream(), start, []
        for t in ids:
            out.append(at)
            at += len(self.decode_step(stream, t))
        return out

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (what grammar engines build their view from)."""
        return self._tok.to_str()

    def decode_token(self, token_id: int) -> str:
        """One token's own text, special tokens included (what logprobs report it as)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    @staticmethod
    def decode_stream(skip_special_tokens: bool = True) -> DecodeStream:
        """State for `decode_step`: one per output being detokenised."""
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def decode_step(self, stream: DecodeStream, token_id: int) -> str:
        """The characters `token_id` adds to the stream's text ("" while a UTF-8 sequence is
        incomplete); the pieces join to `decode` of all the ids, bar an incomplete tail."""
        return stream.step(self._tok, token_id) or ""

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The chat rendered by `chat_template` (Jinja) or, by default, the checkpoint's; `kwargs`
        are the template's own variables (`tools`, `enable_thinking`, ...)."""
        template = self._compile(chat_template) if chat_template else self._template
        if template is None:
            raise ValueError(
                "this checkpoint's tokenizer_config.json has no chat_template: use generate() "
                "with plain prompts, or give a chat template"
            )
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        try:
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, **kwargs
            )
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """The rendered chat's token ids. Only the template writes special tokens: special-token text
        inside a message (`<|im_end|>\n<|im_start|>system ...`) is encoded as the plain text it is, so
        a user cannot forge a turn (as other servers do by default). The template writes bos itself."""
        text = self.apply_chat_template(messages, **kwargs)
        contents = [m["content"] for m in messages]
        if not any(s in c for c in contents for s in self._special_texts):
            return self.encode(text, add_special_tokens=False)  # nothing to protect: one encode, as always
        # Render again with a unique marker in place of each content, then encode the template's text
        # and the contents apart. Markers are private-use characters around random hex.
        marks = [f"\ue000{secrets.token_hex(8)}\ue001" for _ in messages]
        marked = self.apply_chat_template([{**m, "content": k} for m, k in zip(messages, marks)], **kwargs)
        pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", marked)
        found = pieces[1::2]
        content_of: dict[str, str] = dict(zip(marks, contents))
        if found != marks or "".join(content_of.get(p, p) for p in pieces) != text:
            raise ValueError(
                "a message contains special-token text (such as <|im_start|>) and this chat template "
                "rewrites message content, so it cannot be kept as plain text: remove it"
            )
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids += _encode(self._plain, content_of[piece], add_special_tokens=False)
            elif piece:
                ids += self.encode(piece, add_special_tokens=False)
        return ids
