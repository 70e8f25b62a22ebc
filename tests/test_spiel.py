"""
Tests for spiel.py (SpIEL, Ansell et al. 2024, arXiv 2401.16405): the sparse-delta layer against the
dense formula (gradcheck in fp64), PEFT invariants on a tiny LLaMA (zero deltas = base, merge/unmerge,
save/load and every way a delta file can be refused), the schedule, drop/grow invariants over many
reselections (AG and MA), AG and MA growth on hand-built cases with known answers, the loss going down
while the base stays bit-identical, the budget, and random positions. CPU only, a few seconds.
"""

import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quantize  # noqa: E402
import spiel  # noqa: E402
from conftest import TINY, random_state_dict  # noqa: E402
from llama import CheckpointError, ModelArgs, Transformer  # noqa: E402
from sm3 import SM3  # noqa: E402
from spiel import (Schedule, Selector, SparseDeltaFn, SparseDeltaLinear, accumulate_window,  # noqa: E402
                   add_sparse_deltas, delta_layers, load_delta, ma_candidates, merge_deltas, open_windows,
                   random_positions, save_delta, split_budget, unmerge_deltas)


# -----------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """tiny matrices: one intra-op thread is as fast, and does not stall when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed=0, **changes):
    """a TINY LLaMA with conftest's random weights (seed picks the base)."""
    args = ModelArgs(**(TINY | changes))
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=seed))
    return model


def tokens(seed=0, B=2, T=12):
    return torch.randint(TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def set_random_values(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    for layer in delta_layers(model).values():
        layer.values.copy_(torch.randn(layer.values.shape, generator=g) * scale)


def frozen_state(model):
    """clones of everything that is not a delta (base weights, norms, embeddings)."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".values", ".indices"))}


def train(model, method, opt, schedule, steps, batch_fn, grad_accum=1, reselect=None):
    """the SpIEL loop: open the AG window, backward every micro-batch, step, then drop/grow when due."""
    sel = Selector(model, method, schedule, grad_accum=grad_accum)
    losses = []
    for t in range(1, steps + 1):
        sel.begin_step(t)
        total = 0.0
        for micro in range(grad_accum):
            x = batch_fn(t, micro)
            _, loss = model(x[:, :-1], x[:, 1:])
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        opt.step()
        opt.zero_grad(set_to_none=True)
        if schedule.is_reselection(t):
            if reselect is None:
                sel.reselect(t, opt)
            else:
                reselect(sel, t)  # a test's checks around sel.reselect
        losses.append(total)
    return losses


def slots_of(indices, positions):
    """the slots of `indices` that hold `positions` (each must be there)."""
    hit = indices.long()[None, :] == positions.long()[:, None]  # (m, k)
    assert bool(hit.any(1).all()), "a position is not in the indices"
    return hit.int().argmax(1)


def dense_scatter(idx, values, shape):
    """scatter(indices, values) as a dense (out, in) tensor, differentiable wrt values."""
    return torch.zeros(shape[0] * shape[1], dtype=values.dtype).scatter(0, idx.long(), values).view(shape)


# -----------------------------------------------------------------------------
# 1. the layer: gradcheck and the dense formula


@pytest.mark.parametrize("bias", [False, True])
def test_layer_matches_dense_formula_and_gradcheck(bias):
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(6, 4, bias=bias), 7, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        layer.values.copy_(torch.randn(7, dtype=torch.float64))
    base = layer.base
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)

    # gradients wrt x and values by finite differences, in fp64
    assert torch.autograd.gradcheck(lambda x, v: SparseDeltaFn.apply(x, v, layer), (x, layer.values))

    # the same numbers as autograd through F.linear(x, W0 + scatter(values), b)
    y = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    vr = layer.values.detach().clone().requires_grad_(True)
    w = base.weight.detach() + dense_scatter(layer.indices, vr, (4, 6))
    y_ref = F.linear(xr, w, None if base.bias is None else base.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, layer.values), dy, retain_graph=True)
    gx_ref, gv_ref = torch.autograd.grad(y_ref, (xr, vr), dy)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv, gv_ref, rtol=1e-12, atol=1e-12)

    # the frozen base gets no gradient at all
    y.backward(dy)
    assert layer.values.grad is not None
    assert base.weight.grad is None and not base.weight.requires_grad
    if bias:
        assert base.bias.grad is None and not base.bias.requires_grad


# -----------------------------------------------------------------------------
# 2. a tiny Transformer: zero deltas, merge/unmerge, save/load and its errors


def test_zero_deltas_give_the_base_logits():
    model = tiny_model()
    x = tokens()
    base_logits, _ = model(x)
    layers = add_sparse_deltas(model, density=0.05, verbose=False)
    assert len(layers) == 14
    assert all(torch.count_nonzero(m.values) == 0 for m in layers.values())
    logits, _ = model(x)
    assert torch.equal(logits, base_logits)


def test_merge_unmerge_and_merged_logits():
    model = tiny_model()
    x = tokens()
    layers = add_sparse_deltas(model, density=0.05, verbose=False)
    set_random_values(model)
    base_w = {n: m.base.weight.clone() for n, m in layers.items()}
    sparse_logits, _ = model(x)
    base_model_logits, _ = tiny_model()(x)
    assert not torch.allclose(sparse_logits, base_model_logits, atol=1e-3)  # the deltas matter

    merge_deltas(model)
    assert all(m.merged for m in layers.values())
    for n, m in layers.items():
        assert torch.equal(m.base.weight, base_w[n] + dense_scatter(m.indices, m.values.detach(), base_w[n].shape))
    merged_logits, _ = model(x)
    assert torch.equal(merged_logits, sparse_logits)
    merge_deltas(model)  # a second merge must not add the deltas twice
    assert torch.equal(model(x)[0], sparse_logits)

    unmerge_deltas(model)
    assert not any(m.merged for m in layers.values())
    for n, m in layers.items():
        torch.testing.assert_close(m.base.weight, base_w[n], rtol=0, atol=1e-7)
    torch.testing.assert_close(model(x)[0], sparse_logits, rtol=0, atol=1e-5)


def test_save_load_roundtrip(tmp_path):
    model = tiny_model()
    x = tokens()
    add_sparse_deltas(model, density=0.05, verbose=False, seed=3)
    set_random_values(model)
    logits, _ = model(x)
    path = str(tmp_path / "delta.safetensors")
    save_delta(model, path, extra={"step": 7})

    fresh = tiny_model()
    meta = load_delta(fresh, path)
    assert meta["format"] == "spiel-delta" and meta["step"] == "7"
    assert torch.equal(fresh(x)[0], logits)
    a, b = delta_layers(model), delta_layers(fresh)
    assert list(a) == list(b)
    for n in a:
        assert torch.equal(a[n].indices.long(), b[n].indices.long()) and torch.equal(a[n].values, b[n].values)
    assert [p for p in fresh.parameters() if p.requires_grad] == [m.values for m in b.values()]


def _rewrite(src, dst, edit):
    """copy a delta file with `edit(tensors)` applied, metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, dst, metadata=meta)
    return dst


def test_load_delta_errors(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    add_sparse_deltas(model, density=0.05, verbose=False)
    set_random_values(model)
    good = str(tmp_path / "good.safetensors")
    save_delta(model, good)
    name = "layers.0.attention.wq"

    def out_of_range(t):
        t[name + ".indices"][0] = 64 * 64

    def repeated(t):
        t[name + ".indices"][1] = t[name + ".indices"][0]

    not_delta = str(tmp_path / "weights.safetensors")
    save_file({"w": torch.zeros(3)}, not_delta, metadata={"format": "pt"})
    cases = [  # (file, model to load into, what the message says)
        (good, tiny_model(dim=32), "another model"),
        (good, tiny_model(seed=1), "another base"),
        (_rewrite(good, str(tmp_path / "range.safetensors"), out_of_range), tiny_model(), "outside"),
        (_rewrite(good, str(tmp_path / "rep.safetensors"), repeated), tiny_model(), "repeated"),
        (not_delta, tiny_model(), "not a spiel delta"),
        (str(tmp_path / "missing.safetensors"), tiny_model(), "not found"),
    ]
    for path, target, what in cases:
        with pytest.raises(CheckpointError, match=what) as e:
            load_delta(target, path)
        assert path in str(e.value)
        assert not delta_layers(target)  # a refused delta leaves the model untouched


def test_merge_into_quantized_base_is_refused():
    model = quantize.quantize_model(tiny_model(), "int8")
    layers = add_sparse_deltas(model, density=0.05, verbose=False)
    assert all(isinstance(m.base, quantize.QuantLinear) for m in layers.values())
    set_random_values(model)
    x = tokens()
    logits, _ = model(x)
    with pytest.raises(ValueError, match="quantized"):
        merge_deltas(model)
    assert not any(m.merged for m in layers.values())
    assert torch.equal(model(x)[0], logits)


# -----------------------------------------------------------------------------
# 3. the schedule


def test_schedule_paper_defaults():
    s = Schedule(100, interval=20, first=5)
    assert [t for t in range(1, 300) if s.is_reselection(t)] == [5, 25, 45, 65, 85]
    windows = [t for t in range(1, 120) if s.window_open(t)]
    assert windows == [*range(1, 6), *range(20, 26), *range(40, 46), *range(60, 66), *range(80, 86)]
    assert s.fraction(5) == 1.0
    for t in (25, 45, 65, 85):
        assert math.isclose(s.fraction(t), 0.2 * (1 - t / 100), rel_tol=1e-12)

    c = Schedule(100, interval=20, first=5, rho0=0.3, decay="cosine")
    assert c.fraction(5) == 1.0
    for t in (25, 45, 65, 85):
        assert math.isclose(c.fraction(t), 0.3 * (1 + math.cos(math.pi * t / 100)) / 2, rel_tol=1e-12)


def test_schedule_other_settings_and_errors():
    s = Schedule(50, interval=10, first=3)
    assert [t for t in range(1, 100) if s.is_reselection(t)] == [3, 13, 23, 33, 43]
    assert [t for t in range(1, 60) if s.window_open(t)] == [1, 2, 3, *range(10, 14), *range(20, 24),
                                                              *range(30, 34), *range(40, 44)]
    with pytest.raises(ValueError):
        Schedule(100, interval=5, first=5)
    with pytest.raises(ValueError):
        Schedule(100, decay="exp")


# -----------------------------------------------------------------------------
# 4. invariants over many reselections, AG and MA


PER_SLOT = ("exp_avg", "exp_avg_sq", "age", "momentum_buffer")  # optimizer state with one entry per delta


def snapshot(layers, opt):
    snap = {}
    for name, m in layers.items():
        st = opt.state.get(m.values, {})
        snap[name] = dict(idx=m.indices.long().clone(), val=m.values.detach().clone(),
                          window=None if m.window is None else
                          {k: v.clone() if torch.is_tensor(v) else v for k, v in m.window.items()},
                          state={k: v.clone() for k, v in st.items() if k in PER_SLOT})
    return snap


@pytest.mark.parametrize("method", ["ag", "ma"])
def test_reselection_invariants(method):
    torch.manual_seed(0)
    model = tiny_model()
    layers = add_sparse_deltas(model, density=0.05, verbose=False)
    params = [m.values for m in layers.values()]
    grad_accum = 2 if method == "ag" else 1
    opt = spiel.AdamW(params, lr=1e-2) if method == "ag" else SM3(params, lr=1e-1, momentum=0.9)
    schedule = Schedule(60, interval=6, first=2, rho0=0.5)
    b1, b2 = 0.9, 0.999
    stats = {"reselections": 0, "moved": 0}

    def checked(sel, t):
        # reselect may reorder the slots (the positions are what count), so compare position by position
        frac = schedule.fraction(t)
        before = snapshot(layers, opt)
        changed = sel.reselect(t, opt)
        stats["reselections"] += 1
        for name, m in layers.items():
            s = before[name]
            k = s["idx"].numel()
            n = math.floor(k * frac)
            out_f, in_f = m.weight_shape
            idx = m.indices.long()
            assert idx.numel() == k and m.values.numel() == k  # k constant
            assert torch.unique(idx).numel() == k and 0 <= int(idx.min()) and int(idx.max()) < out_f * in_f
            was_active = torch.isin(idx, s["idx"])
            grown, kept = idx[~was_active], idx[was_active]  # positions new to the active set / still there
            dropped = s["idx"][~torch.isin(s["idx"], idx)]
            assert grown.numel() == dropped.numel() <= n and changed[name] == grown.numel()
            stats["moved"] += grown.numel()
            # dropped = smallest |value|: every removed value ranks among the n smallest before reselect
            # (a kept value may be smaller only if it was dropped and regrown at the same position)
            a = s["val"].abs()
            a_dropped, a_kept = a[slots_of(s["idx"], dropped)], a[slots_of(s["idx"], kept)]
            for v in a_dropped.tolist():
                assert int((a < v).sum()) < n
            # the same, said as "removed <= min of kept", once the <= n - m dropped-and-regrown are skipped
            regrown = n - dropped.numel()
            if dropped.numel() and regrown < kept.numel():
                assert a_dropped.max() <= a_kept.kthvalue(regrown + 1).values
            # grown deltas start at exactly 0; kept positions keep their value and optimizer state
            new_slots, old_slots = slots_of(idx, grown), slots_of(s["idx"], kept)
            kept_slots = slots_of(idx, kept)
            assert torch.all(m.values[new_slots] == 0)
            assert torch.equal(m.values.detach()[kept_slots], s["val"][old_slots])
            st = opt.state[m.values]
            for key, old in s["state"].items():
                assert torch.equal(st[key][kept_slots], old[old_slots]), key
            if method == "ma":  # momentum of a grown delta restarts at 0
                assert torch.all(st["momentum_buffer"][new_slots] == 0)
            else:  # AG: the window held every micro-batch of steps 1..first, later of r - first .. r
                w = s["window"]
                assert w["count"] == (schedule.first if t == schedule.first else schedule.first + 1) * grad_accum
                # grown deltas' Adam state is seeded from the window (the formula written out here)
                j = slots_of(w["candidates"], grown)  # (m,) into the candidates
                age = w["count"] / grad_accum
                m, sq = w["grad_sum"][j] / w["count"], w["sq_sum"][j] / w["count"]  # per micro-batch
                mean = grad_accum * m  # E[step gradient]; E[step gradient^2] = mean^2 + accum * Var(micro)
                mean_sq = mean ** 2 + grad_accum * (sq - m ** 2).clamp_min(0)
                torch.testing.assert_close(st["exp_avg"][new_slots], mean * (1 - b1 ** age), rtol=1e-6, atol=0)
                torch.testing.assert_close(st["exp_avg_sq"][new_slots], mean_sq * (1 - b2 ** age), rtol=1e-6, atol=0)
                assert torch.all(st["age"][new_slots] == age)
        assert all(m.window is None for m in layers.values())  # windows close at reselection

    g = torch.Generator().manual_seed(1)

    def batch(t, micro):
        if method == "ag":  # the window is open exactly for the backward passes of window steps
            assert all((m.window is not None) == schedule.window_open(t) for m in layers.values()), t
        return torch.randint(256, (2, 13), generator=g)

    train(model, method, opt, schedule, 60, batch, grad_accum=grad_accum, reselect=checked)
    assert stats["reselections"] == 10  # t = 2, 8, ..., 56
    assert stats["moved"] > sum(m.values.numel() for m in layers.values())  # positions really moved


# -----------------------------------------------------------------------------
# 5. SpIEL-AG on a constructed case


def ag_case():
    """one 4x5 layer, k = 6 at positions [0, 3, 7, 10, 14, 19], with an AdamW state from one real step."""
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(5, 4, bias=False), 6, indices=torch.tensor([0, 3, 7, 10, 14, 19]))
    opt = spiel.AdamW([layer.values], lr=1e-3)
    layer(torch.randn(3, 5)).square().sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # |values| order: slot 4 (pos 14) < slot 1 (pos 3) < slot 3 (pos 10) < 0 < 5 < 2
        layer.values.copy_(torch.tensor([0.5, -0.01, 2.0, 0.03, -0.002, -1.0]))
    return layer, opt


def test_ag_grows_top_accumulated_gradients_and_seeds_adam():
    layer, opt = ag_case()
    model = nn.Sequential(layer)
    schedule = Schedule(100, interval=20, first=5, rho0=0.8)
    t = 25
    assert int(6 * schedule.fraction(t)) == 3  # drop the 3 smallest |values|: positions 14, 3, 10
    grad_accum, b1, b2 = 2, 0.9, 0.999
    # candidates as accumulate_window leaves them: position 7 stays active (best score, not eligible),
    # 18 and 2 are grown, 3 was dropped and is regrown (keeps its value and state), 5 and 11 lose
    cand = torch.tensor([7, 2, 11, 3, 18, 5])
    grad_sum = torch.tensor([9.0, -4.0, 0.5, 3.0, -6.0, 1.0])
    sq_sum = torch.tensor([30.0, 9.0, 1.0, 5.0, 20.0, 2.0])
    layer.window = {"candidates": cand, "grad_sum": grad_sum.clone(), "sq_sum": sq_sum.clone(), "count": 4}
    st = opt.state[layer.values]
    old_idx = layer.indices.long().clone()
    old_state = {k: st[k].clone() for k in ("exp_avg", "exp_avg_sq", "age")}

    sel = Selector(model, "ag", schedule, grad_accum=grad_accum)
    changed = sel.reselect(t, opt)
    idx = layer.indices.long()  # reselect may reorder the slots: compare by position
    assert set(idx.tolist()) == {0, 7, 19, 18, 2, 3}
    assert changed == {"0": 2} and layer.window is None
    values = dict(zip(idx.tolist(), layer.values.detach().tolist()))
    assert values == pytest.approx({0: 0.5, 3: -0.01, 7: 2.0, 19: -1.0, 2: 0.0, 18: 0.0})
    kept = torch.tensor([0, 3, 7, 19])
    for key in old_state:  # positions still active (3 included) keep their Adam state
        assert torch.equal(st[key][slots_of(idx, kept)], old_state[key][slots_of(old_idx, kept)])

    # seeded state, written out: the moments of one step's gradient (a sum of `accum` micro-batch gradients),
    # m = mean (1 - b1^age), v = mean_sq (1 - b2^age), age = count / accum
    age = 4 / grad_accum
    new_slots = slots_of(idx, torch.tensor([2, 18])).tolist()
    for slot in new_slots:
        j = cand.tolist().index(int(idx[slot]))
        m_micro, sq_micro = float(grad_sum[j]) / 4, float(sq_sum[j]) / 4
        mean = grad_accum * m_micro
        mean_sq = mean ** 2 + grad_accum * max(sq_micro - m_micro ** 2, 0.0)
        assert float(st["age"][slot]) == age
        assert float(st["exp_avg"][slot]) == pytest.approx(float(mean) * (1 - b1 ** age), rel=1e-6)
        assert float(st["exp_avg_sq"][slot]) == pytest.approx(float(mean_sq) * (1 - b2 ** age), rel=1e-6)

    # one AdamW step with a zero gradient: bias correction at age + 1 (per element) moves the new deltas
    # by -lr * m_hat / (sqrt(v_hat) + eps), m_hat = b1 m / (1 - b1^(age+1)), v_hat = b2 v / (1 - b2^(age+1))
    seeded = {s: (float(st["exp_avg"][s]), float(st["exp_avg_sq"][s])) for s in new_slots}
    layer.values.grad = torch.zeros(6)
    opt.step()
    lr, eps = 1e-3, 1e-6
    for slot, (m, v) in seeded.items():
        m_hat, v_hat = b1 * m / (1 - b1 ** (age + 1)), b2 * v / (1 - b2 ** (age + 1))
        assert float(layer.values.detach()[slot]) == pytest.approx(-lr * m_hat / (math.sqrt(v_hat) + eps), rel=1e-5)
        assert float(st["age"][slot]) == age + 1


def test_ag_too_few_eligible_candidates_drops_fewer():
    layer, opt = ag_case()
    schedule = Schedule(100, interval=20, first=5, rho0=0.8)
    # only position 12 is eligible: one drop (the smallest |value|, position 14), one growth
    layer.window = {"candidates": torch.tensor([0, 7, 19, 12]), "grad_sum": torch.tensor([5.0, 5.0, 5.0, 1.0]),
                    "sq_sum": torch.ones(4), "count": 2}
    changed = Selector(nn.Sequential(layer), "ag", schedule).reselect(25, opt)
    assert changed == {"0": 1}
    assert sorted(layer.indices.long().tolist()) == [0, 3, 7, 10, 12, 19]
    assert float(layer.values.detach()[slots_of(layer.indices, torch.tensor([12]))]) == 0.0


def test_accumulate_window_direct():
    g1, g2 = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), torch.randn(4, 5)
    w = {"candidates": None, "grad_sum": None, "sq_sum": None, "count": 0}
    accumulate_window(w, g1, 6)
    cand = w["candidates"]
    assert set(cand.tolist()) == set(g1.abs().flatten().argsort(descending=True)[:6].tolist())
    assert torch.equal(w["grad_sum"], g1.flatten()[cand]) and w["count"] == 1
    accumulate_window(w, g2, 6)
    assert torch.equal(w["candidates"], cand)  # fixed after the first micro-batch
    torch.testing.assert_close(w["grad_sum"], (g1 + g2).flatten()[cand])
    torch.testing.assert_close(w["sq_sum"], (g1 ** 2 + g2 ** 2).flatten()[cand])
    assert w["count"] == 2


def test_accumulate_window_from_backward():
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(5, 4, bias=False), 6, generator=torch.Generator().manual_seed(0))
    open_windows({"0": layer})
    xs = [torch.randn(2, 3, 5) for _ in range(3)]
    dys = [torch.randn(2, 3, 4) for _ in range(3)]
    gs = [torch.einsum("bto,bti->oi", dy, x) for x, dy in zip(xs, dys)]  # dense dW of each micro-batch
    for x, dy in zip(xs, dys):
        layer(x).backward(dy)
    w = layer.window
    assert set(w["candidates"].tolist()) == set(gs[0].abs().flatten().argsort(descending=True)[:6].tolist())
    c = w["candidates"]
    torch.testing.assert_close(w["grad_sum"], sum(gs).flatten()[c])
    torch.testing.assert_close(w["sq_sum"], sum(g ** 2 for g in gs).flatten()[c])
    assert w["count"] == 3
    torch.testing.assert_close(layer.values.grad, sum(gs).flatten()[layer.indices.long()])


# -----------------------------------------------------------------------------
# 6. SpIEL-MA on a constructed case


@pytest.mark.parametrize("t", [5, 25])
def test_ma_grows_top_outer_product(t):
    torch.manual_seed(0)
    out_f, in_f, k = 5, 7, 8
    layer = SparseDeltaLinear(nn.Linear(in_f, out_f, bias=False), k, generator=torch.Generator().manual_seed(1))
    opt = SM3([layer.values], lr=0.1, momentum=0.9)
    layer(torch.randn(3, in_f)).square().sum().backward()
    opt.step()
    vals = torch.randn(k)
    with torch.no_grad():
        layer.values.copy_(vals)
    schedule = Schedule(100, interval=20, first=5, rho0=0.8)
    n = int(k * schedule.fraction(t))
    assert n == (8 if t == 5 else 4)
    idx = layer.indices.long().clone()
    keep = idx[layer.values.detach().abs().argsort()[n:]]  # positions that stay active
    row, col = torch.rand(out_f) + 0.1, torch.rand(in_f) + 0.1
    if keep.numel():  # make a kept position the best score overall: it must not count as a growth
        row[keep[0] // in_f], col[keep[0] % in_f] = 5.0, 5.0
    st = opt.state[layer.values]
    st["row"], st["col"] = row.clone(), col.clone()
    mom = st["momentum_buffer"].clone()

    Selector(nn.Sequential(layer), "ma", schedule).reselect(t, opt)
    score = torch.outer(row, col).flatten()  # brute force (out * in)
    score[keep] = -math.inf
    expected = set(keep.tolist()) | set(score.topk(n).indices.tolist())
    new = layer.indices.long()
    assert set(new.tolist()) == expected and new.numel() == k
    grown, still = new[~torch.isin(new, idx)], new[torch.isin(new, idx)]  # by position (slots may reorder)
    assert grown.numel() > 0
    assert torch.all(layer.values[slots_of(new, grown)] == 0)
    assert torch.all(st["momentum_buffer"][slots_of(new, grown)] == 0)
    assert torch.equal(st["momentum_buffer"][slots_of(new, still)], mom[slots_of(idx, still)])
    assert torch.equal(layer.values.detach()[slots_of(new, still)], vals[slots_of(idx, still)])


def test_ma_candidates_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, k, n = 13, 11, 10, 4
    layer = SparseDeltaLinear(nn.Linear(in_f, out_f, bias=False), k, generator=g)
    row, col = torch.rand(out_f, generator=g), torch.rand(in_f, generator=g)
    brute = torch.outer(row, col).flatten().topk(n + k)
    for chunk in (2 ** 24, 1, 25, in_f * out_f - 1):
        pos, score = ma_candidates(layer, n, row, col, chunk_elems=chunk)
        assert set(pos.tolist()) == set(brute.indices.tolist()), chunk
        torch.testing.assert_close(score, row[pos // in_f] * col[pos % in_f], rtol=0, atol=0)


# -----------------------------------------------------------------------------
# 7. training lowers the loss and never touches the base


@pytest.mark.parametrize("method", ["ag", "ma"])
def test_training_lowers_loss_base_untouched(method):
    torch.manual_seed(0)
    model = tiny_model()
    layers = add_sparse_deltas(model, density=0.1, verbose=False)
    frozen = frozen_state(model)
    params = [m.values for m in layers.values()]
    opt = spiel.AdamW(params, lr=1e-2) if method == "ag" else SM3(params, lr=1e-1)
    batch = tokens(seed=5, B=4, T=33)
    schedule = Schedule(40, interval=10, first=3)
    losses = train(model, method, opt, schedule, 40, lambda t, micro: batch)
    assert losses[-1] < 0.9 * losses[0], losses
    after = frozen_state(model)
    assert after.keys() == frozen.keys()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k


# -----------------------------------------------------------------------------
# 8. the budget


def target_shapes(args):
    kv = args.n_kv_heads * args.head_dim
    per_layer = [(args.dim, args.dim), (kv, args.dim), (kv, args.dim), (args.dim, args.dim),  # wq wk wv wo
                 (args.ffn_dim, args.dim), (args.dim, args.ffn_dim), (args.ffn_dim, args.dim)]  # w1 w2 w3
    return per_layer * args.n_layers


def test_split_budget_sums_exactly():
    sizes = [o * i for o, i in target_shapes(ModelArgs(**TINY))]
    for total in (14, 15, 20, 100, 999, 4915, sum(sizes) - 1, sum(sizes)):
        ks = split_budget(sizes, total)
        assert sum(ks) == total, total
        assert all(1 <= k <= s for k, s in zip(ks, sizes))
        if all(total * s / sum(sizes) >= 1 for s in sizes):  # proportional up to rounding
            assert all(abs(k - total * s / sum(sizes)) < 1 for k, s in zip(ks, sizes))
    assert split_budget(sizes, sum(sizes)) == sizes
    assert split_budget([1, 1000, 1000], 5) == [1, 2, 2]
    with pytest.raises(ValueError):
        split_budget(sizes, 13)  # fewer deltas than matrices


def test_add_sparse_deltas_budgets():
    args = ModelArgs(**TINY)
    shapes = target_shapes(args)
    targeted = sum(o * i for o, i in shapes)
    assert len(shapes) == 14

    def total(**budget):
        model = tiny_model()
        layers = add_sparse_deltas(model, verbose=False, **budget)
        assert [m.weight_shape for m in layers.values()] == shapes
        assert [p for p in model.parameters() if p.requires_grad] == [m.values for m in layers.values()]
        return sum(m.values.numel() for m in layers.values())

    assert total(density=0.05) == round(0.05 * targeted)
    assert total(num_tunable=1000) == 1000
    assert total(num_tunable=20) == 20
    assert total(lora_rank=3) == 3 * sum(o + i for o, i in shapes)
    assert total(density=1.0) == targeted
    for bad in (dict(density=0.05, num_tunable=100), dict(num_tunable=100, lora_rank=2), dict(),
                dict(num_tunable=targeted + 1), dict(density=0.0), dict(density=1.5),
                dict(lora_rank=10 ** 4), dict(num_tunable=5)):
        with pytest.raises(ValueError):
            add_sparse_deltas(tiny_model(), verbose=False, **bad)


# -----------------------------------------------------------------------------
# 9. random positions


@pytest.mark.parametrize("n,k", [(10 ** 7, 100), (10 ** 6, 1), (1000, 250), (1000, 251), (1000, 990), (1000, 1000)])
def test_random_positions(n, k):
    p = random_positions(n, k, torch.Generator().manual_seed(0))
    assert p.numel() == k
    assert torch.unique(p).numel() == k
    assert torch.equal(p, p.sort().values)
    assert int(p.min()) >= 0 and int(p.max()) < n
    assert torch.equal(p, random_positions(n, k, torch.Generator().manual_seed(0)))  # the generator decides


def test_random_positions_uniform():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(200):  # the sparse path (k << n): deciles should get 10% each
        counts += torch.bincount(random_positions(10_000, 100, g) // 1000, minlength=10)
    assert counts.sum() == 20_000 and (counts - 2000).abs().max() < 200, counts


# --- the two gradient paths (dense dW then gather, or sampled dense-dense matmul at the active entries) ---

@pytest.mark.parametrize("bias", [False, True])
def test_dense_and_sparse_gradient_paths_agree(bias):
    torch.manual_seed(3)
    base = torch.nn.Linear(24, 17, bias=bias).double()
    layer = spiel.SparseDeltaLinear(base, 60)
    with torch.no_grad():
        layer.values.copy_(torch.randn(60, dtype=torch.float64))
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    grads = {}
    for path in ("dense", "sparse"):
        spiel.set_grad_path(torch.nn.Sequential(layer), path)
        layer.values.grad, x.grad = None, None
        (layer(x) ** 2).sum().backward()
        grads[path] = (layer.values.grad.clone(), x.grad.clone())
    torch.testing.assert_close(grads["dense"][0], grads["sparse"][0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grads["dense"][1], grads["sparse"][1], atol=1e-12, rtol=1e-12)
    # slots out of position order (as after a hand edit): the sparse path still maps gradients to slots
    perm = torch.randperm(60)
    layer.indices.copy_(layer.indices[perm])
    with torch.no_grad():
        layer.values.copy_(layer.values[perm])
    layer.values.grad = None
    (layer(x) ** 2).sum().backward()
    torch.testing.assert_close(layer.values.grad, grads["dense"][0][perm], atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda v: spiel.SparseDeltaFn.apply(x.detach(), v, layer),
                                    (layer.values.detach().double().requires_grad_(),))


def test_grad_path_choice_is_forced_or_follows_density(monkeypatch):
    layer = spiel.SparseDeltaLinear(torch.nn.Linear(10, 10), 5)  # density 5%
    x = torch.randn(3, 10)
    assert spiel.choose_grad_path(layer, x, x) == "sparse"  # below the CPU threshold
    monkeypatch.setitem(spiel.SPARSE_DENSITY_MAX, "cpu", 0.01)
    assert spiel.choose_grad_path(layer, x, x) == "dense"
    layer.grad_path = "sparse"
    assert spiel.choose_grad_path(layer, x, x) == "sparse"
    calls = []
    monkeypatch.setattr(spiel, "sampled_grad", lambda *a: calls.append(1) or torch.zeros(5))
    layer(x.requires_grad_()).sum().backward()
    assert calls == [1]  # the forced path really ran
    layer.window = {"candidates": None, "grad_sum": None, "sq_sum": None, "count": 0}
    layer(x).sum().backward()
    assert calls == [1] and layer.window["count"] == 1  # an open AG window always takes the dense path
    with pytest.raises(ValueError):
        spiel.set_grad_path(torch.nn.Sequential(layer), "fast")


def test_sparse_path_in_bf16():
    layer = spiel.SparseDeltaLinear(torch.nn.Linear(16, 8).to(torch.bfloat16), 12)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    grads = {}
    for path in ("dense", "sparse"):
        layer.grad_path, layer.values.grad = path, None
        layer(x).float().sum().backward()
        assert layer.values.grad.dtype == torch.float32
        grads[path] = layer.values.grad.clone()
    torch.testing.assert_close(grads["sparse"], grads["dense"], atol=0.05, rtol=0.02)


def test_sort_slots_moves_per_slot_state_only():
    """k equal to the matrix's row count: SM3's row accumulator (out,) has the shape of the values (k,) but is
    per row, not per slot, so sorting the slots must leave it alone."""
    from sm3 import SM3
    layer = spiel.SparseDeltaLinear(torch.nn.Linear(32, 16), 16)  # k == out == 16
    perm = torch.randperm(16)
    layer.indices.copy_(layer.indices[perm])  # slots out of position order
    opt = SM3([layer.values], lr=0.1, momentum=0.9)
    layer(torch.randn(5, 32)).pow(2).sum().backward()
    opt.step()
    st = opt.state[layer.values]
    row, col, mom = st["row"].clone(), st["col"].clone(), st["momentum_buffer"].clone()
    order = layer.indices.argsort()
    spiel.sort_slots(layer, opt)
    assert torch.equal(st["row"], row) and torch.equal(st["col"], col)
    assert torch.equal(st["momentum_buffer"], mom[order])
