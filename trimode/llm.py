"""LLM: the offline facade (vLLM-like). Loads a checkpoint; generate() and chat() in any mode."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trimode.config import DEFAULT_BATCHED_TOKENS, DTYPES, EngineConfig
from trimode.cpu import cpu_auto_dtype
from trimode.distributed import launched_by_torchrun
from trimode.engine.inputs import Message, PromptInput, chat_messages, tokenize_prompt
from trimode.engine.llm_engine import LLMEngine
from trimode.engine.model_runner import ModelRunner
from trimode.engine.request import Request
from trimode.engine.scheduler import kv_slots
from trimode.engine.tp_workers import (
    TensorParallelDriver,
    control_group,
    join_torchrun_ranks,
    run_worker,
    spawn_workers,
)
from trimode.hub import resolve_model
from trimode.kv_cache import PAGE_SIZE, num_pages
from trimode.model.loader import load_config, load_model
from trimode.model.tensor_parallel import check_tp
from trimode.model.transformer import Transformer
from trimode.outputs import GenerationOutput
from trimode.sampling_params import SamplingParams
from trimode.tokenizer import Tokenizer

# The tiny tri-mode model trained by `trimode train` and shipped inside the package.
EMBEDDED_MODEL_DIR = Path(__file__).parent / "embedded"

# The most tokens one decode pass may feed (rows x pass width) that offline generation raises the
# engine's budget (DEFAULT_BATCHED_TOKENS) to, so a call's rows of one mode decode together.
OFFLINE_BATCHED_TOKENS = 8192


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use device='cpu'")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, num_parameters: int) -> torch.dtype:
    """ "auto": bf16 on a GPU; on a CPU, `cpu_auto_dtype`'s choice, printed."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto" and device.type == "cpu":
        auto, why = cpu_auto_dtype(num_parameters)
        print(f"trimode: cpu: {str(auto).removeprefix('torch.')} ({why})", file=sys.stderr)
        return auto
    if dtype == "auto":
        return torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


# vLLM `LLM` arguments trimode accepts and ignores: what each would have done, and why not here.
VLLM_OPTIONS = {
    "gpu_memory_utilization": "offline generation sizes its KV pool to the call's requests",
    "trust_remote_code": "trimode runs NLD checkpoints with its own code",
    "swap_space": "trimode preempts by recomputing, never swapping",
    "max_num_seqs": "offline generation batches every prompt of a call",
    "enable_prefix_caching": "prefix caching is always on",
    "disable_log_stats": "trimode logs no engine statistics offline",
    "tokenizer_mode": "the checkpoint's tokenizer.json is always used",
}
_warned: set[str] = set()


def check_vllm_options(options: dict[str, Any]) -> None:
    """TypeError for an argument neither trimode nor VLLM_OPTIONS knows; a warning, once per
    process, for each known one."""
    unknown = sorted(set(options) - VLLM_OPTIONS.keys())
    if unknown:
        raise TypeError(f"LLM() got unexpected keyword arguments {unknown}")
    for name in sorted(set(options) - _warned):
        _warned.add(name)
        warnings.warn(f"LLM({name}=...) is ignored: {VLLM_OPTIONS[name]}", stacklevel=3)


def training_seq_len(path: Path) -> int | None:
    """The sequence length the checkpoint was trained at, where its `training_args.json` (which
    `trimode train` writes) says."""
    args = path / "training_args.json"
    if not args.is_file():
        return None
    seq_len = json.loads(args.read_text()).get("seq_len")
    return seq_len if isinstance(seq_len, int) and seq_len > 0 else None


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        load_draft_lora: bool = True,
        compile: str | bool = "auto",
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        seed: int | None = None,
        revision: str | None = None,
        **vllm_options: Any,
    ) -> None:
        """`compile`: on a CPU, one-batch forwards as compiled programs (`engine/compiled.py`):
        "auto" runs those in the cache, True also compiles the missing ones (once). On a GPU,
        "auto" and True run decode passes as CUDA graphs (`engine/cuda_graphs.py`). False (or
        vLLM's `enforce_eager=True`): eager.

        `tensor_parallel_size` N > 1 splits the weights and the KV heads over N processes
        (`engine/tp_workers.py`): under torchrun, the N ranks it launched (ranks > 0 serve
        forwards inside this call and exit with rank 0); otherwise N - 1 worker processes it
        spawns, on cuda:1.. or the CPU. `close()` stops them.

        `model`: a checkpoint directory, or a Hugging Face hub id (`hub.resolve_model`, at
        `revision`). `seed` (vLLM's): requests without a seed of their own get one drawn from it,
        so a run repeats. `vllm_options`: vLLM's other common arguments (VLLM_OPTIONS), accepted with a
        warning where they mean nothing here, so vLLM scripts run unchanged."""
        check_vllm_options(vllm_options)
        if enforce_eager:
            compile = False
        if model is None and not (EMBEDDED_MODEL_DIR / "config.json").is_file():
            raise ValueError(
                f"no model given and no embedded model in {EMBEDDED_MODEL_DIR}: pass model=PATH to a "
                "checkpoint directory"
            )
        path = resolve_model(model, revision) if model is not None else EMBEDDED_MODEL_DIR
        self.device = resolve_device(device)
        dtype = resolve_dtype(dtype, self.device, load_config(path).num_parameters)
        driver = None
        if tensor_parallel_size != 1:
            self.device, driver = self._join_tensor_parallel(path, dtype, load_draft_lora, tensor_parallel_size)
        transformer = load_model(path, dtype, self.device, load_draft_lora, tp=driver.tp if driver else None)
        tokenizer = Tokenizer.from_dir(path)
        tokenizer.check_special_ids(
            {"bos_token_id": transformer.config.bos_token_id, "mask_token_id": transformer.config.mask_token_id}
        )
        eos = set(transformer.config.eos_token_id)
        gen_cfg = path / "generation_config.json"
        if gen_cfg.is_file():
            ids = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos |= set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        runner = ModelRunner(transformer, compile, driver)
        self._attach(transformer, tokenizer, runner, eos, max_model_len, seed, training_seq_len(path))
        if compile is True and self.runner.compiled is not None:
            seconds = self.runner.compiled.prepare()
            print(
                "trimode: compiled forwards ready ("
                + ", ".join(f"{kind} {t:.1f} s" for kind, t in seconds.items())
                + f"; cached in {self.runner.compiled.cache_dir})",
                file=sys.stderr,
            )

    def _join_tensor_parallel(
        self, path: Path, dtype: torch.dtype, load_draft_lora: bool, world: int
    ) -> tuple[torch.device, TensorParallelDriver]:
        """Rank 0's device and driver; on any other rank, serve forwards, then exit the process."""
        check_tp(load_config(path), world)  # before any worker starts (the loader checks again, per rank)
        torchrun = launched_by_torchrun()
        workers: list[subprocess.Popen] = []  # spawned ranks (none when torchrun launched them)
        if torchrun:
            tp, device = join_torchrun_ranks(world, self.device)
        else:
            (tp, workers), device = spawn_workers(world, self.device, path, dtype, load_draft_lora), self.device
        control = control_group()
        if tp.rank > 0:
            run_worker(load_model(path, dtype, device, load_draft_lora, tp=tp), control)
            raise SystemExit(0)
        return device, TensorParallelDriver(tp, control, not torchrun and device.type == "cpu", workers)

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer (vLLM's name): encode, decode, apply_chat_template."""
        return self.tokenizer

    def close(self) -> None:
        """Stop this LLM's tensor-parallel workers, if it has any (also done at exit)."""
        if self.runner.tp_driver is not None:
            self.runner.tp_driver.close()

    @classmethod
    def from_parts(cls, model: Transformer, tokenizer: Tokenizer, eos_token_ids: set[int] | None = None) -> LLM:
        """Wrap an in-memory model (e.g. during training) without reading a checkpoint."""
        llm = cls.__new__(cls)
        llm.device = model.diffusion_head.weight.device
        llm._attach(model, tokenizer, ModelRunner(model), set(eos_token_ids or model.config.eos_token_id))
        return llm

    def _attach(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        runner: ModelRunner,
        eos_token_ids: set[int],
        max_model_len: int | None = None,
        seed: int | None = None,
        training_seq_len: int | None = None,
    ) -> None:
        """The state every LLM holds, however it was made (a checkpoint or `from_parts`): one place,
        so a new field cannot be missing from one of them."""
        self.model, self.config, self.tokenizer, self.runner = model, model.config, tokenizer, runner
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.eos_token_ids = eos_token_ids
        self._seeds = random.Random(seed) if seed is not None else None
        self._requests = 0  # prompts given so far: their request ids
        self.training_seq_len = training_seq_len  # what training_args.json says, where it does

    def engine(self, config: EngineConfig | None = None, **sizes: Any) -> LLMEngine:
        """A continuous-batching engine over this model (what `trimode serve` runs), sized by
        `config`, or by EngineConfig's fields given as keywords; its KV pool is allocated now."""
        if config is not None and sizes:
            raise TypeError("give an EngineConfig or its fields as keywords, not both")
        config = config or EngineConfig(**sizes)
        return LLMEngine(
            self.runner, self.tokenizer, self.eos_token_ids, self.max_model_len, config, self.training_seq_len
        )

    def _tokenize(self, prompts: PromptInput | Sequence[PromptInput]) -> tuple[list[list[int]], list[str | None]]:
        batch: list[Any]  # each checked by tokenize_prompt
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            batch = [prompts]  # one prompt: a string, a prompt dict or a list of token ids
        elif isinstance(prompts, Sequence) and prompts:
            batch = list(prompts)
        else:
            raise ValueError(
                "prompts must be a string, a list of strings, or a list of token-id lists; got "
                f"{type(prompts).__name__} {prompts!r:.60}"
            )
        pairs = [tokenize_prompt(self.tokenizer, self.config.vocab_size, p, f"prompt {i}") for i, p in enumerate(batch)]
        return [ids for ids, _ in pairs], [text for _, text in pairs]

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """Generate for every prompt, all of them batched together whatever their modes.

        A prompt is a string, a list of token ids, or vLLM's `{"prompt": text}` /
        `{"prompt_token_ids": ids}`. `sampling_params` (`params` is the same, by trimode's older
        name): one for every prompt or one each; `use_tqdm`: a progress bar over finished prompts."""
        ids, texts = self._tokenize(prompts)
        return self._generate(ids, texts, _one_of(sampling_params, params), use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        *,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """One conversation (a list of OpenAI messages) or a list of conversations, rendered with
        the chat template (`chat_template`, Jinja, in place of the checkpoint's). Content is a string
        or a list of text parts; `developer` is the system role. `tools` and `chat_template_kwargs`
        (e.g. `{"enable_thinking": True}`) are variables of the template."""
        conversations: list[Any] = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not conversations:
            raise ValueError("messages must be a conversation (list of {'role', 'content'} dicts) or a list of them")
        template = {
            **(chat_template_kwargs or {}),
            "add_generation_prompt": add_generation_prompt,
            "chat_template": chat_template,
            **({"tools": tools} if tools is not None else {}),
        }
        chats = [chat_messages(c) for c in conversations]
        texts = [self.tokenizer.apply_chat_template(c, **template) for c in chats]
        ids = [self.tokenizer.encode_chat(c, **template) for c in chats]
        return self._generate(ids, list(texts), _one_of(sampling_params, params), use_tqdm)

    def _generate(
        self,
        ids: list[list[int]],
        texts: list[str | None],
        params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool = False,
    ) -> list[GenerationOutput]:
        """The engine, stepped to completion with every prompt admitted at once (one driver for
        offline and serving)."""
        params = params if params is not None else SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(ids)
        if len(per_prompt) != len(ids):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(ids)} prompts: give one, or one each")
        if self._seeds is not None:  # LLM(seed=...): each unseeded prompt draws its seed, in order
            per_prompt = [
                sp if sp.seed is not None else dataclasses.replace(sp, seed=self._seeds.getrandbits(63))
                for sp in per_prompt
            ]
        first, self._requests = self._requests, self._requests + len(ids)
        # A pool that holds every request at its largest (rounded to pages, plus the page of
        # headroom per row the scheduler keeps), so offline generation never preempts.
        # n samples of a prompt are n requests (`SamplingParams.samples`), sharing its cached pages.
        samples = [sp.samples() for sp in per_prompt]
        rows = [
            (i, j, p, text, sample)
            for i, (p, text) in enumerate(zip(ids, texts))
            for j, sample in enumerate(samples[i])
        ]
        requests = [Request(None, p, sp) for _, _, p, _, sp in rows]
        need = sum(num_pages(kv_slots(r), PAGE_SIZE) + 1 for r in requests)
        # A decode pass that holds every row's (up to OFFLINE_BATCHED_TOKENS), so the rows of one
        # mode decode in one pass as the call asks, and any one row's widest (quadratic self-spec:
        # b(b+1) tokens). Prefill steps keep the default budget: a prefill of every prompt at once,
        # right-padded to the longest, computes the padding (64 task prompts: 276 ms against 221 ms
        # for the five 512-token steps, decode rows riding in them).
        widths = [r.pass_width for r in requests]
        decode = max(DEFAULT_BATCHED_TOKENS, min(sum(widths), OFFLINE_BATCHED_TOKENS), max(widths))
        engine = self.engine(
            max_batch=len(rows), max_queue=len(rows), kv_cache_tokens=need * PAGE_SIZE, max_decode_tokens=decode
        )
        for i, j, p, text, sp in rows:
            # One parent: the engine serves this call alone, and samples of equal prompts share pages.
            engine.add_tokenized(f"{i}.{j}", p, sp, text, name=f"prompt {i}", parent_id="generate")
        results: dict[str, GenerationOutput] = {}
        with tqdm(total=len(rows), unit="sample", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.error is not None and out.is_request_error:
                        raise ValueError(f"prompt {out.request_id}: {out.error}")
                    if out.error is not None:
                        raise RuntimeError(f"prompt {out.request_id} failed inside the engine: {out.error}")
                    if out.output is not None:
                        results[out.request_id] = out.output
                        bar.update()
        outs = [_with_samples([results[f"{i}.{j}"] for j in range(len(s))]) for i, s in enumerate(samples)]
        for i, result in enumerate(outs):
            result.request_id = str(first + i)
        return outs


def _with_samples(outs: list[GenerationOutput]) -> GenerationOutput:
    """One prompt's result: its first sample's, with every sample in `outputs` (vLLM's n)."""
    if len(outs) == 1:
        return outs[0]
    first = dataclasses.replace(outs[0])
    first.completions = [dataclasses.replace(o.outputs[0], index=j) for j, o in enumerate(outs)]
    first.num_forwards = sum(o.num_forwards for o in outs)
    return first


def _one_of(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    params: SamplingParams | Sequence[SamplingParams] | None,
) -> SamplingParams | Sequence[SamplingParams] | None:
    if sampling_params is not None and params is not None:
        raise ValueError("give sampling_params or params (the same argument), not both")
    return sampling_params if sampling_params is not None else params
