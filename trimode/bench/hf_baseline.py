"""`--baseline hf`: the same weights as a Hugging Face Ministral-3 causal LM, greedy `generate()`,
run by the sweep as one more configuration (interleaved with trimode's, so their ratio is paired)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from trimode.llm import LLM
from trimode.outputs import GenerationOutput
from trimode.sampling_params import SamplingParams


def hf_model(llm: LLM) -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ValueError("--baseline hf needs transformers: pip install 'trimode[bench]'") from e
    cfg = llm.config
    hf_cfg = transformers.Ministral3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(llm.eos_token_ids),
        pad_token_id=cfg.pad_token_id,
        rope_parameters={"rope_type": cfg.rope.rope_type, **cfg.rope.to_hf()},
    )
    # Any: transformers types `.to` through a decorator type checkers cannot call.
    model: Any = transformers.Ministral3ForCausalLM(hf_cfg)
    state = {
        k.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head"): v
        for k, v in llm.model.state_dict().items()
        if ".draft_lora." not in k
    }
    model.load_state_dict(state, strict=True)
    return model.to(device=llm.device, dtype=llm.model.diffusion_head.weight.dtype).eval()


class HFTokenizer:
    """A Hugging Face tokenizer behind the calls the bench makes of trimode's `Tokenizer`; chats are
    rendered with the model's own chat template."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class HFGenerator:
    """Hugging Face `generate()` (greedy, one prompt at a time) behind the bench's generator
    interface, so the sweep interleaves it with trimode's configurations."""

    def __init__(self, model: Any, tokenizer: Any, eos: list[int], pad: int, device: torch.device) -> None:
        self.model, self.tokenizer, self.eos, self.pad, self.device = model, tokenizer, eos, pad, device

    @classmethod
    def same_weights(cls, llm: LLM) -> HFGenerator:
        """`--baseline hf`: trimode's own weights as a Ministral-3 causal LM, trimode's tokenizer."""
        eos = sorted(llm.eos_token_ids)
        return cls(hf_model(llm), llm.tokenizer, eos, llm.config.pad_token_id or eos[0], llm.device)

    @classmethod
    def from_path(cls, path: str, device: torch.device, dtype: torch.dtype) -> HFGenerator:
        """`--baseline hf:PATH`: any Hugging Face causal LM directory (weights from safetensors
        only), with its own tokenizer and chat template."""
        import transformers

        if not Path(path, "config.json").is_file():
            raise ValueError(f"--baseline hf:{path}: no config.json there; give a Hugging Face model directory")
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
        eos = (
            model.generation_config.eos_token_id
            if model.generation_config.eos_token_id is not None
            else tok.eos_token_id
        )
        eos = sorted(eos if isinstance(eos, list) else [eos])
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        return cls(model.to(device).eval(), HFTokenizer(tok), eos, pad, device)

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: list[SamplingParams], use_tqdm: bool = False
    ) -> list[GenerationOutput]:
        return [self._one(p, sp.max_tokens) for p, sp in zip(prompts, params)]

    def _one(self, prompt: list[int], max_tokens: int) -> GenerationOutput:
        x = torch.tensor([prompt], device=self.device)
        t0 = time.perf_counter()
        out = self.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )
        seconds = time.perf_counter() - t0
        tokens = out[0, len(prompt) :].tolist()
        return GenerationOutput(
            prompt=None,
            prompt_token_ids=prompt,
            text=self.tokenizer.decode(tokens),
            token_ids=tokens,
            finish_reason="stop" if tokens and tokens[-1] in self.eos else "length",
            mode="ar",
            num_forwards=len(tokens),  # the prefill gives the first token, each later one a step
            seconds=round(seconds, 4),
        )


def baseline_summary(
    hf: dict[str, Any],
    ar: dict[str, Any],
    theirs: list[GenerationOutput],
    ours: list[GenerationOutput],
    engine: str,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The baseline's figures beside trimode AR at batch 1 (`hf`, `ar`: their sweep results, run
    interleaved): speed ratio with its paired interval, accuracy, and for the same weights
    (`engine` "hf") token-for-token agreement."""
    ci = hf["speedup_vs_ar_ci"]  # the baseline over trimode AR: inverted below
    summary = {
        "engine": engine,
        **({"dtype": dtype} if dtype else {}),
        "num_requests": len(theirs),
        "output_tokens_per_s": hf["output_tokens_per_s"],
        "trimode_ar_tokens_per_s": ar["output_tokens_per_s"],
        "speed_ratio_trimode_over_hf": round(ar["output_tokens_per_s"] / hf["output_tokens_per_s"], 3),
        "speed_ratio_ci": {
            "median": round(1 / ci["median"], 3),
            "lo": round(1 / ci["hi"], 3),
            "hi": round(1 / ci["lo"], 3),
        },
        "accuracy": hf["accuracy"],
        "trimode_ar_accuracy": ar["accuracy"],
    }
    if engine != "hf":  # another model: its tokens are not comparable with ours
        return summary
    same = sum(a.token_ids == b.token_ids for a, b in zip(theirs, ours))
    matched = sum(
        next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
            min(len(a.token_ids), len(b.token_ids)),
        )
        for a, b in zip(theirs, ours)
    )
    summary["identical_outputs"] = round(same / len(theirs), 4)
    summary["token_agreement"] = round(matched / max(sum(len(o.token_ids) for o in ours), 1), 4)
    return summary
