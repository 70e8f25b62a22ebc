"""
finetune.py, this repo's fine-tune file and the one way in: a sparse delta (SpIEL) or a LoRA adapter saved and
loaded back with the same logits; every way a file is refused (another model's shapes, another base, a base
without a fine-tune merged into the one it was trained on, already merged, already added, tensors out of range,
repeated or of the wrong shape, not a fine-tune, missing), each message naming the file and a refused file
leaving the model untouched; one reader for both kinds, each file applied as its own kind; fine-tunes of one
base adding up when merged; generate.py and merge.py reading each fine-tune from disk once; merge.py writing the
base's own dtype by default. Tiny models, CPU, seconds.
"""

import collections
import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
import finetune
import generate
import llama
import merge
from conftest import TINY, random_state_dict, set_random_values, tokens, write_meta
from files import CheckpointError
from finetune import Base
from finetune import fingerprint
from llama import PROJECTIONS, ModelArgs, Transformer, load_model
from lora import add_lora, lora_layers
from spiel import add_sparse_deltas, delta_layers

N_MATRICES = 7 * TINY["n_layers"]


# -----------------------------------------------------------------------------
# helpers


def tiny_model(seed=0, **changes):
    """a TINY LLaMA with conftest's random weights (seed picks the base)."""
    args = ModelArgs(**(TINY | changes))
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=seed))
    return model.eval()


def base_of(model, merged=()) -> Base:
    """the Base of a model built here (no checkpoint folder): its fingerprint, and what was merged into it."""
    return Base(fingerprint(model), list(merged))


@torch.no_grad()
def randomize_B(model, seed=1, scale=0.05):
    """B = 0 at init makes every LoRA a no-op; give it values so that tests see the update."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.B.copy_(torch.randn(layer.B.shape, generator=g) * scale)


def delta_model(seed=0, density=0.05, delta_seed=0, merged=()):
    """(a tiny model with random sparse deltas on the seven projections, the Base they were trained on)."""
    model = tiny_model(seed=seed)
    base = base_of(model, merged)
    add_sparse_deltas(model, PROJECTIONS, density=density, seed=delta_seed)
    set_random_values(model, seed=delta_seed)
    return model, base


def lora_model(rank=4, alpha=16.0, seed=0):
    """(a tiny model with LoRA adapters, B random, no dropout, the Base they were trained on)."""
    model = tiny_model(seed=seed)
    base = base_of(model)
    add_lora(model, PROJECTIONS, rank, alpha=alpha, dropout=0.0)
    randomize_B(model)
    return model, base


def untouched(model) -> bool:
    return not delta_layers(model) and not lora_layers(model)


def dense_scatter(idx, values, shape):
    """scatter(indices, values) as a dense (out, in) tensor."""
    return torch.zeros(shape[0] * shape[1], dtype=values.dtype).scatter(0, idx.long(), values).view(shape)


def _rewrite(src, dst, edit=None, edit_meta=None):
    """copy a fine-tune file with `edit(tensors)` (and `edit_meta(metadata)`) applied."""
    with safe_open(src, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if edit:
        edit(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, dst, metadata=meta)
    return dst


# -----------------------------------------------------------------------------
# save and load: a sparse delta


def test_save_load_roundtrip(tmp_path):
    """finetune.save / finetune.load give the same logits, indices, values and metadata; only the values train."""
    model, base = delta_model(delta_seed=3)
    x = tokens()
    logits, _ = model(x)
    path = str(tmp_path / "delta.safetensors")
    finetune.save(model, path, base, meta={"step": 7})
    assert os.listdir(tmp_path) == ["delta.safetensors"]  # no .tmp left behind

    fresh = tiny_model()
    ft = finetune.load(fresh, path, base_of(fresh))
    meta = ft.meta
    assert ft.kind == meta["format"] == "spiel-delta" and meta["step"] == "7"
    assert int(meta["num_deltas"]) == sum(m.values.numel() for m in delta_layers(model).values())
    assert meta["base_fingerprint"] == fingerprint(tiny_model()) and json.loads(meta["base_merged"]) == []
    assert torch.equal(fresh(x)[0], logits)
    a, b = delta_layers(model), delta_layers(fresh)
    assert list(a) == list(b)
    for n in a:
        assert torch.equal(a[n].indices.long(), b[n].indices.long()) and torch.equal(a[n].values, b[n].values)
    assert [p for p in fresh.parameters() if p.requires_grad] == [m.values for m in b.values()]


def test_load_delta_sorts_slots(tmp_path):
    """a file whose slots are out of position order loads with slots sorted (values moved along)."""
    model, base = delta_model()
    x = tokens()
    logits, _ = model(x)
    with torch.no_grad():
        for m in delta_layers(model).values():
            perm = torch.randperm(m.indices.numel(), generator=torch.Generator().manual_seed(1))
            m.indices.copy_(m.indices[perm])
            m.values.copy_(m.values[perm])
    path = str(tmp_path / "d.safetensors")
    finetune.save(model, path, base)
    fresh = tiny_model()
    finetune.load(fresh, path, base_of(fresh))
    for m in delta_layers(fresh).values():
        assert torch.equal(m.indices, m.indices.sort().values)
    torch.testing.assert_close(fresh(x)[0], logits, rtol=0, atol=1e-6)


def test_load_delta_errors(tmp_path):
    """every way a delta file can be refused: another model's shapes, another base, indices out of range or
    repeated, not a fine-tune file, missing, already merged into this base, deltas already added. Each message
    names the file, and a refused delta adds no layer. (A LoRA file is no longer refused here: the one reader
    applies it as LoRA, test_one_reader_applies_each_kind_as_itself.)"""
    model, base = delta_model()
    good = str(tmp_path / "good.safetensors")
    finetune.save(model, good, base, meta={"finetune_id": "run-1"})
    name = "layers.0.attention.wq"  # the first matrix of the file

    def out_of_range(t):
        t[name + ".indices"][0] = 64 * 64

    def repeated(t):
        t[name + ".indices"][1] = t[name + ".indices"][0]

    not_delta = str(tmp_path / "weights.safetensors")
    save_file({"w": torch.zeros(3)}, not_delta, metadata={"format": "pt"})
    cases = [  # (file, model to load into, its base, what the message says)
        (good, tiny_model(dim=32), None, "another model"),
        (good, tiny_model(seed=1), None, "another base"),
        (_rewrite(good, str(tmp_path / "range.safetensors"), out_of_range), tiny_model(), None, "outside"),
        (_rewrite(good, str(tmp_path / "rep.safetensors"), repeated), tiny_model(), None, "repeated"),
        (not_delta, tiny_model(), None, "neither a spiel delta nor a LoRA"),
        (str(tmp_path / "missing.safetensors"), tiny_model(), None, "not found"),
        (good, tiny_model(), ["run-1"], "already merged"),
    ]
    for path, target, merged, what in cases:
        with pytest.raises(CheckpointError, match=what) as e:
            finetune.load(target, path, base_of(target, merged or ()))
        assert path in str(e.value)
        assert untouched(target)  # a refused delta leaves the model untouched
    with_deltas, with_base = delta_model()
    before = delta_layers(with_deltas)
    with pytest.raises(CheckpointError, match="already added") as e:
        finetune.load(with_deltas, good, with_base)
    assert good in str(e.value) and delta_layers(with_deltas) == before


def test_two_fine_tunes_of_one_base_add_up(tmp_path):
    """two deltas trained apart on one base merge one after the other into W0 + both scatters (finetune.merge,
    which lists each in the base); a delta trained on a base with a fine-tune merged in loads where that one is
    merged (with others) but not on the bare base."""
    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        model, base = delta_model(delta_seed=seed)
        files[name] = str(tmp_path / f"{name}.safetensors")
        finetune.save(model, files[name], base, meta={"finetune_id": name})
        files[name + "_layers"] = delta_layers(model)
    target = tiny_model()
    base = base_of(target)
    w0 = {n: m.weight.detach().clone() for n, m in target.named_modules() if n in files["a_layers"]}
    finetune.merge(target, finetune.read(files["a"]), base)
    finetune.merge(target, finetune.read(files["b"]), base)  # was refused: trained on a base without "a"
    assert base.merged == ["a", "b"] and untouched(target)
    modules = dict(target.named_modules())
    for n, w in w0.items():
        a, b = files["a_layers"][n], files["b_layers"][n]
        want = w + dense_scatter(a.indices, a.values.detach(), w.shape) + dense_scatter(b.indices, b.values.detach(),
                                                                                        w.shape)
        torch.testing.assert_close(modules[n].weight, want, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="already merged"):  # not twice
        finetune.merge(target, finetune.read(files["a"]), base)
    on_a, on_a_base = delta_model(delta_seed=3, merged=["a"])
    c = str(tmp_path / "c.safetensors")
    finetune.save(on_a, c, on_a_base, meta={"finetune_id": "c"})
    finetune.load(target, c, base)  # a and b merged: fine
    bare = tiny_model()
    with pytest.raises(CheckpointError, match="another base"):
        finetune.load(bare, c, base_of(bare))


@pytest.mark.parametrize("bad_matrix", ["layers.0.attention.wq", "layers.1.feed_forward.w3"])
def test_refused_delta_file_leaves_model_untouched(tmp_path, bad_matrix):
    """finetune.load checks the whole file (repeated / out-of-range indices in any matrix, the first or the last)
    before it touches the model: a refused file leaves no layer wrapped and nothing frozen."""
    model, base = delta_model()
    good = str(tmp_path / "good.safetensors")
    finetune.save(model, good, base)

    def repeated(t):
        t[bad_matrix + ".indices"][1] = t[bad_matrix + ".indices"][0]

    bad = _rewrite(good, str(tmp_path / "bad.safetensors"), repeated)
    target = tiny_model()
    grads = [p.requires_grad for p in target.parameters()]
    with pytest.raises(CheckpointError, match="repeated"):
        finetune.load(target, bad, base_of(target))
    assert not delta_layers(target), f"{len(delta_layers(target))} matrices were wrapped by a refused file"
    assert [p.requires_grad for p in target.parameters()] == grads, "a refused file froze the model"


# -----------------------------------------------------------------------------
# save and load: a LoRA adapter


def test_save_load_round_trip(tmp_path):
    """a LoRA file: the same logits and hyperparameters back; only A and B train."""
    model, base = lora_model(rank=3, alpha=8.0)
    path = str(tmp_path / "lora.safetensors")
    finetune.save(model, path, base, {"step": 7})
    assert os.listdir(tmp_path) == ["lora.safetensors"]  # no .tmp left behind
    x = tokens()
    fresh = tiny_model()
    meta = finetune.load(fresh, path, base_of(fresh)).meta
    assert meta["format"] == "spiel-lora" and meta["rank"] == "3" and meta["step"] == "7"
    assert float(meta["alpha"]) == 8.0 and meta["base_fingerprint"] == fingerprint(tiny_model())
    assert float(meta["dropout"]) == 0.0 and finetune.read(path).kind == "spiel-lora"
    assert torch.equal(fresh.eval()(x)[0], model(x)[0])
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {f"{n}.{ab}" for n in lora_layers(model) for ab in "AB"}


def test_save_refuses_an_empty_model(tmp_path):
    with pytest.raises(ValueError, match="no sparse deltas or LoRA adapters to save"):
        finetune.save(tiny_model(), str(tmp_path / "x.safetensors"), base_of(tiny_model()))
    assert not os.listdir(tmp_path)


def test_load_errors_name_the_file(tmp_path):
    model, base = lora_model()
    path = str(tmp_path / "lora.safetensors")
    finetune.save(model, path, base)

    def load(target, p):
        return finetune.load(target, p, base_of(target))

    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match=f"{missing}: fine-tune file not found"):
        load(tiny_model(), missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="garbage.safetensors: cannot read"):
        load(tiny_model(), str(garbage))
    plain = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match=f"{plain}: neither a spiel delta nor a LoRA adapter"):
        load(tiny_model(), plain)
    with pytest.raises(CheckpointError, match=f"{path}: a fine-tune for layers.1.attention.wq, which this "
                                              f"model does not have"):
        load(tiny_model(n_layers=1), path)
    with pytest.raises(CheckpointError, match=f"{path}: layers.0.feed_forward.w1 is 192x64 in the file but 96x"):
        load(tiny_model(hidden_dim=96), path)
    other = tiny_model(seed=1)
    with pytest.raises(CheckpointError, match=f"{path}: this fine-tune was trained on another base model"):
        load(other, path)
    assert lora_layers(other) == {}  # a refused file leaves the model as it was
    target = tiny_model()
    load(target, path)
    assert len(lora_layers(target)) == N_MATRICES
    with pytest.raises(CheckpointError, match="already added"):
        load(target, path)


def test_one_reader_applies_each_kind_as_itself(tmp_path):
    """(was test_lora.py's test_load_refuses_a_delta_file, when lora.load_lora refused a delta file: now there is
    one reader.) finetune.load applies a delta file as sparse deltas and a LoRA file as LoRA adapters, each with
    its saver's logits; a file whose format says one kind while its tensors are the other's is refused by that
    kind's own checks, naming the file, and leaves the model untouched."""
    x = tokens()
    delta, dbase = delta_model()
    adapter, lbase = lora_model()
    dfile, lfile = str(tmp_path / "delta.safetensors"), str(tmp_path / "lora.safetensors")
    finetune.save(delta, dfile, dbase)
    finetune.save(adapter, lfile, lbase)
    for path, saver, kind, layers, others in ((dfile, delta, "spiel-delta", delta_layers, lora_layers),
                                              (lfile, adapter, "spiel-lora", lora_layers, delta_layers)):
        target = tiny_model()
        assert finetune.load(target, path, base_of(target)).kind == kind
        assert len(layers(target)) == N_MATRICES and not others(target)
        assert torch.equal(target(x)[0], saver(x)[0])

    def relabel(**meta):
        return lambda m: m.update(meta)

    cases = [  # (the file, its new metadata, what its own checks say)
        (dfile, {"format": "spiel-lora"}, "bad metadata"),  # a delta's metadata has no rank or alpha
        (dfile, {"format": "spiel-lora", "rank": "4", "alpha": "16"}, "layers.0.attention.wq needs .A (4, 64)"),
        (lfile, {"format": "spiel-delta"}, "layers.0.attention.wq needs 1-D .indices and .values"),
    ]
    for i, (src, meta, what) in enumerate(cases):
        bad = _rewrite(src, str(tmp_path / f"bad{i}.safetensors"), edit_meta=relabel(**meta))
        target = tiny_model()
        with pytest.raises(CheckpointError, match=re.escape(what)) as e:
            finetune.load(target, bad, base_of(target))
        assert str(e.value).startswith(bad) and untouched(target)


def test_load_rejects_inconsistent_tensors(tmp_path):
    model, base = lora_model(rank=4)
    path = str(tmp_path / "lora.safetensors")
    finetune.save(model, path, base)

    def shorter_A(t):
        t["layers.0.attention.wk.A"] = t["layers.0.attention.wk.A"][:3].contiguous()

    bad = _rewrite(path, str(tmp_path / "bad.safetensors"), shorter_A)
    target = tiny_model()
    with pytest.raises(CheckpointError, match=f"{bad}: layers.0.attention.wk needs .A"):
        finetune.load(target, bad, base_of(target))
    assert untouched(target)


# -----------------------------------------------------------------------------
# the base a fine-tune was trained on


def test_a_fine_tune_for_another_base_is_refused_in_plain_words(tmp_path):
    """another base's weights: says so and what to pass; a base that lacks a fine-tune merged into the one it
    was trained on: names that fine-tune, in words (no fingerprint lists, no "merged []")."""

    def base(seed, merged=()):
        torch.manual_seed(seed)
        model = Transformer(llama.PRESETS["tiny"])
        return model, base_of(model, merged)

    trained_on, trained_base = base(0, merged=["3fa2c1"])  # a base with one fine-tune merged into it
    add_sparse_deltas(trained_on, PROJECTIONS, density=0.05)
    path = str(tmp_path / "delta.safetensors")
    finetune.save(trained_on, path, trained_base, meta={"finetune_id": "d1"})
    ft = finetune.read(path)
    with pytest.raises(CheckpointError) as e:
        finetune.check(ft, *base(1, merged=["3fa2c1"]))
    msg = str(e.value)
    assert msg.startswith(f"{path}: this fine-tune was trained on another base model (it expects the base whose "
                          f"fingerprint is ") and msg.endswith("; pass the --ckpt it was trained on"), msg
    assert "merged" not in msg and "[" not in msg
    with pytest.raises(CheckpointError) as e:
        finetune.check(ft, *base(0))
    assert str(e.value) == f"{path}: this fine-tune was trained on another base model: this one with fine-tune " \
                           f"3fa2c1 merged into it (by merge.py); pass that merged model as --ckpt"
    finetune.check(ft, *base(0, merged=["3fa2c1", "another"]))  # merged since: fine
    assert ft.kind == "spiel-delta"


# -----------------------------------------------------------------------------
# generate.py and merge.py: each fine-tune read once; merge.py writes the base's dtype


@pytest.fixture(scope="module")
def on_hf(tiny, tmp_path_factory):
    """fine-tunes of the tiny HF base: a delta file (id d), a LoRA file (id l) and an SFT folder (id e)."""
    d = tmp_path_factory.mktemp("on_hf")
    out = {}
    for name, kind in (("d", "delta"), ("l", "lora"), ("e", "delta")):
        model = load_model(tiny.hf, dtype=torch.float32, verbose=False)
        base = finetune.base_of(model, tiny.hf)
        if kind == "delta":
            add_sparse_deltas(model, PROJECTIONS, density=0.05, seed=ord(name))
            set_random_values(model, seed=ord(name))
        else:
            add_lora(model, PROJECTIONS, 4, dropout=0.0)
            randomize_B(model)
        out[name] = str(d / f"{name}.safetensors")
        finetune.save(model, out[name], base, meta={"finetune_id": name})
    convert.convert(out["e"], "sft", str(d / "e-sft"), tiny.hf)
    out["e"] = str(d / "e-sft")
    return out


def test_a_fine_tune_is_read_once_on_its_way_into_generate_and_merge(tiny, on_hf, tmp_path, monkeypatch, capsys):
    """generate.py (one fine-tune applied on the fly; several merged in memory) and merge.py read each --delta,
    a file or a folder, once: one finetune.read, and its weights file opened once."""
    reads, opens = collections.Counter(), collections.Counter()
    real_read = finetune.read
    real_opens = {}

    def counting_read(path, args=None):
        reads[path] += 1
        return real_read(path, args)

    monkeypatch.setattr(finetune, "read", counting_read)
    import safetensors
    import safetensors.torch
    for module in (safetensors, safetensors.torch):  # (safe_open, and load_file through it)
        real_opens[module] = module.safe_open

        def counting_open(path, *a, _real=real_opens[module], **kw):
            opens[os.path.abspath(str(path))] += 1
            return _real(path, *a, **kw)

        monkeypatch.setattr(module, "safe_open", counting_open)
    weights = {p: os.path.abspath(os.path.join(p, "adapter_model.safetensors") if os.path.isdir(p) else p)
               for p in on_hf.values()}
    gen = ["--ckpt", tiny.hf, "--prompt", "the cat", "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]

    def once(*paths):
        assert {p: reads[p] for p in paths} == {p: 1 for p in paths}, reads
        assert {p: opens[weights[p]] for p in paths} == {p: 1 for p in paths}, opens
        reads.clear()
        opens.clear()

    generate.main([*gen, "--delta", on_hf["l"]])  # check + apply
    once(on_hf["l"])
    generate.main([*gen, "--delta", on_hf["d"], "--delta", on_hf["e"]])  # merged one after the other
    once(on_hf["d"], on_hf["e"])
    merge.main(["--ckpt", tiny.hf, "--delta", on_hf["d"], "--delta", on_hf["l"], "--delta", on_hf["e"],
                "--out", str(tmp_path / "m")])
    once(on_hf["d"], on_hf["l"], on_hf["e"])
    capsys.readouterr()
    assert json.load(open(tmp_path / "m" / "config.json"))["spiel_merged"] == ["d", "l", "e"]


def exported_dtypes(folder) -> set:
    tensors = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            tensors |= load_file(os.path.join(folder, name))
    assert json.load(open(os.path.join(folder, "config.json")))["torch_dtype"] == \
        str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    return {t.dtype for t in tensors.values()}


def test_merge_py_writes_the_base_dtype_by_default(tiny, on_hf, tmp_path, capsys):
    """an fp32 HF base merged with a delta: fp32 safetensors whose logits equal the in-memory merged model's
    (--dtype bfloat16 still gives bf16); a Meta base stored in bf16 gives bf16, with its own merged logits."""
    x = tokens()
    delta = on_hf["d"]

    def merged_in_memory(ckpt, dtype):
        model = load_model(ckpt, dtype=dtype, verbose=False)
        finetune.merge(model, finetune.read(delta), finetune.base_of(model, ckpt))
        return model(x)[0]

    merge.main(["--ckpt", tiny.hf, "--delta", delta, "--out", str(tmp_path / "fp32")])
    assert exported_dtypes(tmp_path / "fp32") == {torch.float32}
    assert torch.equal(load_model(str(tmp_path / "fp32"), dtype=None, verbose=False)(x)[0],
                       merged_in_memory(tiny.hf, torch.float32))
    merge.main(["--ckpt", tiny.hf, "--delta", delta, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert exported_dtypes(tmp_path / "bf16") == {torch.bfloat16}
    # Meta's weights as Meta ships them: bf16 (the same weights rounded: the same fingerprint, so the delta fits)
    meta16 = write_meta({k: v.to(torch.bfloat16) for k, v in tiny.sd.items()}, tiny.args, str(tmp_path / "meta16"))
    shutil.copy(tiny.tokenizer, tmp_path / "tokenizer.model")  # one level up, as Meta ships it
    merge.main(["--ckpt", meta16, "--delta", delta, "--out", str(tmp_path / "from-meta")])
    assert exported_dtypes(tmp_path / "from-meta") == {torch.bfloat16}
    assert torch.equal(load_model(str(tmp_path / "from-meta"), dtype=None, verbose=False)(x)[0],
                       merged_in_memory(meta16, None))
    out = capsys.readouterr().out
    assert "(Hugging Face layout, float32)" in out and "(Hugging Face layout, bfloat16)" in out
