"""`--baseline hf`: the same weights as a Hugging Face Ministral-3 causal LM, greedy `generate()`."""

from __future__ import annotations

import time
from typing import Any

import torch

from trimode.llm import LLM
from trimode.outputs import GenerationOutput


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


@torch.inference_mode()
def run_hf_baseline(
    llm: LLM, ids: list[list[int]], ours: list[GenerationOutput], max_tokens: int, warmup: int
) -> dict[str, Any]:
    """Batch 1, greedy, the prompts of our AR batch-1 run; agreement is token for token."""
    model = hf_model(llm)
    eos = sorted(llm.eos_token_ids)

    def generate(prompt: list[int], n: int) -> list[int]:
        x = torch.tensor([prompt], device=llm.device)
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=llm.config.pad_token_id or eos[0],
        )
        return out[0, len(prompt) :].tolist()

    for prompt in ids[:warmup]:
        generate(prompt, max_tokens)
    tokens, wall, same, matched = 0, 0.0, 0, 0
    for prompt, mine in zip(ids, ours):
        t0 = time.perf_counter()
        theirs = generate(prompt, len(mine.token_ids) if mine.finish_reason == "length" else max_tokens)
        wall += time.perf_counter() - t0
        tokens += len(theirs)
        same += theirs == mine.token_ids
        matched += next(
            (i for i, (a, b) in enumerate(zip(theirs, mine.token_ids)) if a != b), min(len(theirs), len(mine.token_ids))
        )
    ours_tps = sum(o.num_generated_tokens for o in ours) / max(sum(o.seconds for o in ours), 1e-9)
    hf_tps = tokens / wall
    return {
        "engine": "transformers.generate (Ministral3ForCausalLM, greedy, batch 1)",
        "num_requests": len(ids),
        "num_generated_tokens": tokens,
        "seconds": round(wall, 4),
        "output_tokens_per_s": round(hf_tps, 2),
        "trimode_ar_tokens_per_s": round(ours_tps, 2),
        "speed_ratio_trimode_over_hf": round(ours_tps / hf_tps, 3),
        "identical_outputs": round(same / len(ids), 4),
        "token_agreement": round(matched / max(sum(len(o.token_ids) for o in ours), 1), 4),
    }
