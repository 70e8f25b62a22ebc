"""--ckpt ORG/NAME: a Hub id resolves to its snapshot in the Hugging Face cache (the Hub's own layout, offline) in
every script; an absent model is downloaded where huggingface_hub is installed, else one line says how."""

import json
import os
import sys

import pytest

import hub
from files import CheckpointError


def cache_of(folder, root, repo_id="org/tiny", revision="0123abcd"):
    """the Hugging Face cache's layout for `folder`'s files: blobs, a snapshot of links into them, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in os.listdir(folder):
        blob = repo / "blobs" / f"blob-{name}"
        blob.write_bytes(open(os.path.join(folder, name), "rb").read())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return str(snapshot)


def test_a_hub_id_is_its_cached_snapshot_in_every_script(tiny, task, tmp_path, monkeypatch, capsys):
    import convert
    import generate
    import train
    snapshot = cache_of(tiny.hf, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # offline: nothing may be fetched
    assert hub.resolve("org/tiny") == snapshot
    generate.main(["--ckpt", "org/tiny", "--prompt", "the cat", "--max-new-tokens", "3", "--temperature", "0"])
    assert capsys.readouterr().out.startswith("the cat")
    assert train.main(["--ckpt", "org/tiny", "--data", task[0], "--out", str(tmp_path / "run"), "--max-steps", "1",
                       "--density", "0.1", "--seq-len", "32", "--eval-every", "0", "--method", "lora",
                       "--lora-rank", "2", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "run" / "args.json").read_text())["ckpt"] == snapshot
    convert.main([str(tmp_path / "run" / "lora.safetensors"), "--to", "peft", "--ckpt", "org/tiny",
                  str(tmp_path / "peft")])
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny"  # the id, which PEFT resolves itself
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # $HF_HOME/hub
    assert hub.resolve("org/tiny") == snapshot
    assert hub.resolve(tiny.hf) == tiny.hf and hub.resolve("runs") == "runs"  # folders and plain names as they are


def test_an_absent_model_is_downloaded_or_says_how(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "huggingface_hub", None)
        with pytest.raises(CheckpointError, match=r"^meta-llama/Llama-3.1-8B: no such folder, and no such model in "
                                                  r"the Hugging Face cache .*pip install huggingface_hub"):
            hub.resolve("meta-llama/Llama-3.1-8B")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def download(repo_id, allow_patterns):  # what the Hub would put in the cache
        calls.append((repo_id, allow_patterns))
        return cache_of(tiny.hf, tmp_path / "hub", repo_id)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert hub.resolve("meta-llama/Llama-3.1-8B").endswith("snapshots/0123abcd") and calls[0][0] == \
        "meta-llama/Llama-3.1-8B" and "*.safetensors" in calls[0][1]
    assert hub.resolve("meta-llama/Llama-3.1-8B") and len(calls) == 1  # cached now: no second download

    def gated(repo_id, allow_patterns):
        raise PermissionError("Access to model meta-llama/Llama-3.2-1B is restricted. You must have access")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(CheckpointError, match="downloading it failed: PermissionError: Access to model .* restricted"):
        hub.resolve("meta-llama/Llama-3.2-1B")
