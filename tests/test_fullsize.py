"""tools/fullsize.py: the checkpoints it writes read back as the preset's shapes (Meta's layout for LLaMA 2; the
Hugging Face one for Llama 3.1 and Qwen2.5, with the family's config.json and tokenizer files, and transformers'
logits where it is installed), at tiny widths; and the whole check on a tiny Qwen2.5-like shape (its own processes:
the slow tier)."""

import json
import os

import pytest
import torch

import fullsize
import llama
import tokenizer
from llama import PRESETS, ModelArgs, check_checkpoint, check_vocab, load_model, read_shapes

# the presets' family fields (rope scaling, biases, vocabulary) at a tiny width
TINY_WIDTH = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 96, "vocab_size": 1000}


def tiny_of(preset: str) -> ModelArgs:
    return ModelArgs(**(PRESETS[preset].__dict__ | TINY_WIDTH))


@pytest.mark.parametrize("preset,model_type,bos", [("Llama-3.1-8B", "llama", "<|begin_of_text|>"),
                                                   ("Qwen2.5-7B", "qwen2", None)])
def test_family_checkpoint_in_the_hugging_face_layout(tmp_path, preset, model_type, bos):
    shape, folder = tiny_of(preset), str(tmp_path / "ckpt")
    fullsize.write_checkpoint(folder, shape)
    assert check_checkpoint(folder) == "hf" and not os.path.exists(folder + ".part")
    assert read_shapes(folder) == shape  # rope scaling, biases, norm eps, theta, positions: all of the config
    cfg = json.loads(open(os.path.join(folder, "config.json")).read())
    assert cfg["model_type"] == model_type and cfg["vocab_size"] == 1000
    assert cfg.get("rope_scaling", {}).get("rope_type") == ("llama3" if model_type == "llama" else None)
    # its tokenizer: a padded vocabulary (the bytes and a few merges for 1,000 rows), the family's BOS and EOS,
    # which config.json names too
    tok = tokenizer.load(folder)
    assert isinstance(tok, tokenizer.TokenizerJSON) and 256 < tok.n_words <= 512
    check_vocab(folder, tok)
    assert tok.bos_token == bos and cfg["bos_token_id"] == tok.bos_id
    assert tok.eos_token == fullsize.SPECIAL[model_type][1] and cfg["eos_token_id"] == tok.eos_id
    assert tok.decode(tok.encode("shift: a b c", bos=True)) == "shift: a b c"
    model = load_model(folder, dtype=torch.float32)
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert len(biases) == (3 * shape.n_layers if shape.bias else 0) and all(b.abs().sum() > 0 for b in biases)
    try:  # the same model in transformers, where it is installed
        import transformers
    except ImportError:
        return
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.randint(1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max() < 1e-4


def test_llama2_checkpoint_in_meta_layout(tmp_path):
    shape = ModelArgs(**(PRESETS["tiny"].__dict__ | {"max_seq_len": 4096}))  # (params.json has no positions)
    folder = str(tmp_path / "ckpt")
    fullsize.write_checkpoint(folder, shape)
    assert check_checkpoint(folder) == "meta" and not fullsize.hf_only(shape)
    assert read_shapes(folder) == shape  # grouped-query attention included
    assert os.path.isfile(tmp_path / "tokenizer.model")  # one level up, as Meta ships it
    assert fullsize.hf_only(PRESETS["Llama-3.1-8B"]) and fullsize.hf_only(PRESETS["Qwen2.5-7B"])


@pytest.mark.slow  # train.py (twice per method), generate.py and merge.py: processes of their own
def test_the_whole_check_on_a_tiny_qwen_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(llama.PRESETS, "tiny-qwen", tiny_of("Qwen2.5-7B"))
    out = tmp_path / "fullsize.json"
    assert fullsize.main(["--dir", str(tmp_path), "--preset", "tiny-qwen", "--density", "0.05", "--threads", "1",
                          "--bases", "int8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["preset"] == "tiny-qwen" and report["layers"] == 2
    assert set(report["runs"]) == {"spiel-ag, int8", "spiel-ma, int8"}
    for r in report["runs"].values():
        assert r["peak_gb"] > 0 and r["resumed_peak_gb"] > 0 and r["estimate_gb"] > 0
        assert list(r["step_s"]) == ["1", "2"] and list(r["resumed"]["step_s"]) == ["3"]
    assert report["generate"]["peak_gb"] > 0 and report["merge"]["peak_gb"] > 0
    printed = capsys.readouterr().out
    assert "full-size check: tiny-qwen shapes, 2 layers" in printed and "| spiel-ma, int8 |" in printed
    assert os.path.isfile(tmp_path / "tiny-qwen-shaped-2-layers" / "tokenizer.json")
