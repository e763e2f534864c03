"""Checkpoint loading: formats accepted, and every failure names the file or tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from trimode import LLM, SamplingParams
from trimode.checkpoint import make_checkpoint
from trimode.model.loader import load_model
from trimode.tokenizer_build import build_tokenizer


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return cfg


# The keys of the release's config.json (nvidia/Nemotron-Labs-Diffusion-*), as its remote code reads them.
RELEASE_CONFIG_KEYS = {
    "architectures", "auto_map", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "attention_dropout", "attn_implementation",
    "mlp_bias", "sliding_window", "initializer_range", "use_cache", "bos_token_id", "eos_token_id",
    "pad_token_id", "mask_token_id", "block_size", "dlm_paradigm", "dlm_loss_weight", "dp_varying_mask_ratio",
    "rope_parameters", "torch_dtype",
}  # fmt: skip


def test_written_configs_carry_the_release_keys_and_auto_map(tiny_dir):
    """Pins: make-checkpoint and train wrote no auto_map, so NVIDIA's remote code could not load them."""
    from trimode.llm import EMBEDDED_MODEL_DIR

    for path in (tiny_dir, EMBEDDED_MODEL_DIR):
        cfg = json.loads((path / "config.json").read_text())
        assert RELEASE_CONFIG_KEYS <= set(cfg), RELEASE_CONFIG_KEYS - set(cfg)
        assert cfg["auto_map"] == {
            "AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
            "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel",
        }
        assert cfg["architectures"] == ["NemotronLabsDiffusionModel"]


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, tiny_dir):
    sharded = make_checkpoint(tiny_config(), tmp_path / "sharded", seed=0, dtype="float32", shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    single = make_checkpoint(tiny_config(), tmp_path / "single", seed=0, dtype="float32")
    a, b = load_model(sharded).state_dict(), load_model(single).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_old_rope_scaling_layout_is_accepted(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    theta = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg.update(rope_scaling=rope, rope_theta=theta)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    new = load_model(ckpt).config.rope
    assert new.rope_theta == theta and new.rope_type == "yarn" and new.llama_4_scaling_beta == 0.1


def test_bf16_checkpoint_loads_in_every_dtype(tmp_path):
    path = make_checkpoint(tiny_config(), tmp_path / "bf16", dtype="bfloat16")
    for dtype in ("float32", "bfloat16", "float16"):
        llm = LLM(path, dtype=dtype, device="cpu")
        out = llm.generate("x = 1", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
        assert len(out.token_ids) == 3


def test_cpu_weights_are_the_files_bits_on_cache_line_boundaries(tmp_path):
    """Read, not mapped: safetensors data sits 8-byte aligned in its file, our tensors 64-byte."""
    path = make_checkpoint(tiny_config(), tmp_path / "shards", dtype="bfloat16", shard_bytes=200_000)
    files = sorted(path.glob("model-*.safetensors"))
    assert len(files) > 1
    stored = {k: v for f in files for k, v in load_file(f).items()}
    for dtype in (torch.bfloat16, torch.float32):
        model = load_model(path, dtype)
        for name, t in model.state_dict().items():
            if name in stored:
                assert t.data_ptr() % 64 == 0 and torch.equal(t, stored[name].to(dtype)), name


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    w = load_file(ckpt / "model.safetensors")
    del w["encoder.layers.1.mlp.up_proj.weight"]
    save_file(w, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_model(ckpt)


def test_shape_mismatch_is_named(ckpt):
    edit_config(ckpt, intermediate_size=128)
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*shape \(192, 64\).*\(128, 64\)"):
        load_model(ckpt)


def test_unsupported_model_type(ckpt):
    edit_config(ckpt, model_type="llama")
    with pytest.raises(ValueError, match="model_type"):
        load_model(ckpt)


def test_missing_shard_file(tmp_path):
    path = make_checkpoint(tiny_config(), tmp_path / "s", dtype="float32", shard_bytes=100_000)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(path)


def test_draft_lora_with_wrong_target_is_refused(ckpt):
    cfg_file = ckpt / "linear_spec_lora" / "adapter_config.json"
    adapter = json.loads(cfg_file.read_text())
    adapter["target_modules"] = ["q_proj"]
    cfg_file.write_text(json.dumps(adapter))
    with pytest.raises(ValueError, match="target_modules"):
        load_model(ckpt)


def test_draft_lora_only_changes_draft_passes(tiny_dir):
    with_lora, without = load_model(tiny_dir), load_model(tiny_dir, load_draft_lora=False)
    assert with_lora.has_draft_lora and not without.has_draft_lora
    assert with_lora.encoder.layers[0].self_attn.draft_lora.scale == 4.0  # alpha / r of the release
    llm_a, llm_b = LLM(tiny_dir, dtype="float32"), LLM(tiny_dir, dtype="float32", load_draft_lora=False)
    ar = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    assert llm_a.generate("def", ar)[0].token_ids == llm_b.generate("def", ar)[0].token_ids


def test_config_with_mask_id_outside_tokenizer(ckpt):
    build_tokenizer(400).save(str(ckpt / "tokenizer.json"))
    edit_config(ckpt, mask_token_id=450)
    with pytest.raises(ValueError, match="mask_token_id.*450.*tokenizer.json"):
        LLM(ckpt)
