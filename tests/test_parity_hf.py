"""Our causal forward == Hugging Face transformers' Ministral-3 on the same weights."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from trimode.model.loader import load_model

transformers = __import__("pytest").importorskip("transformers")


def hf_model(path, cfg):
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
        rope_parameters={"rope_type": "yarn", **cfg.rope.to_hf()},
    )
    model = transformers.Ministral3ForCausalLM(hf_cfg).eval()
    ours = load_file(path / "model.safetensors")
    mapped = {k.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head"): v for k, v in ours.items()}
    model.load_state_dict(mapped, strict=True)
    return model


def test_causal_logits_match_hf_past_original_context(parity_dir):
    ours = load_model(parity_dir, torch.float32)
    cfg = ours.config
    assert cfg.rope.original_max_position_embeddings == 32
    hf = hf_model(parity_dir, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 110), generator=torch.Generator().manual_seed(0))
    from trimode.engine.model_runner import ModelRunner

    runner = ModelRunner(ours)
    kv = runner.new_cache(2, 128)
    with torch.inference_mode():
        got = runner.forward(kv, tokens, causal=True)
        want = hf(tokens).logits.float()
    # Positions 32..109 are past original_max_position_embeddings: the query scale is 1 + 0.1*log(1 + k).
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, diff
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors
