"""convert.py and adapters.py: our LoRA and delta files to PEFT LoRA and the authors' SFT folders and back, on a
tiny base whose q/k row permutation is not the identity (4 heads, 2 KV heads); the folders checked against the
formats as adapters.py documents them; folders in generate.py and merge.py; every format error one line (the
CLIs run in this process, but for one real `python merge.py` and `python convert.py` each). Where transformers
and peft are installed, PEFT itself loads our export and makes one for us to import."""

import dataclasses
import json
import os
import shutil
import sys
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
import finetune
import generate
import lora
import merge
import spiel
from conftest import random_state_dict, run_watched, to_hf, train_peft_adapter, write_hf
from files import CheckpointError
from llama import PROJECTIONS, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
      "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
      "feed_forward.w3": "mlp.up_proj"}
SHORT = sorted(h.split(".")[1] for h in HF.values())


def pairs(args):
    """(our module, the HF module) for every targeted matrix."""
    return [(f"layers.{i}.{o}", f"model.layers.{i}.{h}") for i in range(args.n_layers) for o, h in HF.items()]


def hf_rows(args, ours: str, t):
    """t's rows in the HF layout, by the test fixtures' own permutation (conftest.to_hf)."""
    return next(iter(to_hf({ours + ".weight": t}, args).values()))


def metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """a random LoRA (rank 4, alpha 8, B != 0) and a random 5% delta, both trained (so to speak) on tiny.meta1."""
    d = tmp_path_factory.mktemp("finetunes")
    g = torch.Generator().manual_seed(0)
    model = load_model(tiny.meta1, dtype=torch.float32)
    base = finetune.base_of(model, tiny.meta1)
    for layer in lora.add_lora(model, PROJECTIONS, rank=4, alpha=8.0, dropout=0.0).values():
        layer.B.data.normal_(0, 0.05, generator=g)
    finetune.save(model, str(d / "lora.safetensors"), base, meta={"finetune_id": "lora-0", "method": "lora"})
    model = load_model(tiny.meta1, dtype=torch.float32)
    for layer in spiel.add_sparse_deltas(model, PROJECTIONS, density=0.05, seed=0).values():
        layer.values.data.normal_(0, 0.05, generator=g)
    finetune.save(model, str(d / "delta.safetensors"), base, meta={"finetune_id": "delta-0", "method": "spiel-ag"})
    return types.SimpleNamespace(lora=str(d / "lora.safetensors"), delta=str(d / "delta.safetensors"))


def export(src, to, out, ckpt):
    convert.main([src, "--to", to, str(out), "--ckpt", ckpt])
    return str(out)


# -----------------------------------------------------------------------------
# round trips, and the folders as documented


def test_lora_to_peft_and_back(tiny, files, tmp_path):
    out = export(files.lora, "peft", tmp_path / "peft", tiny.meta1)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["task_type"], cfg["bias"]) == ("LORA", 4, 8, "CAUSAL_LM",
                                                                                           "none")
    assert cfg["target_modules"] == SHORT and cfg["fan_in_fan_out"] is False and cfg["use_rslora"] is False
    ours, theirs = load_file(files.lora), load_file(os.path.join(out, "adapter_model.safetensors"))
    assert len(theirs) == len(ours)
    for name, hf in pairs(tiny.args):  # A as it is; B's rows in the HF order (q/k permuted)
        assert torch.equal(theirs[f"base_model.model.{hf}.lora_A.weight"], ours[name + ".A"])
        assert torch.equal(theirs[f"base_model.model.{hf}.lora_B.weight"], hf_rows(tiny.args, name, ours[name + ".B"]))
    assert not torch.equal(theirs["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"],
                           ours["layers.0.attention.wk.B"])  # the permutation moved something
    back = export(out, "spiel", tmp_path / "back.safetensors", tiny.meta1)
    again = load_file(back)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    a, b = metadata(files.lora), metadata(back)
    assert all(a[k] == b[k] for k in ("format", "shapes", "row_order", "base_fingerprint", "base_merged", "finetune_id"))
    assert float(a["alpha"]) / int(a["rank"]) == float(b["alpha"]) / int(b["rank"])


def test_delta_to_sft_and_back(tiny, files, tmp_path):
    out = export(files.delta, "sft", tmp_path / "sft", tiny.meta1)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    ours, theirs = load_file(files.delta), load_file(os.path.join(out, "adapter_model.safetensors"))
    assert cfg["peft_type"] == "SFT" and cfg["target_modules"] == SHORT and cfg["selection_algorithm"] == "rigl"
    assert cfg["num_tunable_weights"] == sum(t.numel() for k, t in ours.items() if k.endswith(".values"))
    assert len(theirs) == len(ours) and len(cfg["num_deltas"]) == len(ours) // 2
    for name, hf in pairs(tiny.args):
        idx, values = theirs[f"base_model.model.{hf}.sft_delta.indices"], theirs[f"base_model.model.{hf}.sft_delta.values"]
        assert idx.dtype == torch.int32 and values.dtype == torch.float32 and cfg["num_deltas"][hf] == idx.numel()
        assert (idx[1:] > idx[:-1]).all()  # ascending, as the authors keep them
        w = tiny.sd[name + ".weight"]  # the same delta as a dense matrix, in each layout
        ours_dense = torch.zeros(w.numel()).index_put_((ours[name + ".indices"].long(),), ours[name + ".values"])
        theirs_dense = torch.zeros(w.numel()).index_put_((idx.long(),), values)
        assert torch.equal(theirs_dense.view(w.shape), hf_rows(tiny.args, name, ours_dense.view(w.shape)))
    q = "base_model.model.model.layers.0.self_attn.q_proj.sft_delta.indices"
    assert not torch.equal(theirs[q], ours["layers.0.attention.wq.indices"])  # positions moved
    back = export(out, "spiel", tmp_path / "back.safetensors", tiny.meta1)
    again = load_file(back)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    a, b = metadata(files.delta), metadata(back)
    assert all(a[k] == b[k] for k in ("format", "shapes", "row_order", "base_fingerprint", "base_merged", "finetune_id",
                                      "num_deltas", "density", "method"))


@pytest.mark.parametrize("kind", ["sft", "peft"])
def test_a_folder_applied_as_documented_equals_merge_py(tiny, files, tmp_path, kind):
    """the export, added by the documented formula into merge.py's plain HF export of the Meta-layout base (no
    fine-tune), gives merge.py's merged weights: a plain scatter for SFT (exactly), W + alpha / r B A for LoRA."""
    src = files.delta if kind == "sft" else files.lora
    merge.main(["--ckpt", tiny.meta1, "--out", str(tmp_path / "plain"), "--dtype", "float32"])
    merge.main(["--ckpt", tiny.meta1, "--delta", src, "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    folder = export(src, kind, tmp_path / kind, tiny.meta1)
    w = load_file(tmp_path / "plain" / "model.safetensors")
    adapter, cfg = load_file(os.path.join(folder, "adapter_model.safetensors")), \
        json.load(open(os.path.join(folder, "adapter_config.json")))
    for key, t in adapter.items():
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        target = w[module + ".weight"]
        if key.endswith(".sft_delta.indices"):
            values = adapter[key.replace(".indices", ".values")]
            w[module + ".weight"] = target.view(-1).scatter_add(0, t.long(), values).view(target.shape)
        elif key.endswith(".lora_A.weight"):
            B = adapter[key.replace("lora_A", "lora_B")]
            w[module + ".weight"] = target + cfg["lora_alpha"] / cfg["r"] * (B @ t)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert w.keys() == merged.keys()
    for k in w:
        if kind == "sft":
            assert torch.equal(w[k], merged[k]), k
        else:
            torch.testing.assert_close(w[k], merged[k], atol=1e-6, rtol=0)
    assert not torch.equal(w["model.layers.0.self_attn.q_proj.weight"], load_file(tmp_path / "plain" / "model.safetensors")
                           ["model.layers.0.self_attn.q_proj.weight"])


def test_reading_the_authors_bin_and_rslora(tiny, files, tmp_path):
    """adapter_model.bin (the authors' default: plain tensors, weights_only) reads like safetensors; a foreign
    folder's id is its weights' hash. use_rslora: scaling alpha / sqrt(r)."""
    model = load_model(tiny.hf, dtype=torch.float32)
    sft = export(files.delta, "sft", tmp_path / "sft", tiny.meta1)
    os.makedirs(tmp_path / "bin")
    shutil.copy(os.path.join(sft, "adapter_config.json"), tmp_path / "bin")
    torch.save(load_file(os.path.join(sft, "adapter_model.safetensors")), tmp_path / "bin" / "adapter_model.bin")
    fa, fb = finetune.read(sft, model.args), finetune.read(str(tmp_path / "bin"), model.args)
    a, meta_a, b, meta_b = fa.tensors, fa.meta, fb.tensors, fb.meta
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["finetune_id"] == "delta-0" and "base_fingerprint" not in meta_b and len(meta_b["finetune_id"]) == 16
    assert fb.id == meta_b["finetune_id"]
    peft_dir = export(files.lora, "peft", tmp_path / "peft", tiny.meta1)
    cfg_path = os.path.join(peft_dir, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    json.dump(cfg | {"use_rslora": True}, open(cfg_path, "w"))
    meta = finetune.read(peft_dir, model.args).meta
    assert float(meta["alpha"]) / int(meta["rank"]) == pytest.approx(cfg["lora_alpha"] / cfg["r"] ** 0.5, rel=1e-12)


# -----------------------------------------------------------------------------
# folders wherever a fine-tune is taken, and the composition rules


def test_folders_in_generate_and_merge_keep_the_refusals(tiny, files, tmp_path, capsys):
    gen = ["--prompt", "copy the cat", "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"]

    def generated(*argv):
        generate.main([*argv, *gen])
        return capsys.readouterr().out

    sft = export(files.delta, "sft", tmp_path / "sft", tiny.meta1)
    peft = export(files.lora, "peft", tmp_path / "peft", tiny.meta1)
    capsys.readouterr()
    base = generated("--ckpt", tiny.hf)
    assert generated("--ckpt", tiny.hf, "--delta", sft) == generated("--ckpt", tiny.hf, "--delta", files.delta) != base
    assert generated("--ckpt", tiny.hf, "--delta", peft) == generated("--ckpt", tiny.hf, "--delta", files.lora) != base
    both = generated("--ckpt", tiny.hf, "--delta", sft, "--delta", peft)
    assert both == generated("--ckpt", tiny.hf, "--delta", files.delta, "--delta", files.lora)
    # merge.py with the folder: the same weights as with our file
    merge.main(["--ckpt", tiny.hf, "--delta", sft, "--out", str(tmp_path / "m"), "--dtype", "float32"])
    merge.main(["--ckpt", tiny.hf, "--delta", files.delta, "--out", str(tmp_path / "m2"), "--dtype", "float32"])
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "m2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # our export keeps its id and base: not applied twice, not applied to another base
    for src in (sft, files.delta):
        with pytest.raises(CheckpointError, match="already merged"):
            generate.main(["--ckpt", str(tmp_path / "m"), "--delta", src, *gen])
    other = write_hf(random_state_dict(tiny.args, seed=1), tiny.args, str(tmp_path / "other"), tokenizer=tiny.tokenizer)
    for src in (sft, peft):
        with pytest.raises(CheckpointError, match="another base"):
            generate.main(["--ckpt", other, "--delta", src, *gen])
    # a foreign folder (no spiel_ metadata): its base cannot be told, its shapes can; still never merged twice
    foreign = tmp_path / "foreign"
    shutil.copytree(sft, foreign)
    save_file(load_file(foreign / "adapter_model.safetensors"), foreign / "adapter_model.safetensors")
    generated("--ckpt", other, "--delta", str(foreign))
    merge.main(["--ckpt", tiny.hf, "--delta", str(foreign), "--out", str(tmp_path / "m3"), "--dtype", "float32"])
    capsys.readouterr()
    m3 = load_model(str(tmp_path / "m3"), dtype=torch.float32)
    with pytest.raises(CheckpointError, match="already merged"):
        finetune.check(finetune.read(str(foreign), m3.args), m3, finetune.base_of(m3, str(tmp_path / "m3")))


def test_merge_py_without_a_fine_tune_exports_the_base(tiny, tmp_path):
    merge.main(["--ckpt", tiny.meta2, "--out", str(tmp_path / "hf"), "--dtype", "float32"])
    x = torch.randint(0, tiny.args.vocab_size, (1, 12))
    torch.testing.assert_close(load_model(str(tmp_path / "hf"), dtype=torch.float32)(x)[0],
                               load_model(tiny.meta2, dtype=torch.float32)(x)[0], atol=0, rtol=0)
    assert json.load(open(tmp_path / "hf" / "config.json"))["spiel_merged"] == []


# -----------------------------------------------------------------------------
# bad input: one line naming the file and the problem, nothing written


class NotATensor:
    pass


def edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    json.dump(json.load(open(path)) | changes, open(path, "w"))


def edit_weights(folder, fn):
    path = os.path.join(folder, "adapter_model.safetensors")
    w = load_file(path)
    fn(w)
    save_file(w, path)


Q = "base_model.model.model.layers.0.self_attn.q_proj"
BROKEN = {  # name: (source kind, the damage, what the message says)
    "missing config": ("sft", lambda d: os.remove(os.path.join(d, "adapter_config.json")), "adapter_config.json: not found"),
    "wrong peft_type": ("sft", lambda d: edit_config(d, peft_type="IA3"), "peft_type 'IA3'"),
    "no weights": ("peft", lambda d: os.remove(os.path.join(d, "adapter_model.safetensors")), "no adapter_model"),
    "lora shape": ("peft", lambda d: edit_weights(d, lambda w: w.update({Q + ".lora_B.weight": torch.zeros(72, 4)})),
                   "model.layers.0.self_attn.q_proj is 72x64 in the adapter but 64x64 in this base"),
    "lora rank": ("peft", lambda d: edit_config(d, r=8), "adapter_config.json's r = 8"),
    "indices out of range": ("sft", lambda d: edit_weights(d, lambda w: w[Q + ".sft_delta.indices"].__setitem__(-1, 4096)),
                             "model.layers.0.self_attn.q_proj has indices outside its 64x64 matrix"),
    "negative index": ("sft", lambda d: edit_weights(d, lambda w: w[Q + ".sft_delta.indices"].__setitem__(0, -1)),
                       "outside its 64x64"),
    "num_deltas": ("sft", lambda d: edit_config(d, num_deltas={Q[17:]: 1}), "num_deltas gives model.layers.0"),
    "lengths": ("sft", lambda d: edit_weights(d, lambda w: w.update({Q + ".sft_delta.values": torch.zeros(3)})),
                "must be 1-D of one length"),
    "repeated index": ("sft", lambda d: edit_weights(d, lambda w: w[Q + ".sft_delta.indices"].__setitem__(
        slice(0, 2), 7)), "repeated indices"),
    "unexpected key": ("peft", lambda d: edit_weights(d, lambda w: w.update(
        {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)})), "unexpected key base_model.model.lm_head"),
    "half a pair": ("peft", lambda d: edit_weights(d, lambda w: w.pop(Q + ".lora_B.weight")), "but no .lora_B.weight"),
    "a layer the base lacks": ("sft", lambda d: edit_weights(d, lambda w: w.update({
        k.replace("layers.0.", "layers.7."): t.clone() for k, t in w.items() if ".layers.0." in k})), "no such module"),
    "dora": ("peft", lambda d: edit_config(d, use_dora=True), "use_dora true is not supported"),
    "rank_pattern": ("peft", lambda d: edit_config(d, rank_pattern={"q_proj": 8}), "rank_pattern"),
    "fan_in_fan_out": ("peft", lambda d: edit_config(d, fan_in_fan_out=True), "fan_in_fan_out true"),
    "bias": ("peft", lambda d: edit_config(d, bias="all"), 'bias "all" is not supported'),
    "modules_to_save": ("peft", lambda d: edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "target lm_head": ("sft", lambda d: edit_config(d, target_modules=["q_proj", "lm_head"]),
                       "target_modules lists lm_head"),
    "pickled object": ("sft", lambda d: (os.remove(os.path.join(d, "adapter_model.safetensors")), torch.save(
        {"x": NotATensor()}, os.path.join(d, "adapter_model.bin"))), "refusing to unpickle"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_format_errors_are_one_line(tiny, files, tmp_path, case):
    kind, damage, needle = BROKEN[case]
    folder = export(files.delta if kind == "sft" else files.lora, kind, tmp_path / kind, tiny.meta1)
    damage(folder)
    model = load_model(tiny.hf, dtype=torch.float32)
    with pytest.raises(CheckpointError) as e:
        finetune.load(model, folder, finetune.base_of(model, tiny.hf))
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(folder), str(e.value)
    assert not spiel.delta_layers(model) and not lora.lora_layers(model)  # the model was not touched


def cli(*args):
    return run_watched([sys.executable, *args], cwd=ROOT)


def one_line_error(p, needle):
    assert p.returncode != 0, p.stdout
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], p.stderr


CLI_ERRORS = (CheckpointError, ValueError, FileExistsError)  # what each CLI's __main__ prints as "error: ..."


def one_line_refusal(main, argv, needle):
    """main(argv) in this process refuses with an error its __main__ prints as one line, saying `needle`."""
    with pytest.raises(CLI_ERRORS) as e:
        main(argv)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow  # (scripts in a shell, or a tool's own run: the slow tier)
def test_the_clis_say_it_in_one_line_and_write_nothing(tiny, files, tmp_path):
    """one real `python merge.py` and `python convert.py` process each (generate.py's: test_llama.py): the __main__
    path prints one line, "error: " first, and exits non-zero; the other refusals run in this process."""
    sft = export(files.delta, "sft", tmp_path / "sft", tiny.meta1)
    edit_config(sft, peft_type="IA3")
    one_line_error(cli("merge.py", "--ckpt", tiny.hf, "--delta", sft, "--out", str(tmp_path / "m")), "peft_type 'IA3'")
    one_line_error(cli("convert.py", files.delta, "--to", "peft", str(tmp_path / "p"), "--ckpt", tiny.hf),
                   "a sparse delta has no PEFT LoRA form")
    one_line_refusal(generate.main, ["--ckpt", tiny.hf, "--delta", str(tmp_path), "--prompt", "x"],
                     "adapter_config.json: not found")
    before = sorted(os.listdir(sft))
    one_line_refusal(convert.main, [files.lora, "--to", "peft", sft, "--ckpt", tiny.hf], "exists and is not empty")
    one_line_refusal(merge.main, ["--ckpt", tiny.hf, "--out", sft], "exists and is not empty")
    assert sorted(os.listdir(sft)) == before
    assert not os.path.exists(tmp_path / "m") and not os.path.exists(tmp_path / "p")
    # a base of another shape (one layer): the file's second layer has nowhere to go
    args1 = dataclasses.replace(tiny.args, n_layers=1)
    one = write_hf(random_state_dict(args1), args1, str(tmp_path / "one"), tokenizer=tiny.tokenizer)
    one_line_refusal(convert.main, [files.delta, "--to", "sft", str(tmp_path / "s"), "--ckpt", one],
                     "layers.1.attention.wq is 64x64 in the file but absent")
    assert not os.path.exists(tmp_path / "s")


# -----------------------------------------------------------------------------
# PEFT itself (where transformers and peft are installed; not dependencies of this repo)


def test_peft_loads_our_export_with_our_logits(tiny, files, tmp_path):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    merge.main(["--ckpt", tiny.meta1, "--out", str(tmp_path / "hf"), "--dtype", "float32"])  # Meta base -> HF
    folder = export(files.lora, "peft", tmp_path / "peft", tiny.meta1)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(ref, folder).eval()
    ours = load_model(tiny.meta1, dtype=torch.float32)
    x = torch.randint(0, tiny.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = ours(x)[0]
        finetune.load(ours, files.lora, finetune.base_of(ours, tiny.meta1))
        a, b = ours(x)[0], ref(input_ids=x).logits
    diff = (a - b).abs().max().item()
    print(f"PEFT on our export: max |logit difference| {diff:.2e} (the adapter moves them by "
          f"{(a - base_logits).abs().max().item():.2e})")
    assert diff < 1e-4 and (a - base_logits).abs().max() > 1e-2


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_trained_adapter_gives_peft_logits_here(tiny, tmp_path, rslora):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    ref, x = train_peft_adapter(tiny, tmp_path / "adapter", peft, transformers, target_modules=SHORT,
                                use_rslora=rslora)
    ours = load_model(tiny.hf, dtype=torch.float32)
    finetune.load(ours, str(tmp_path / "adapter"), finetune.base_of(ours, tiny.hf))
    merge.main(["--ckpt", tiny.hf, "--delta", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"),
                "--dtype", "float32"])
    with torch.no_grad():
        want = ref(input_ids=x).logits
        diffs = [(ours(x)[0] - want).abs().max().item(),
                 (load_model(str(tmp_path / "m"), dtype=torch.float32)(x)[0] - want).abs().max().item()]
        moved = (want - load_model(tiny.hf, dtype=torch.float32)(x)[0]).abs().max().item()
    print(f"a PEFT-trained adapter (rslora {rslora}) here: max |logit difference| applied {diffs[0]:.2e}, "
          f"merged {diffs[1]:.2e} (the adapter moves them by {moved:.2e})")
    assert max(diffs) < 1e-4 and moved > 1e-2
