"""lora.py: the layer against the dense formula (a quantized base too), dropout, merging (bf16 rounded once),
the budget, and training that leaves the base untouched. Saving and loading a LoRA file: test_finetune.py."""

import math

import pytest
import torch
import torch.nn as nn

import llama
import spiel
from conftest import TINY, random_state_dict
from llama import PROJECTIONS
from lora import LoRALinear, add_lora, lora_layers, merge_lora, rank_for_budget
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
    add_lora(model, PROJECTIONS, rank, alpha=alpha, dropout=0.0)
    return model


# -----------------------------------------------------------------------------
# the layer


def test_zero_init_gives_exactly_the_base_logits():
    x = tokens()
    base = tiny_model()(x)[0]
    model = tiny_model()
    layers = add_lora(model, PROJECTIONS, rank=4, alpha=16.0, dropout=0.1)
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
    add_lora(model, PROJECTIONS, 4, dropout=0.0)
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
    assert spiel.lora_param_count(model, PROJECTIONS, 1) == per_rank
    for r in (1, 4, 64):
        budget = spiel.lora_param_count(model, PROJECTIONS, r)
        assert rank_for_budget(model, PROJECTIONS, budget) == r
        assert rank_for_budget(model, PROJECTIONS, budget - 1) == r - 1 if r > 1 else True
        assert rank_for_budget(model, PROJECTIONS, budget + per_rank - 1) == r
    with pytest.raises(ValueError, match="below LoRA rank 1"):
        rank_for_budget(model, PROJECTIONS, per_rank - 1)
    r = rank_for_budget(model, PROJECTIONS, 10_000)
    add_lora(model, PROJECTIONS, r)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == spiel.lora_param_count(tiny_model(), PROJECTIONS, r) <= 10_000


def test_add_lora_counts_and_refuses_twice():
    model = tiny_model()
    layers = add_lora(model, PROJECTIONS, rank=2)
    assert list(layers) == [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        spiel.lora_param_count(tiny_model(), PROJECTIONS, 2)
    with pytest.raises(ValueError, match="already added"):
        add_lora(model, PROJECTIONS, rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(tiny_model(), PROJECTIONS, rank=0)


# -----------------------------------------------------------------------------
# training


def test_training_lowers_loss_and_leaves_the_base_untouched():
    model = tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, PROJECTIONS, rank=4, alpha=16.0, dropout=0.0)
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
