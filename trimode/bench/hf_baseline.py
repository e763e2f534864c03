"""`--baseline hf`: the same weights as a Hugging Face Ministral-3 causal LM, greedy `generate()`,
run by the sweep as one more configuration (interleaved with trimode's, so their ratio is paired)."""

from __future__ import annotations

import time
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
    model = transformers.Ministral3ForCausalLM(hf_cfg)
    state = {
        k.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head"): v
        for k, v in llm.model.state_dict().items()
        if ".draft_lora." not in k
    }
    model.load_state_dict(state, strict=True)
    return model.to(device=llm.device, dtype=llm.model.diffusion_head.weight.dtype).eval()


class HFGenerator:
    """Hugging Face `generate()` (greedy, one prompt at a time) behind the bench's generator
    interface, so the sweep interleaves it with trimode's configurations."""

    def __init__(self, llm: LLM) -> None:
        self.tokenizer = llm.tokenizer
        self.model = hf_model(llm)
        self.eos = sorted(llm.eos_token_ids)
        self.pad = llm.config.pad_token_id or self.eos[0]
        self.device = llm.device

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationOutput]:
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
    hf: dict[str, Any], ar: dict[str, Any], theirs: list[GenerationOutput], ours: list[GenerationOutput]
) -> dict[str, Any]:
    """The baseline's figures beside trimode AR at batch 1 (`hf`, `ar`: their sweep results, run
    interleaved): speed ratio with its paired interval, and token-for-token agreement."""
    same = sum(a.token_ids == b.token_ids for a, b in zip(theirs, ours))
    matched = sum(
        next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
            min(len(a.token_ids), len(b.token_ids)),
        )
        for a, b in zip(theirs, ours)
    )
    ci = hf["speedup_vs_ar_ci"]  # HF over trimode AR: invert for trimode over HF
    return {
        "engine": "transformers.generate (Ministral3ForCausalLM, greedy, batch 1)",
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
        "identical_outputs": round(same / len(theirs), 4),
        "token_agreement": round(matched / max(sum(len(o.token_ids) for o in ours), 1), 4),
    }
