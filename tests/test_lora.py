import math
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import llama
import spiel
from conftest import TINY, random_state_dict
from lora import LoRALinear, add_lora, load_lora, lora_layers, merge_lora, rank_for_budget, save_lora
from quantize import QuantLinear

N_MATRICES = 7 * TINY["n_layers"]


def tiny_model(seed=0, **overrides):
    args = llama.ModelArgs(**(TINY | overrides))
    model = llama.Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=seed))
    return model.eval()


def tokens(seed=0, B=2, T=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=g)


def randomize_B(model, seed=1, scale=0.05):
    # B = 0 at init makes every LoRA a no-op; give it values so tests can see the update
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * scale)


def lora_model(rank=4, alpha=16.0, seed=0):
    model = tiny_model(seed=seed)
    add_lora(model, rank, alpha=alpha, dropout=0.0)
    return model


# -----------------------------------------------------------------------------
# the layer


def test_zero_init_gives_exactly_the_base_logits():
    x = tokens()
    base = tiny_model()(x)[0]
    model = tiny_model()
    layers = add_lora(model, rank=4, alpha=16.0, dropout=0.1)
    assert len(layers) == N_MATRICES and all(isinstance(m, LoRALinear) for m in layers.values())
    for m in layers.values():
        assert (m.B == 0).all() and (m.A != 0).any()
        assert m.A.dtype == m.B.dtype == torch.float32 and m.scaling == 4.0
        bound = 1 / math.sqrt(m.weight_shape[1])  # kaiming-uniform(a=sqrt(5)) on (r, in)
        assert m.A.abs().max() <= bound and m.A.abs().max() > 0.5 * bound
    assert torch.equal(model.eval()(x)[0], base)


def test_forward_equals_dense_formula():
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(24, 40, bias=False)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=0.0, generator=g)
    with torch.no_grad():
        layer.B.copy_(torch.randn(40, 3, generator=g))
    x = torch.randn(2, 5, 24, generator=g)
    w = base.weight + 2.0 * layer.B @ layer.A  # scaling = alpha / rank = 2
    torch.testing.assert_close(layer(x), x @ w.T)
    assert not base.weight.requires_grad and layer.A.requires_grad and layer.B.requires_grad
    # a bf16 base: the low-rank path runs in x's dtype, the parameters stay fp32
    layer.base = base.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    out = layer(xb)
    assert out.dtype == torch.bfloat16 and layer.A.dtype == layer.B.dtype == torch.float32
    torch.testing.assert_close(out.float(), xb.float() @ w.T, rtol=3e-2, atol=3e-2)


def test_forward_on_quantized_base_and_merge_refused():
    g = torch.Generator().manual_seed(0)
    q = QuantLinear(64, 32, "int8")
    q.load_weight(torch.randn(32, 64, generator=g) * 0.1)
    layer = LoRALinear(q, rank=2, alpha=4.0, dropout=0.0, generator=g)
    assert not any(p.requires_grad for p in q.parameters()) and {n for n, _ in layer.named_parameters()} == {"A", "B"}
    with torch.no_grad():
        layer.B.copy_(torch.randn(32, 2, generator=g))
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(layer(x), x @ (q.dequantize(torch.float32) + 2.0 * layer.B @ layer.A).T)
    model = nn.Sequential()
    model.wq = layer
    with pytest.raises(ValueError, match="quantized"):
        merge_lora(model)
    assert model.wq is layer and layer.base is q  # refused: the wrapper stays, the base is untouched
    torch.testing.assert_close(layer(x), x @ (q.dequantize(torch.float32) + 2.0 * layer.B @ layer.A).T)


def test_dropout_only_on_the_lora_path():
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(16, 8, bias=False)
    layer = LoRALinear(base, rank=2, dropout=0.5, generator=g).train()
    x = torch.randn(4, 16, generator=g)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout must not touch the base path
    with torch.no_grad():
        layer.B.normal_(generator=g)
    assert not torch.allclose(layer(x), layer(x))  # training: random masks differ between calls
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert isinstance(LoRALinear(base, rank=2, dropout=0.0).dropout, nn.Identity)  # no dropout: no mask at all


def test_merged_logits_equal_unmerged_logits():
    model = lora_model()
    randomize_B(model)
    x = tokens()
    layers = lora_layers(model)
    want = {n: m.base.weight + m.scaling * m.B @ m.A for n, m in layers.items()}  # W0 + (alpha / r) B A
    out = model(x)[0]
    merge_lora(model)
    # the plain linears are back, holding the update (an export keeps it)
    assert not lora_layers(model)
    assert all(type(model.get_submodule(n)) is nn.Linear and model.get_submodule(n) is m.base
               for n, m in layers.items())
    assert not torch.allclose(model.layers[0].attention.wq.weight, tiny_model().layers[0].attention.wq.weight)
    for n in layers:
        torch.testing.assert_close(model.get_submodule(n).weight, want[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x)[0], out, rtol=1e-4, atol=1e-4)
    merge_lora(model)  # nothing left to merge: a no-op
    torch.testing.assert_close(model(x)[0], out, rtol=1e-4, atol=1e-4)
    # a zero-initialised LoRA merges into exactly the base
    model = lora_model()
    merge_lora(model)
    assert not lora_layers(model) and isinstance(model.layers[1].feed_forward.w2, nn.Linear)
    assert torch.equal(model(x)[0], tiny_model()(x)[0])


def test_merge_into_bf16_rounds_once():
    model = tiny_model().to(torch.bfloat16)  # a bf16 base; A and B stay fp32
    add_lora(model, 4, dropout=0.0)
    randomize_B(model)
    layer = lora_layers(model)["layers.1.feed_forward.w2"]
    assert layer.base.weight.dtype == torch.bfloat16 and layer.A.dtype == layer.B.dtype == torch.float32
    want = (layer.base.weight.float() + layer.scaling * (layer.B.float() @ layer.A.float())).to(torch.bfloat16)
    merge_lora(model)
    w = model.layers[1].feed_forward.w2.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, want)


# -----------------------------------------------------------------------------
# budget


def test_rank_for_budget_matches_lora_param_count():
    model = tiny_model()
    d, f, kv = TINY["dim"], model.args.ffn_dim, model.args.n_kv_heads * model.args.head_dim
    per_rank = TINY["n_layers"] * (2 * d + 2 * (d + kv) + 2 * d + 3 * (d + f))  # wq, wk+wv, wo, w1+w2+w3
    assert spiel.lora_param_count(model, 1) == per_rank
    for r in (1, 4, 64):
        budget = spiel.lora_param_count(model, r)
        assert rank_for_budget(model, budget) == r
        assert rank_for_budget(model, budget - 1) == r - 1 if r > 1 else True
        assert rank_for_budget(model, budget + per_rank - 1) == r
    with pytest.raises(ValueError, match="below LoRA rank 1"):
        rank_for_budget(model, per_rank - 1)
    r = rank_for_budget(model, 10_000)
    add_lora(model, r)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == spiel.lora_param_count(tiny_model(), r) <= 10_000


def test_add_lora_counts_and_refuses_twice():
    model = tiny_model()
    layers = add_lora(model, rank=2)
    assert list(layers) == [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == spiel.lora_param_count(tiny_model(), 2)
    with pytest.raises(ValueError, match="already added"):
        add_lora(model, rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(tiny_model(), rank=0)


# -----------------------------------------------------------------------------
# save and load


def test_save_load_round_trip(tmp_path):
    model = lora_model(rank=3, alpha=8.0)
    randomize_B(model)
    path = str(tmp_path / "lora.safetensors")
    save_lora(model, path, {"step": 7})
    assert os.listdir(tmp_path) == ["lora.safetensors"]  # no .tmp left behind
    x = tokens()
    fresh = tiny_model()
    meta = load_lora(fresh, path)
    assert meta["format"] == "spiel-lora" and meta["rank"] == "3" and meta["step"] == "7"
    assert float(meta["alpha"]) == 8.0 and meta["base_fingerprint"] == llama.base_fingerprint(tiny_model())
    assert float(meta["dropout"]) == 0.0 and llama.read_finetune(path)[0] == "spiel-lora"
    assert torch.equal(fresh.eval()(x)[0], model(x)[0])
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {f"{n}.{ab}" for n in lora_layers(model) for ab in "AB"}


def test_save_refuses_an_empty_model(tmp_path):
    with pytest.raises(ValueError, match="no LoRA"):
        save_lora(tiny_model(), str(tmp_path / "x.safetensors"))


def test_load_errors_name_the_file(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    save_lora(lora_model(), path)
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(llama.CheckpointError, match=f"{missing}: fine-tune file not found"):
        load_lora(tiny_model(), missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(llama.CheckpointError, match="garbage.safetensors: cannot read"):
        load_lora(tiny_model(), str(garbage))
    plain = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(llama.CheckpointError, match=f"{plain}: neither a spiel delta nor a LoRA adapter"):
        load_lora(tiny_model(), plain)
    with pytest.raises(llama.CheckpointError, match=f"{path}: a fine-tune for layers.1.attention.wq, which this "
                                                    f"model does not have"):
        load_lora(tiny_model(n_layers=1), path)
    with pytest.raises(llama.CheckpointError, match=f"{path}: layers.0.feed_forward.w1 is 192x64 in the file but 96x"):
        load_lora(tiny_model(hidden_dim=96), path)
    other = tiny_model(seed=1)
    with pytest.raises(llama.CheckpointError, match=f"{path}: this fine-tune was trained on another base model"):
        load_lora(other, path)
    assert lora_layers(other) == {}  # a refused file leaves the model as it was
    model = tiny_model()
    load_lora(model, path)
    assert len(lora_layers(model)) == N_MATRICES
    with pytest.raises(llama.CheckpointError, match="already added"):
        load_lora(model, path)


def test_load_refuses_a_delta_file(tmp_path):
    spiel_model = tiny_model()
    spiel.add_sparse_deltas(spiel_model, density=0.01)
    delta = str(tmp_path / "delta.safetensors")
    spiel.save_delta(spiel_model, delta)
    with pytest.raises(llama.CheckpointError, match=f"{delta}: not a spiel LoRA file"):
        load_lora(tiny_model(), delta)


def test_load_rejects_inconsistent_tensors(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    save_lora(lora_model(rank=4), path)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["layers.0.attention.wk.A"] = tensors["layers.0.attention.wk.A"][:3].contiguous()
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata=meta)
    with pytest.raises(llama.CheckpointError, match=f"{bad}: layers.0.attention.wk needs .A"):
        load_lora(tiny_model(), bad)


# -----------------------------------------------------------------------------
# training


def test_training_lowers_loss_and_leaves_the_base_untouched():
    model = tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, rank=4, alpha=16.0, dropout=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * N_MATRICES and all(n.endswith((".A", ".B")) for n in trainable)
    model.train()
    x = tokens(B=4, T=32)
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    after = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not p.requires_grad}
    assert after.keys() == base.keys()
    assert all(torch.equal(after[n], base[n]) for n in base)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
