"""Checkpoints by Hugging Face hub id, offline: a hub cache laid out by the test as huggingface_hub
lays one out (refs/<revision> -> commit, snapshots/<commit>/files), read by LLM() and by a server
started with HF_HUB_OFFLINE=1; a missing id offline is one clear line."""

from __future__ import annotations

import shutil

import httpx
import pytest
from live import start_server

from trimode import LLM, SamplingParams
from trimode.cli import main
from trimode.hub import is_hub_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tiny_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--acme--nld-tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(COMMIT)
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """huggingface_hub offline over the test's cache (its constants: the environment is read at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_a_hub_id_loads_from_the_cache_offline_at_a_revision(offline, hub_cache, tiny_dir):
    snapshot = hub_cache / "models--acme--nld-tiny" / "snapshots" / COMMIT
    assert resolve_model("acme/nld-tiny") == resolve_model("acme/nld-tiny", "v1") == snapshot
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    by_id = LLM("acme/nld-tiny", revision="v1", dtype="float32", compile=False).generate("x", params)[0]
    assert by_id.token_ids == LLM(tiny_dir, dtype="float32", compile=False).generate("x", params)[0].token_ids


def test_a_missing_id_offline_is_one_clear_line(offline, capsys):
    assert main(["generate", "--model", "acme/absent", "x"]) == 2
    err = capsys.readouterr().err
    assert "'acme/absent' is not a local directory, and the Hugging Face cache has no copy of it" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_server_serves_a_hub_id_under_its_name(hub_cache):
    proc, url = start_server(
        "acme/nld-tiny", "--dtype", "float32", env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    )
    try:
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["acme/nld-tiny"]
        r = httpx.post(url + "/v1/completions", json={"model": "acme/nld-tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_local_paths_stay_paths(tmp_path):
    assert not is_hub_id(str(tmp_path)) and resolve_model(tmp_path) == tmp_path
    assert is_hub_id("nvidia/Nemotron-Labs-Diffusion-8B") and not is_hub_id("a/b/c")
    with pytest.raises(ValueError, match="revision 'v1' is for Hugging Face hub ids"):
        resolve_model(tmp_path, "v1")
