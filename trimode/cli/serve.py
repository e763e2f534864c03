"""`trimode serve`: the OpenAI-compatible server, its flags checked before the model loads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from trimode.engine_args import EngineArgs
from trimode.sampling_params import REQUEST_MODES
from trimode.server.logprobs import MAX_LOGPROB_ENTRIES

API_KEY_ENV = "TRIMODE_API_KEY"


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key-file, else TRIMODE_API_KEY, else --api-key (visible to every local user in ps)."""
    if args.api_key and args.api_key_file:
        raise ValueError("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    if args.api_key:
        print(
            "note: a key given with --api-key is readable by any local user (ps, /proc/PID/cmdline); "
            "prefer TRIMODE_API_KEY or --api-key-file",
            file=sys.stderr,
        )
        return args.api_key
    return os.environ.get(API_KEY_ENV) or None


# generation_config.json's sampling fields -> SamplingParams' names.
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_tokens"}


def generation_defaults(value: str, model: str | None) -> dict[str, Any] | None:
    """--generation-config: "auto" takes the sampling defaults of the model's generation_config.json,
    "vllm" none (OpenAI's), or a directory holding a generation_config.json."""
    from trimode.llm import EMBEDDED_MODEL_DIR
    from trimode.sampling_params import SamplingParams

    if value == "vllm":
        return None
    folder = Path(model) if model else EMBEDDED_MODEL_DIR
    if value != "auto":
        folder = Path(value)
        if not (folder / "generation_config.json").is_file():
            raise ValueError(f"--generation-config {value}: no generation_config.json there (or give auto or vllm)")
    file = folder / "generation_config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    defaults = {ours: config[theirs] for theirs, ours in GENERATION_FIELDS.items() if config.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    return defaults


def chat_template(value: str) -> str:
    """--chat-template: a file holding the template, or the template itself (as vllm serve takes it)."""
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value}: no such file, and not a Jinja template either")


def run(args: argparse.Namespace) -> int:
    import logging

    from trimode.hub import is_hub_id, resolve_model
    from trimode.sampling_params import SamplingParams
    from trimode.server.app import build_app
    from trimode.server.async_engine import AsyncEngine
    from trimode.server.http_server import serve
    from trimode.server.tool_parsers import tool_parser

    SamplingParams(mode=args.default_mode)  # validates the mode with the usual message
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME (mistral or hermes)")
    parser = tool_parser(args.tool_call_parser) if args.tool_call_parser is not None else None
    for flag, value in (
        ("--shutdown-timeout", args.shutdown_timeout),
        ("--read-timeout", args.read_timeout),
        ("--max-connections", args.max_connections),
        ("--max-logprob-entries", args.max_logprob_entries),
    ):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0; got {value}")
    if args.model_path is not None and args.model not in (None, args.model_path):
        raise ValueError(f"give the model once: as MODEL ({args.model_path}) or --model ({args.model}), not both")
    args.model = args.model or args.model_path
    engine_args = EngineArgs.from_cli_args(args)  # the model, and the engine's sizes, checked
    key = api_key(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("trimode.access").disabled = not args.access_log
    model = engine_args.model
    if model is not None and is_hub_id(model):  # served under the id, read from its snapshot
        args.served_model_name = args.served_model_name or [model]
        model = str(resolve_model(model, engine_args.revision))
        engine_args = dataclasses.replace(engine_args, model=model, revision=None)
    defaults = generation_defaults(args.generation_config, model)
    llm = engine_args.create_llm()
    if args.chat_template is not None:
        llm.tokenizer.set_chat_template(chat_template(args.chat_template))
    names = args.served_model_name or [Path(model).name if model else "trimode-embedded"]
    engine = AsyncEngine(engine_args.create_engine(llm))
    engine.start()
    app = build_app(
        engine,
        names,
        api_key=key,
        default_mode=args.default_mode,
        access_log=args.access_log,
        docs=args.docs,
        seed=args.seed,
        generation_defaults=defaults,
        max_logprob_entries=args.max_logprob_entries,
        tool_parser=parser,
        auto_tool_choice=args.enable_auto_tool_choice,
    )
    name = names[0]

    def stop() -> None:  # the engine thread, then the tensor-parallel workers; safe to call twice
        engine.shutdown()
        llm.close()

    banner = f"serving {name} on http://{args.host}:{{port}}/v1 (default mode {args.default_mode})"
    try:
        serve(
            app,
            engine,
            args.host,
            args.port,
            banner,
            shutdown_timeout=args.shutdown_timeout,
            max_connections=args.max_connections,
            read_timeout=args.read_timeout,
            has_api_key=key is not None,
            on_stopped=stop,
        )
    finally:
        stop()
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = sub.add_parser("serve", help="OpenAI-compatible server: every request picks its mode")
    v.add_argument(
        "model_path", nargs="?", metavar="MODEL", help="checkpoint directory or hub id (the same as --model)"
    )
    EngineArgs.add_cli_args(v, serving=True)
    v.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument(
        "--api-key",
        help=f"require `Authorization: Bearer KEY` on /v1/* (prefer ${API_KEY_ENV} or "
        "--api-key-file: a command-line key is visible to other local users)",
    )
    v.add_argument("--api-key-file", help="read the API key from this file")
    v.add_argument("--default-mode", default="ar", help=f"mode of requests that name none: {', '.join(REQUEST_MODES)}")
    v.add_argument(
        "--served-model-name",
        nargs="+",
        help="the names clients may send as `model`; responses carry the first (default: the directory name)",
    )
    v.add_argument("--chat-template", help="a chat template (Jinja) file, or the template itself, to use instead")
    v.add_argument(
        "--generation-config",
        default="auto",
        help="sampling defaults for what requests leave unset: auto (the model's generation_config.json), vllm "
        "(none: temperature 1, top_p 1, max_tokens 128) or a directory holding a generation_config.json",
    )
    v.add_argument("--seed", type=int, help="seed the seeds of requests that give none: a rerun samples the same")
    v.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        help="on SIGTERM/SIGINT, seconds running requests get to finish (a second signal exits now)",
    )
    v.add_argument("--max-connections", type=int, default=512, help="open connections; more get 503 at once")
    v.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send its whole request (head and body)",
    )
    v.add_argument(
        "--max-logprob-entries",
        type=int,
        default=MAX_LOGPROB_ENTRIES,
        help="log-probabilities one request may ask for: n x the sum over its prompts of (prompt tokens with "
        f"echo + max_tokens) x (logprobs + 1); more is refused with 400 (default {MAX_LOGPROB_ENTRIES:,})",
    )
    v.add_argument(
        "--tool-call-parser",
        help="the model's tool-call format (mistral: NLD's and Ministral's; hermes: <tool_call> JSON): "
        "tool_choice 'required' or a named function then forces a valid call with a grammar",
    )
    v.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="also read tool calls out of answers under tool_choice 'auto' (needs --tool-call-parser)",
    )
    v.add_argument("--access-log", action="store_true", help="log one line per request (never the prompt)")
    v.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    v.set_defaults(func=run)
