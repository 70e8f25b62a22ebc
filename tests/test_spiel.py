"""
Tests for spiel.py (SpIEL, Ansell et al. 2024, arXiv 2401.16405): the sparse-delta layer against the
dense formula (gradcheck in fp64), invariants on a tiny LLaMA (zero deltas = base, merging, the resident
weight, no merge into a quantized base), the schedule, drop/grow invariants over many reselections (AG and
MA), AG's window (per optimizer step, scaled by the clipping coefficient, checked against a plain dense copy
of the model; its state round trip), AG and MA growth on hand-built cases with known answers (MA never
regrows a position active now, AG may and keeps its slot), the loss going down while the base stays
bit-identical, the budget, random positions, and the dense and sparse (SDDMM) value-gradient paths, inside
an open window too, with the sparse pattern cached per positions tensor. Training steps go through
train.train_step (the one place the Selector's per-step protocol is written); a test calls a Selector or
Window method directly only where that method is what it checks. Writing and reading delta files:
test_finetune.py. CPU only, a few seconds.
"""

import io
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quantize  # noqa: E402
import spiel  # noqa: E402
import train  # noqa: E402
from conftest import TINY, random_state_dict, set_random_values, tokens  # noqa: E402
from llama import PROJECTIONS, ModelArgs, Transformer  # noqa: E402
from sm3 import SM3  # noqa: E402
from spiel import (Schedule, Selector, SparseDeltaFn, SparseDeltaLinear, Window, add_sparse_deltas,  # noqa: E402
                   budget_summary, delta_layers, drop_and_grow, lora_param_count, ma_candidates, merge_deltas,
                   random_positions, split_budget)


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


def frozen_state(model):
    """clones of everything that is not a delta (base weights, norms, embeddings)."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".values", ".indices"))}


def sm3_for(layers: dict, **kw):
    """SM3 over the deltas' values, each given with its positions (as train.py builds it)."""
    return SM3([m.values for m in layers.values()], positions={m.values: (m.indices, m.weight_shape)
                                                               for m in layers.values()}, **kw)


def run_steps(model, method, opt, schedule, steps, batch_fn, answer_tokens, grad_accum=1, reselect=None,
              max_norm=None):
    """the SpIEL loop through train.train_step: per optimizer step t, grad_accum micro-batches
    x = batch_fn(t, micro) (drawn inside the step, after the windows opened), each with answer_tokens predicted
    tokens, clipped at max_norm if given; the step drops and regrows when due. reselect(real, t): a test's
    checks around the Selector's reselect (it calls real(t) and returns what it returned). -> each step's loss
    per predicted token"""
    sel = Selector(model, method, schedule, opt)
    if reselect is not None:
        real = sel.reselect
        sel.reselect = lambda t: reselect(real, t)
    params = [m.values for m in delta_layers(model).values()]

    def micro_batches(t):
        for micro in range(grad_accum):
            x = batch_fn(t, micro)
            assert x[:, 1:].numel() == answer_tokens
            yield model(x[:, :-1], x[:, 1:], reduction="sum")[1]

    losses = []
    for t in range(1, steps + 1):
        loss, _, _ = train.train_step(t, micro_batches(t), grad_accum * answer_tokens, params, opt, sel,
                                      grad_clip=max_norm or 0.0)
        losses.append(loss)
    return losses


def slots_of(indices, positions):
    """the slots of `indices` that hold `positions` (each must be there)."""
    hit = indices.long()[None, :] == positions.long()[:, None]  # (m, k)
    assert bool(hit.any(1).all()), "a position is not in the indices"
    return hit.int().argmax(1)


def dense_scatter(idx, values, shape):
    """scatter(indices, values) as a dense (out, in) tensor, differentiable wrt values."""
    return torch.zeros(shape[0] * shape[1], dtype=values.dtype).scatter(0, idx.long(), values).view(shape)


def window_from(indices, candidates, grad_sum, sq_sum, steps):
    """a Window holding given statistics (through its state_dict interface)."""
    w = Window(indices)
    w.load_state_dict({"candidates": candidates, "grad_sum": grad_sum, "sq_sum": sq_sum, "steps": steps})
    return w


# -----------------------------------------------------------------------------
# 1. the layer: gradcheck and the dense formula


@pytest.mark.parametrize("bias", [False, True])
def test_layer_matches_dense_formula_and_gradcheck(bias):
    """y, dx and d(values) equal autograd through F.linear(x, W0 + scatter(values), b) (and finite
    differences, fp64); the frozen base gets no gradient and is never written by forward/backward."""
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(6, 4, bias=bias), 7, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        layer.values.copy_(torch.randn(7, dtype=torch.float64))
    base = layer.base
    w0 = base.weight.detach().clone()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)

    # gradients wrt x and values by finite differences, in fp64 (the resident weight follows the perturbations)
    assert torch.autograd.gradcheck(lambda x, v: SparseDeltaFn.apply(x, v, layer), (x, layer.values))

    # the same numbers as autograd through F.linear(x, W0 + scatter(values), b)
    y = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    vr = layer.values.detach().clone().requires_grad_(True)
    w = w0 + dense_scatter(layer.indices, vr, (4, 6))
    y_ref = F.linear(xr, w, None if base.bias is None else base.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, layer.values), dy, retain_graph=True)
    gx_ref, gv_ref = torch.autograd.grad(y_ref, (xr, vr), dy)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv, gv_ref, rtol=1e-12, atol=1e-12)

    # the frozen base gets no gradient at all; it holds W0 + delta while attached (section 9's resident
    # weight: the same numbers as the transient merged weight) and exactly W0 again when released
    y.backward(dy)
    assert layer.values.grad is not None
    assert base.weight.grad is None and not base.weight.requires_grad
    if bias:
        assert base.bias.grad is None and not base.bias.requires_grad
    merged = w0 + dense_scatter(layer.indices, layer.values.detach(), (4, 6))
    torch.testing.assert_close(layer.merged_weight(torch.float64), merged, rtol=0, atol=1e-15)
    spiel.release(layer)
    assert torch.equal(base.weight, w0)
    layer.resident = False  # the transient path: W0 + scatter built afresh, the base never written
    torch.testing.assert_close(layer.merged_weight(torch.float64), merged, rtol=0, atol=1e-15)
    assert torch.equal(base.weight, w0)


def test_value_grad_direct():
    """spiel.value_grad(layer, dy, x) with no window open: (dy^T x) gathered at the indices, on both paths."""
    g = torch.Generator().manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(9, 7, bias=False).double(), 10, generator=g)
    dy, x = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 9, generator=g, dtype=torch.float64)
    ref = (dy.T @ x).view(-1)[layer.indices.long()]
    for path in ("dense", "sparse"):
        layer.grad_path = path
        torch.testing.assert_close(spiel.value_grad(layer, dy, x), ref, rtol=1e-12, atol=1e-12)


# -----------------------------------------------------------------------------
# 2. a tiny Transformer: zero deltas, merge, save/load and its errors


def test_zero_deltas_give_the_base_logits():
    """fresh deltas are 0 on all 14 targeted matrices: the logits are exactly the base's."""
    model = tiny_model()
    x = tokens()
    base_logits, _ = model(x)
    layers = add_sparse_deltas(model, PROJECTIONS, density=0.05)
    assert len(layers) == 14
    assert all(torch.count_nonzero(m.values) == 0 for m in layers.values())
    logits, _ = model(x)
    assert torch.equal(logits, base_logits)


def test_merge_and_merged_logits():
    """merge_deltas writes W0 + scatter(values) into the base weights and puts the plain linears back; the
    merged model gives the same logits; merging again is a no-op (nothing left to add twice)."""
    model = tiny_model()
    x = tokens()
    layers = add_sparse_deltas(model, PROJECTIONS, density=0.05)
    set_random_values(model)
    base_w = {n: m.base.weight.clone() for n, m in layers.items()}
    sparse_logits, _ = model(x)
    base_model_logits, _ = tiny_model()(x)
    assert not torch.allclose(sparse_logits, base_model_logits, atol=1e-3)  # the deltas matter

    merge_deltas(model)
    assert not delta_layers(model)
    modules = dict(model.named_modules())
    for n, m in layers.items():
        assert modules[n] is m.base and type(modules[n]) is nn.Linear  # the plain linear is back
        assert torch.equal(m.base.weight, base_w[n] + dense_scatter(m.indices, m.values.detach(), base_w[n].shape))
    merged_logits, _ = model(x)
    assert torch.equal(merged_logits, sparse_logits)
    merge_deltas(model)  # a second merge must not add the deltas twice
    assert torch.equal(model(x)[0], sparse_logits)


def test_resident_weight_then_another_dtype_adds_the_deltas_once():
    """a resident base (W0 + delta in its storage after an fp32 forward) asked for the weight in another dtype
    gives W0 + delta, not W0 + 2 delta; the fp32 weight is right again afterwards."""
    base = nn.Linear(8, 6, bias=False)
    w0 = base.weight.detach().clone()
    layer = SparseDeltaLinear(base, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.values.copy_(torch.randn(10))
    want = w0.double().view(-1).index_add(0, layer.indices.long(), layer.values.detach().double()).view(6, 8)
    layer(torch.randn(3, 8))  # resident now
    torch.testing.assert_close(layer.merged_weight(torch.float64), want)
    torch.testing.assert_close(layer.merged_weight(torch.float32), want.float())
    spiel.release(layer)
    assert torch.equal(base.weight, w0)


def test_a_backward_reuses_the_weight_its_own_forward_wrote(monkeypatch):
    """section 9: a backward right after its forward finds the resident weight as that forward wrote it and
    writes nothing; after another write (a second graph's forward) or a release it writes again. dx and
    d(values) are the reference's every time."""
    base = nn.Linear(8, 6, bias=False)
    layer = SparseDeltaLinear(base, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.values.copy_(torch.randn(10))
    w = (base.weight.detach().view(-1).index_add(0, layer.indices.long(), layer.values.detach())).view(6, 8)
    writes, real = [], spiel.resident_weight
    monkeypatch.setattr(spiel, "resident_weight", lambda *a: writes.append(1) or real(*a))

    def check(x, dy):  # the reference gradients of y = x W^T
        torch.testing.assert_close(x.grad, dy @ w)
        torch.testing.assert_close(layer.values.grad, (dy.T @ x.detach()).view(-1)[layer.indices.long()])
        x.grad = layer.values.grad = None
    x1, x2, dy = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True), torch.randn(3, 6)
    layer(x1).backward(dy)
    assert len(writes) == 1
    check(x1, dy)
    y1, y2 = layer(x1), layer(x2)  # two graphs: the second forward wrote last
    y1.backward(dy)
    assert len(writes) == 4
    check(x1, dy)
    y2.backward(dy)
    assert len(writes) == 5
    check(x2, dy)
    y1 = layer(x1)
    spiel.release(layer)  # (before positions move): the backward builds the weight again
    y1.backward(dy)
    assert len(writes) == 7 and torch.equal(layer.base.weight, w)
    check(x1, dy)


def test_merge_bf16_rounds_once():
    """a bf16 base is summed in fp32 and rounded once to bf16."""
    base = nn.Linear(8, 6, bias=False).to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    model = nn.Sequential(SparseDeltaLinear(base, 20, generator=torch.Generator().manual_seed(0)))
    layer = model[0]
    with torch.no_grad():
        layer.values.copy_(torch.randn(20) * 1e-3)  # small: several would be lost by a bf16 add per delta
    expected = w0.float().view(-1).index_add(0, layer.indices.long(), layer.values.detach()).view(6, 8).bfloat16()
    merge_deltas(model)
    assert model[0] is base and base.weight.dtype == torch.bfloat16
    assert torch.equal(base.weight, expected)


def test_merge_into_quantized_base_is_refused():
    """merging into an int8 base is an error and leaves the deltas (and the logits) as they were."""
    model = quantize.quantize_model(tiny_model(), "int8", PROJECTIONS)
    layers = add_sparse_deltas(model, PROJECTIONS, density=0.05)
    assert all(isinstance(m.base, quantize.QuantLinear) for m in layers.values())
    set_random_values(model)
    x = tokens()
    logits, _ = model(x)
    with pytest.raises(ValueError, match="quantized"):
        merge_deltas(model)
    assert delta_layers(model) == layers
    assert torch.equal(model(x)[0], logits)


# -----------------------------------------------------------------------------
# 3. the schedule


def test_schedule_paper_defaults():
    """reselections at 5, 25, ..., windows over steps 1..5 then r-5..r, linear and cosine fractions."""
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
    """another interval / first; interval <= first and unknown decays are refused."""
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
                          {k: v.clone() if torch.is_tensor(v) else v for k, v in m.window.state_dict().items()},
                          state={k: v.clone() for k, v in st.items() if k in PER_SLOT},
                          rowcol=(st["row"].clone(), st["col"].clone()) if "row" in st else None)
    return snap


@pytest.mark.parametrize("method", ["ag", "ma"])
def test_reselection_invariants(method):
    """over 10 reselections on a tiny LLaMA: k constant, indices unique and in range, the dropped are the
    smallest |values|, grown deltas start at 0 with fresh (MA: zero momentum) or window-seeded (AG) state,
    kept positions keep value and state, growth takes the best scores among eligible positions (AG: the
    window's |grad_sum|; MA: row[i] col[j] over positions not active before), MA never regrows a dropped
    position, AG windows count optimizer steps (first, then first + 1) and close at reselection."""
    torch.manual_seed(0)
    model = tiny_model()
    layers = add_sparse_deltas(model, PROJECTIONS, density=0.05)
    params = [m.values for m in layers.values()]
    grad_accum = 2 if method == "ag" else 1
    opt = spiel.AdamW(params, lr=1e-2) if method == "ag" else sm3_for(layers, lr=1e-1, momentum=0.9)
    schedule = Schedule(60, interval=6, first=2, rho0=0.5)
    b1, b2 = 0.9, 0.999
    stats = {"reselections": 0, "moved": 0}

    def checked(reselect, t):
        # reselect may reorder the slots (the positions are what count), so compare position by position
        frac = schedule.fraction(t)
        before = snapshot(layers, opt)
        changed = reselect(t)
        stats["reselections"] += 1
        for name, m in layers.items():
            s = before[name]
            k = s["idx"].numel()
            n = math.floor(k * frac)
            out_f, in_f = m.weight_shape
            idx = m.indices.long()
            assert idx.numel() == k and m.values.numel() == k  # k constant
            assert torch.unique(idx).numel() == k and 0 <= int(idx.min()) and int(idx.max()) < out_f * in_f
            assert torch.equal(idx, idx.sort().values)  # slots sorted by position
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
            if method == "ma":
                assert torch.all(st["momentum_buffer"][new_slots] == 0)  # momentum of a grown delta restarts at 0
                # every position active before is excluded from growth: all n dropped are replaced
                assert dropped.numel() == n and changed[name] == n
                # grown = the best row[i] col[j] among positions inactive before (tie-robust: >= every loser)
                row, col = s["rowcol"]
                score = torch.outer(row, col).flatten()
                losers = torch.ones(out_f * in_f, dtype=torch.bool)
                losers[s["idx"]] = False
                losers[grown] = False
                if grown.numel() and losers.any():
                    assert score[grown].min() >= score[losers].max()
            else:  # AG: the window held every step of 1..first, later of r - first .. r
                w = s["window"]
                steps = schedule.first if t == schedule.first else schedule.first + 1
                assert w["steps"] == steps
                # grown positions are candidates, and beat every candidate left inactive (tie-robust)
                cand = w["candidates"].long()
                j = slots_of(cand, grown)  # (m,) into the candidates
                losers = ~torch.isin(cand, idx)
                if grown.numel() and losers.any():
                    assert w["grad_sum"][j].abs().min() >= w["grad_sum"][losers].abs().max()
                # grown deltas' Adam state is seeded from the window: the mean step gradient and mean squared
                # step gradient, counter-corrected so that bias correction at age = steps returns them
                mean, mean_sq = w["grad_sum"][j] / steps, w["sq_sum"][j] / steps
                torch.testing.assert_close(st["exp_avg"][new_slots], mean * (1 - b1 ** steps), rtol=1e-6, atol=0)
                torch.testing.assert_close(st["exp_avg_sq"][new_slots], mean_sq * (1 - b2 ** steps), rtol=1e-6, atol=0)
                assert torch.all(st["age"][new_slots] == steps)
        assert all(m.window is None for m in layers.values())  # windows close at reselection
        return changed

    g = torch.Generator().manual_seed(1)

    def batch(t, micro):
        if method == "ag":  # the window is open exactly for the backward passes of window steps
            assert all((m.window is not None) == schedule.window_open(t) for m in layers.values()), t
        return torch.randint(256, (2, 13), generator=g)

    run_steps(model, method, opt, schedule, 60, batch, 2 * 12, grad_accum=grad_accum, reselect=checked)
    assert stats["reselections"] == 10  # t = 2, 8, ..., 56
    assert stats["moved"] > sum(m.values.numel() for m in layers.values())  # positions really moved


# -----------------------------------------------------------------------------
# 5. SpIEL-AG's window: per optimizer step, scaled by the clipping coefficient


def test_window_direct():
    """Window by hand: candidates = the k largest |g| of the first micro-batch; add() sums a step's
    micro-batches in step_sum; end_step(scale) folds scale * step into grad_sum, its square into sq_sum,
    counts steps and zeroes step_sum; end_step before any gradient does nothing; seed() is the formula."""
    gen = torch.Generator().manual_seed(0)
    g1, g2, g3 = (torch.randn(20, generator=gen) for _ in range(3))  # flat dW of a 4x5 matrix
    w = Window(torch.tensor([0, 5, 9, 13, 17, 18], dtype=torch.int32))
    w.end_step(0.5)
    assert w.candidates is None and w.steps == 0
    w.choose(g1)
    w.add(g1[w.candidates])  # as value_grad does on the window's first micro-batch
    cand = w.candidates.long()
    assert w.candidates.dtype == torch.int32
    assert set(cand.tolist()) == set(g1.abs().argsort(descending=True)[:6].tolist())
    w.add(g2[cand])
    torch.testing.assert_close(w.step_sum, (g1 + g2)[cand])
    assert w.steps == 0 and not w.grad_sum.any()  # nothing folded before the step ends
    w.end_step(0.5)  # step 1: clipped by 0.5
    G1 = 0.5 * (g1 + g2)[cand]
    torch.testing.assert_close(w.grad_sum, G1)
    torch.testing.assert_close(w.sq_sum, G1 ** 2)
    assert w.steps == 1 and not w.step_sum.any()
    w.add(g3[cand])
    w.end_step(1.0)  # step 2: not clipped
    G2 = g3[cand]
    assert torch.equal(w.candidates.long(), cand)  # fixed after the first micro-batch
    torch.testing.assert_close(w.grad_sum, G1 + G2)
    torch.testing.assert_close(w.sq_sum, G1 ** 2 + G2 ** 2)
    assert w.steps == 2
    grown = torch.tensor([4, 0])
    b1, b2 = 0.9, 0.999
    seed = w.seed(grown, (b1, b2))
    torch.testing.assert_close(seed["exp_avg"], (G1 + G2)[grown] / 2 * (1 - b1 ** 2))
    torch.testing.assert_close(seed["exp_avg_sq"], (G1 ** 2 + G2 ** 2)[grown] / 2 * (1 - b2 ** 2))
    assert torch.equal(seed["age"], torch.full((2,), 2.0))


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_window_from_backward(path):
    """a Selector window on one layer through real backward passes: step 1 of two micro-batches, step 2 of
    one with clip scale 0.5; the sums are those of the scaled step gradients at the candidates, and the
    values' gradient is the gathered dense dW whatever the path."""
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(5, 4, bias=False), 6, generator=torch.Generator().manual_seed(0))
    layer.grad_path = path
    opt = spiel.AdamW([layer.values])
    sel = Selector(nn.Sequential(layer), "ag", Schedule(10, interval=5, first=2), opt)
    xs = [torch.randn(2, 3, 5) for _ in range(3)]
    dys = [torch.randn(2, 3, 4) for _ in range(3)]
    gs = [torch.einsum("bto,bti->oi", dy, x).flatten() for x, dy in zip(xs, dys)]  # dense dW of each micro-batch
    sel.begin_step(1)
    w = layer.window
    assert w is not None and w.candidates is None
    for x, dy in zip(xs[:2], dys[:2]):
        layer(x).backward(dy)
    sel.end_step(1.0)
    sel.begin_step(2)
    assert layer.window is w  # the same window stays open
    layer(xs[2]).backward(dys[2])
    sel.end_step(0.5)
    c = w.candidates.long()
    assert set(c.tolist()) == set(gs[0].abs().argsort(descending=True)[:6].tolist())
    G1, G2 = (gs[0] + gs[1])[c], 0.5 * gs[2][c]
    torch.testing.assert_close(w.grad_sum, G1 + G2)
    torch.testing.assert_close(w.sq_sum, G1 ** 2 + G2 ** 2)
    assert w.steps == 2
    torch.testing.assert_close(layer.values.grad, sum(gs)[layer.indices.long()])


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_ag_window_statistics_are_clipped_step_gradients(path):
    """issue: with clipping on, the AG window keeps the step gradients AdamW sees. Two optimizer steps of 2
    micro-batches on a tiny LLaMA, clipped with clip_grad_norm_ at a max_norm that really clips; the window's
    candidates, grad_sum and sq_sum are checked against a plain dense copy of the model (dW at the candidates,
    summed over the step's micro-batches, times the clip coefficient); after reselection the grown deltas'
    AdamW state is the seeding formula of those step gradients. The steps are train.train_step's (it clips and
    hands the window its coefficient)."""
    model = tiny_model()
    layers = add_sparse_deltas(model, PROJECTIONS, density=0.05)
    spiel.set_grad_path(model, path)
    set_random_values(model, scale=0.02)
    params = [m.values for m in layers.values()]
    b1, b2, max_norm = 0.9, 0.999, 0.05
    opt = spiel.AdamW(params, lr=1e-3, betas=(b1, b2))
    schedule = Schedule(10, interval=5, first=2)  # window over steps 1 and 2, reselection (all k) at 2
    sel = Selector(model, "ag", schedule, opt)
    before = {}  # per layer: positions, values and AdamW state just before the reselection at step 2
    real_reselect = sel.reselect

    def reselect(t):
        before.update({n: (m.indices.long().clone(), m.values.detach().clone(),
                           {key: opt.state[m.values][key].clone() for key in ("exp_avg", "exp_avg_sq", "age")})
                       for n, m in layers.items()})
        return real_reselect(t)
    sel.reselect = reselect
    ref = tiny_model()  # the same base as a plain dense model: W = W0 + scatter(values), trainable
    ref.requires_grad_(False)
    ref_lin = dict(ref.named_modules())
    batches = [[tokens(seed=10 * t + i, B=2, T=13) for i in range(2)] for t in range(2)]
    n_targets = 2 * 2 * 12  # answer tokens per step: 2 micro-batches of 2 x 12
    G = {n: [] for n in layers}  # per layer: the clipped step gradient (dense, flat) of each step
    first_micro = {}
    coefs = []

    def micro_batches(t):  # each micro-batch's summed loss; the dense reference takes the same backward alongside
        for i, x in enumerate(batches[t - 1]):
            _, ref_loss = ref(x[:, :-1], x[:, 1:], reduction="sum")
            (ref_loss / n_targets).backward()
            if t == 1 and i == 0:
                first_micro.update({n: ref_lin[n].weight.grad.flatten().clone() for n in layers})
            yield model(x[:, :-1], x[:, 1:], reduction="sum")[1]

    for t in (1, 2):
        with torch.no_grad():  # the reference follows the deltas' current values
            for n, m in layers.items():
                ref_lin[n].weight.copy_(m.merged_weight(torch.float32))
                ref_lin[n].weight.requires_grad_(True)
                ref_lin[n].weight.grad = None
        _, norm, reselected = train.train_step(t, micro_batches(t), n_targets, params, opt, sel, grad_clip=max_norm)
        assert (reselected is None) == (t == 1)  # the schedule reselects (all k) at step 2
        dense = {n: ref_lin[n].weight.grad.flatten().clone() for n in layers}
        # the gradient norm of the deltas is that of the dense gradients at the active positions
        ref_norm = torch.cat([dense[n][before[n][0] if t == 2 else m.indices.long()]
                              for n, m in layers.items()]).norm()
        assert norm == pytest.approx(float(ref_norm), rel=1e-4)
        coef = min(1.0, max_norm / (norm + 1e-6))
        assert coef < 0.5  # it really clips
        coefs.append(coef)
        for n in layers:
            G[n].append(dense[n] * coef)
        if t == 1:
            windows = {n: m.window for n, m in layers.items()}
            for n, w in windows.items():  # candidates: the k largest |dW| of the window's first micro-batch
                k = layers[n].indices.numel()
                assert set(w.candidates.tolist()) == set(first_micro[n].abs().topk(k).indices.tolist()), n

    for n, w in windows.items():
        c = w.candidates.long()
        g1, g2 = G[n][0][c], G[n][1][c]
        assert w.steps == 2
        scale = float((g1.abs() + g2.abs()).max())  # fp32 sums in another order: a scale-aware atol
        torch.testing.assert_close(w.grad_sum, g1 + g2, rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(w.sq_sum, g1 ** 2 + g2 ** 2, rtol=1e-4, atol=1e-4 * scale ** 2)
        # the unclipped sums would be far off: the coefficient is really applied
        assert not torch.allclose(w.grad_sum, g1 / coefs[0] + g2 / coefs[1], rtol=0.1)

    assert schedule.is_reselection(2) and schedule.fraction(2) == 1.0  # step 2 replaced all k: the candidates
    seeded = 0
    for n, m in layers.items():
        c = windows[n].candidates.long()
        idx = m.indices.long()
        assert set(idx.tolist()) == set(c.tolist())
        old_idx, old_val, old_state = before[n]
        st = opt.state[m.values]
        new = ~torch.isin(idx, old_idx)
        j = slots_of(c, idx[new])
        Gs = torch.stack([G[n][0][c[j]], G[n][1][c[j]]])  # (2 steps, m)
        mean, mean_sq = Gs.mean(0), (Gs ** 2).mean(0)
        m_exp, v_exp = mean * (1 - b1 ** 2), mean_sq * (1 - b2 ** 2)  # fp32 sums in another order: scale-aware atol
        torch.testing.assert_close(st["exp_avg"][new], m_exp, rtol=1e-4, atol=1e-4 * float(m_exp.abs().max()))
        torch.testing.assert_close(st["exp_avg_sq"][new], v_exp, rtol=1e-4, atol=1e-4 * float(v_exp.max()))
        assert torch.all(st["age"][new] == 2) and torch.all(m.values[new] == 0)
        seeded += int(new.sum())
        # a position active before and chosen again keeps its value and state
        kept = idx[~new]
        for key in old_state:
            assert torch.equal(st[key][slots_of(idx, kept)], old_state[key][slots_of(old_idx, kept)])
        assert torch.equal(m.values.detach()[slots_of(idx, kept)], old_val[slots_of(old_idx, kept)])
    assert seeded > 0


def test_window_state_round_trip():
    """issue: Selector.state_dict / load_state_dict (through torch.save and weights_only=True) restore the
    open windows (candidates, sums, steps; positions recomputed, step_sum zero), and a resumed run then
    accumulates and reselects exactly as the uninterrupted one; a window missing from the state is closed."""
    def setup():
        model = tiny_model()
        layers = add_sparse_deltas(model, PROJECTIONS, density=0.05, seed=1)
        set_random_values(model, scale=0.02)
        opt = spiel.AdamW([m.values for m in layers.values()], lr=1e-3)
        return model, layers, opt, Selector(model, "ag", Schedule(20, interval=10, first=3), opt)

    batches = [tokens(seed=t, B=2, T=11) for t in range(1, 4)]

    def step(model, sel, opt, t, clip):  # train.train_step of 2 micro-batches, clipped at `clip` (0: not)
        x = batches[t - 1]
        losses = (model(x[:, :-1], x[:, 1:], reduction="sum")[1] for _ in range(2))
        params = [m.values for m in delta_layers(model).values()]
        _, norm, reselected = train.train_step(t, losses, 2 * x[:, 1:].numel(), params, opt, sel, grad_clip=clip)
        assert not clip or norm > clip  # it really clips: the window keeps scaled step gradients
        return reselected

    model_a, layers_a, opt_a, sel_a = setup()
    step(model_a, sel_a, opt_a, 1, 0.05)
    buf = io.BytesIO()
    torch.save({"sel": sel_a.state_dict(), "opt": opt_a.state_dict(), "values": [m.values.detach() for m in
                                                                                 layers_a.values()]}, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd["sel"]) == set(layers_a)

    model_b, layers_b, opt_b, sel_b = setup()
    with torch.no_grad():
        for m, v in zip(layers_b.values(), sd["values"]):
            m.values.copy_(v)
    opt_b.load_state_dict(sd["opt"])
    sel_b.load_state_dict(sd["sel"])
    for n in layers_a:
        wa, wb = layers_a[n].window, layers_b[n].window
        assert wb is not None and wb.steps == wa.steps == 1
        assert wb.candidates.dtype == layers_b[n].indices.dtype
        assert torch.equal(wa.candidates, wb.candidates)
        assert torch.equal(wa.grad_sum, wb.grad_sum) and torch.equal(wa.sq_sum, wb.sq_sum)
        assert not wb.step_sum.any()
        # a Window by itself round-trips too
        w = Window(layers_b[n].indices)
        w.load_state_dict(wa.state_dict())
        assert torch.equal(w.candidates, wa.candidates) and w.steps == 1 and torch.equal(w.grad_sum, wa.grad_sum)
    windows = {n: (layers_a[n].window, layers_b[n].window) for n in layers_a}
    changed = []
    for model, sel, opt in ((model_a, sel_a, opt_a), (model_b, sel_b, opt_b)):
        assert step(model, sel, opt, 2, 0.03) is None
        changed.append(step(model, sel, opt, 3, 0.0)[0])  # the schedule's first reselection: the windows close
    for n in layers_a:
        wa, wb = windows[n]
        assert wa.steps == wb.steps == 3
        torch.testing.assert_close(wa.grad_sum, wb.grad_sum, rtol=1e-6, atol=0)
        torch.testing.assert_close(wa.sq_sum, wb.sq_sum, rtol=1e-6, atol=0)
        assert layers_a[n].window is layers_b[n].window is None
    assert changed[0] == changed[1]
    for n in layers_a:
        assert torch.equal(layers_a[n].indices, layers_b[n].indices)
        torch.testing.assert_close(layers_a[n].values, layers_b[n].values, rtol=1e-6, atol=0)
        for key in ("exp_avg", "exp_avg_sq", "age"):
            torch.testing.assert_close(opt_a.state[layers_a[n].values][key], opt_b.state[layers_b[n].values][key],
                                       rtol=1e-5, atol=0)
    sel_b.begin_step(1)
    sel_b.load_state_dict({})  # nothing open in the state: every window closes
    assert all(m.window is None for m in layers_b.values())


def test_window_state_dict_before_first_backward():
    """a window opened by begin_step but not yet fed a backward pass (no candidates) saves and loads too."""
    layer = SparseDeltaLinear(nn.Linear(5, 4, bias=False), 6)
    sel = Selector(nn.Sequential(layer), "ag", Schedule(10, interval=5, first=2), spiel.AdamW([layer.values]))
    sel.begin_step(1)
    sd = sel.state_dict()
    sel.load_state_dict(sd)
    assert layer.window is not None and layer.window.candidates is None and layer.window.steps == 0


@pytest.mark.parametrize("sorted_slots", [True, False])
def test_sparse_path_inside_open_window_matches_dense(sorted_slots, monkeypatch):
    """issue: once the window's candidates are chosen, the sparse path (SDDMMs at the candidates and at the
    active positions, which overlap) gives the same d(values) and the same candidate gradients as the dense
    path, micro-batch by micro-batch, and so the same window sums; also with slots out of position order."""
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 10, bias=False).double()
    idx = random_positions(120, 40, gen)
    if not sorted_slots:
        idx = idx[torch.randperm(40, generator=gen)]
    layers = {}
    for path in ("dense", "sparse"):
        layers[path] = SparseDeltaLinear(base, 40, indices=idx).double()
        layers[path].grad_path = path
        with torch.no_grad():
            layers[path].values.copy_(torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        layers[path].window = Window(layers[path].indices)
    calls = []
    real = spiel.sampled_grad
    monkeypatch.setattr(spiel, "sampled_grad", lambda *a, **k: calls.append(a[3].numel()) or real(*a, **k))
    xs = [torch.randn(3, 4, 12, generator=gen, dtype=torch.float64) for _ in range(4)]
    dys = [torch.randn(3, 4, 10, generator=gen, dtype=torch.float64) for _ in range(4)]
    for i, (x, dy) in enumerate(zip(xs, dys)):
        for path, layer in layers.items():
            layer.values.grad = None
            before = None if layer.window.candidates is None else layer.window.step_sum.clone()
            layer(x).backward(dy)
            dW = torch.einsum("bto,bti->oi", dy, x).flatten()
            torch.testing.assert_close(layer.values.grad, dW[layer.indices.long()], rtol=1e-10, atol=1e-12)
            if before is not None:
                torch.testing.assert_close(layer.window.step_sum - before, dW[layer.window.candidates.long()].float(),
                                           rtol=1e-5, atol=1e-6)
        if i == 1:
            for layer in layers.values():
                layer.window.end_step(0.3)
    assert calls == [40, 40] * 3  # the sparse layer after its first micro-batch: k candidates, k active
    wd, ws = layers["dense"].window, layers["sparse"].window
    assert torch.equal(wd.candidates, ws.candidates)
    assert torch.isin(ws.candidates, layers["sparse"].indices).any()  # candidates overlap active positions
    torch.testing.assert_close(ws.step_sum, wd.step_sum, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ws.grad_sum, wd.grad_sum, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ws.sq_sum, wd.sq_sum, rtol=1e-6, atol=1e-7)


# -----------------------------------------------------------------------------
# 6. SpIEL-AG on a constructed case


def ag_case():
    """one 4x5 layer, k = 6 at positions [0, 3, 7, 10, 14, 19], with an AdamW state from one real step."""
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(5, 4, bias=False), 6, indices=torch.tensor([0, 3, 7, 10, 14, 19]))
    opt = spiel.AdamW([layer.values], lr=1e-3)
    train.train_step(1, [layer(torch.randn(3, 5)).square().sum()], 1, [layer.values], opt, None)
    with torch.no_grad():  # |values| order: slot 4 (pos 14) < slot 1 (pos 3) < slot 3 (pos 10) < 0 < 5 < 2
        layer.values.copy_(torch.tensor([0.5, -0.01, 2.0, 0.03, -0.002, -1.0]))
    return layer, opt


def test_ag_grows_top_accumulated_gradients_and_seeds_adam():
    """AG at t = 25: drop the 3 smallest |values|, grow the best |grad_sum| among candidates not staying
    active (a dropped position chosen again keeps its slot, value and Adam state), seed the new deltas'
    Adam state from the window (mean step gradient and mean squared step gradient, age = window steps),
    and one AdamW step afterwards applies per-element bias correction at age + 1."""
    layer, opt = ag_case()
    model = nn.Sequential(layer)
    schedule = Schedule(100, interval=20, first=5, rho0=0.8)
    t = 25
    assert int(6 * schedule.fraction(t)) == 3  # drop the 3 smallest |values|: positions 14, 3, 10
    steps, b1, b2 = 2, 0.9, 0.999
    # candidates as the window leaves them: position 7 stays active (best score, not eligible),
    # 18 and 2 are grown, 3 was dropped and is regrown (keeps its value and state), 5 and 11 lose
    cand = torch.tensor([7, 2, 11, 3, 18, 5])
    grad_sum = torch.tensor([9.0, -4.0, 0.5, 3.0, -6.0, 1.0])
    sq_sum = torch.tensor([30.0, 9.0, 1.0, 5.0, 20.0, 2.0])
    layer.window = window_from(layer.indices, cand, grad_sum.clone(), sq_sum.clone(), steps)
    st = opt.state[layer.values]
    old_idx = layer.indices.long().clone()
    old_state = {k: st[k].clone() for k in ("exp_avg", "exp_avg_sq", "age")}

    sel = Selector(model, "ag", schedule, opt)
    changed = sel.reselect(t)
    idx = layer.indices.long()  # reselect may reorder the slots: compare by position
    assert set(idx.tolist()) == {0, 7, 19, 18, 2, 3}
    assert changed == {"0": 2} and layer.window is None
    values = dict(zip(idx.tolist(), layer.values.detach().tolist()))
    assert values == pytest.approx({0: 0.5, 3: -0.01, 7: 2.0, 19: -1.0, 2: 0.0, 18: 0.0})
    kept = torch.tensor([0, 3, 7, 19])
    for key in old_state:  # positions still active (3 included) keep their Adam state
        assert torch.equal(st[key][slots_of(idx, kept)], old_state[key][slots_of(old_idx, kept)])

    # seeded state, written out: m = mean (1 - b1^n), v = mean_sq (1 - b2^n), age = n = window steps, with
    # mean and mean_sq the mean step gradient and mean squared step gradient over the window
    new_slots = slots_of(idx, torch.tensor([2, 18])).tolist()
    for slot in new_slots:
        j = cand.tolist().index(int(idx[slot]))
        mean, mean_sq = float(grad_sum[j]) / steps, float(sq_sum[j]) / steps
        assert float(st["age"][slot]) == steps
        assert float(st["exp_avg"][slot]) == pytest.approx(mean * (1 - b1 ** steps), rel=1e-6)
        assert float(st["exp_avg_sq"][slot]) == pytest.approx(mean_sq * (1 - b2 ** steps), rel=1e-6)

    # one AdamW step with a zero gradient: bias correction at age + 1 (per element) moves the new deltas
    # by -lr * m_hat / (sqrt(v_hat) + eps), m_hat = b1 m / (1 - b1^(age+1)), v_hat = b2 v / (1 - b2^(age+1))
    seeded = {s: (float(st["exp_avg"][s]), float(st["exp_avg_sq"][s])) for s in new_slots}
    layer.values.grad = torch.zeros(6)
    opt.step()
    lr, eps, age = 1e-3, 1e-6, steps
    for slot, (m, v) in seeded.items():
        m_hat, v_hat = b1 * m / (1 - b1 ** (age + 1)), b2 * v / (1 - b2 ** (age + 1))
        assert float(layer.values.detach()[slot]) == pytest.approx(-lr * m_hat / (math.sqrt(v_hat) + eps), rel=1e-5)
        assert float(st["age"][slot]) == age + 1


def test_ag_too_few_eligible_candidates_drops_fewer():
    """only one candidate is eligible: one drop (the smallest |value|), one growth; k stays 6."""
    layer, opt = ag_case()
    schedule = Schedule(100, interval=20, first=5, rho0=0.8)
    # only position 12 is eligible: one drop (the smallest |value|, position 14), one growth
    layer.window = window_from(layer.indices, torch.tensor([0, 7, 19, 12]), torch.tensor([5.0, 5.0, 5.0, 1.0]),
                               torch.ones(4), 2)
    changed = Selector(nn.Sequential(layer), "ag", schedule, opt).reselect(25)
    assert changed == {"0": 1}
    assert sorted(layer.indices.long().tolist()) == [0, 3, 7, 10, 12, 19]
    assert float(layer.values.detach()[slots_of(layer.indices, torch.tensor([12]))]) == 0.0


def test_ag_reselect_without_window_is_an_error():
    """reselecting AG with no accumulated step (window never opened or never fed) is an error."""
    layer, opt = ag_case()
    sel = Selector(nn.Sequential(layer), "ag", Schedule(100, interval=20, first=5), opt)
    with pytest.raises(RuntimeError, match="no accumulated gradients"):
        sel.reselect(25)
    with pytest.raises(ValueError):
        Selector(nn.Sequential(layer), "xx", Schedule(100), opt)


# -----------------------------------------------------------------------------
# 7. SpIEL-MA on constructed cases; MA never regrows an active position, AG may


@pytest.mark.filterwarnings("error::UserWarning")  # (a float() of a tensor that requires grad warned here)
def test_drop_and_grow_regrow_dropped_both_modes():
    """issue: a dropped position with the best score among candidates. regrow_dropped=False (MA): every
    position active now is excluded, so it is NOT grown back; regrow_dropped=True (AG): it is, keeping its
    slot, value and state. A candidate that stays active is never grown. k constant, indices unique. The same
    with a shared scratch mask (as the Selector passes: larger than the matrix), which is all False again after."""
    shared = torch.zeros(64, dtype=torch.bool)
    for regrow, mask in ((False, None), (True, None), (False, shared), (True, shared)):
        layer, _ = ag_case()  # drop n = 2: positions 14 (slot 4) and 3 (slot 1)
        # 7 stays active (never eligible); 3 is dropped but the best eligible score; then 8, 12; 14 is weak
        cand = torch.tensor([7, 3, 8, 12, 14])
        score = torch.tensor([100.0, 10.0, 5.0, 4.0, 1.0])
        slots, grown = drop_and_grow(layer, 2, cand, score, regrow_dropped=regrow, mask=mask)
        assert not shared.any()
        idx = layer.indices.long()
        assert idx.numel() == 6 and torch.unique(idx).numel() == 6
        if regrow:  # 3 regrown in its slot with its value; 8 replaces 14 in slot 4
            assert slots.tolist() == [4] and cand[grown].tolist() == [8]
            assert idx.tolist() == [0, 3, 7, 10, 8, 19]
            assert layer.values.detach().tolist() == pytest.approx([0.5, -0.01, 2.0, 0.03, 0.0, -1.0])
        else:  # 3 and 14 are active now: excluded; 8 and 12 grow into the freed slots
            assert sorted(slots.tolist()) == [1, 4] and set(cand[grown].tolist()) == {8, 12}
            assert set(idx.tolist()) == {0, 7, 10, 19, 8, 12}
            assert float(layer.values.detach()[1]) == 0.0 and float(layer.values.detach()[4]) == 0.0
        assert 7 in idx.tolist() and float(layer.values.detach()[slots_of(layer.indices, torch.tensor([7]))]) == 2.0


def test_ma_reselect_excludes_every_active_position():
    """issue: MA through the Selector, SM3 accumulators set so that a dropped position (3 = row 0, col 3) has
    the top row[i] col[j]; it is NOT regrown: growth takes the best positions that are not active now."""
    layer, _ = ag_case()
    opt = sm3_for({"0": layer}, lr=0.1, momentum=0.9)
    layer.values.grad = torch.ones(6)
    opt.step()
    with torch.no_grad():
        layer.values.copy_(torch.tensor([0.5, -0.01, 2.0, 0.03, -0.002, -1.0]))  # as ag_case: drop 14 and 3
    st = opt.state[layer.values]
    st["row"] = torch.tensor([10.0, 1.0, 2.0, 1.0])
    st["col"] = torch.tensor([1.0, 1.0, 1.0, 10.0, 3.0])
    # scores: pos 3 = 100 (active), pos 4 = 30, pos 13 = 20, then ties at 10 (positions 0 (active), 1, 2, 8, 18)
    schedule = Schedule(100, interval=20, first=5, rho0=0.5)
    assert int(6 * schedule.fraction(25)) == 2
    mom = st["momentum_buffer"].clone()
    old_idx = layer.indices.long().clone()
    changed = Selector(nn.Sequential(layer), "ma", schedule, opt).reselect(25)
    idx = layer.indices.long()
    assert changed == {"0": 2}
    assert set(idx.tolist()) == {0, 7, 10, 19, 4, 13} and 3 not in idx.tolist()
    assert idx.numel() == 6 and torch.unique(idx).numel() == 6 and torch.equal(idx, idx.sort().values)
    new = slots_of(idx, torch.tensor([4, 13]))
    still = torch.tensor([0, 7, 10, 19])
    assert torch.all(layer.values[new] == 0) and torch.all(st["momentum_buffer"][new] == 0)
    assert torch.equal(st["momentum_buffer"][slots_of(idx, still)], mom[slots_of(old_idx, still)])


@pytest.mark.parametrize("t", [5, 25])
def test_ma_grows_top_outer_product(t):
    """MA at the first (all k) and a later reselection: the grown positions are the top n row[i] col[j]
    among positions not active before (even if a dropped position scores best); grown deltas start at 0
    with zero momentum; kept ones keep value and momentum."""
    torch.manual_seed(0)
    out_f, in_f, k = 5, 7, 8
    layer = SparseDeltaLinear(nn.Linear(in_f, out_f, bias=False), k, generator=torch.Generator().manual_seed(1))
    opt = sm3_for({"0": layer}, lr=0.1, momentum=0.9)
    train.train_step(1, [layer(torch.randn(3, in_f)).square().sum()], 1, [layer.values], opt, None)
    vals = torch.randn(k)
    with torch.no_grad():
        layer.values.copy_(vals)
    schedule = Schedule(100, interval=20, first=5, rho0=0.8)
    n = int(k * schedule.fraction(t))
    assert n == (8 if t == 5 else 4)
    idx = layer.indices.long().clone()
    order = layer.values.detach().abs().argsort()
    keep, drop = idx[order[n:]], idx[order[:n]]  # positions that stay active / are dropped
    row, col = torch.rand(out_f) + 0.1, torch.rand(in_f) + 0.1
    row[drop[0] // in_f], col[drop[0] % in_f] = 5.0, 5.0  # a dropped position scores best overall
    if keep.numel():  # and a kept one second: neither may count as a growth
        row[keep[0] // in_f], col[keep[0] % in_f] = 4.0, 4.0
    st = opt.state[layer.values]
    st["row"], st["col"] = row.clone(), col.clone()
    mom = st["momentum_buffer"].clone()

    Selector(nn.Sequential(layer), "ma", schedule, opt).reselect(t)
    score = torch.outer(row, col).flatten()  # brute force (out * in)
    score[idx] = -math.inf  # every position active before is excluded
    expected = set(keep.tolist()) | set(score.topk(n).indices.tolist())
    new = layer.indices.long()
    assert set(new.tolist()) == expected and new.numel() == k
    assert int(drop[0]) not in new.tolist()
    grown, still = new[~torch.isin(new, idx)], new[torch.isin(new, idx)]  # by position (slots may reorder)
    assert grown.numel() == n
    assert torch.all(layer.values[slots_of(new, grown)] == 0)
    assert torch.all(st["momentum_buffer"][slots_of(new, grown)] == 0)
    assert torch.equal(st["momentum_buffer"][slots_of(new, still)], mom[slots_of(idx, still)])
    assert torch.equal(layer.values.detach()[slots_of(new, still)], vals[slots_of(idx, still)])


@pytest.mark.parametrize("seed,zeros", [(0, False), (1, False), (2, True)])
def test_ma_candidates_equal_the_brute_force_outer_product(seed, zeros):
    """ma_candidates(active, n, row, col) returns the top n INACTIVE positions by row[i] col[j] (as ranking the
    whole outer product would) and their scores, without forming it; also with rows / columns whose
    accumulators are still 0, for every n up to all the inactive positions, and with a scratch mask passed
    (the same answer; the mask is all False again after)."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f, k = 13, 11, 10
    active = random_positions(out_f * in_f, k, g)
    row, col = torch.rand(out_f, generator=g), torch.rand(in_f, generator=g)
    if zeros:  # never visited by an active delta: score 0
        row[[2, 7]], col[3] = 0.0, 0.0
    score = torch.outer(row, col).flatten()
    mask = torch.zeros(out_f * in_f, dtype=torch.bool)
    mask[active] = True
    scratch = torch.zeros(out_f * in_f + 7, dtype=torch.bool)  # a Selector's mask: all False, >= size entries
    for n in (1, 4, 20, out_f * in_f - k):
        pos, s = ma_candidates(active, n, row, col)
        pos_m, s_m = ma_candidates(active, n, row, col, scratch)
        assert torch.equal(pos_m, pos) and torch.equal(s_m, s) and not scratch.any()  # the mask changes nothing
        assert pos.numel() == n and not mask[pos].any() and pos.unique().numel() == n
        torch.testing.assert_close(s, row[pos // in_f] * col[pos % in_f], rtol=0, atol=0)
        brute = score.masked_fill(mask, -math.inf).topk(n).values
        torch.testing.assert_close(s.sort().values, brute.sort().values, rtol=0, atol=0)  # the same scores
    assert ma_candidates(active, 10**6, row, col)[0].numel() == out_f * in_f - k  # at most all the inactive ones


# -----------------------------------------------------------------------------
# 8. training lowers the loss and never touches the base


@pytest.mark.parametrize("method,max_norm", [("ag", None), ("ma", None), ("ag", 0.5)])
def test_training_lowers_loss_base_untouched(method, max_norm):
    """40 steps on one batch (AG: AdamW, also with clipping; MA: SM3) lower the loss by > 10% while every
    non-delta tensor stays bit-identical."""
    torch.manual_seed(0)
    model = tiny_model()
    layers = add_sparse_deltas(model, PROJECTIONS, density=0.1)
    frozen = frozen_state(model)
    params = [m.values for m in layers.values()]
    opt = spiel.AdamW(params, lr=1e-2) if method == "ag" else sm3_for(layers, lr=1e-1)
    batch = tokens(seed=5, B=4, T=33)
    schedule = Schedule(40, interval=10, first=3)
    losses = run_steps(model, method, opt, schedule, 40, lambda t, micro: batch, 4 * 32, max_norm=max_norm)
    assert losses[-1] < 0.9 * losses[0], losses
    # while attached, a full-precision base holds W0 + delta at every use (section 9's resident weight) ...
    for layer in layers.values():
        w = layer.merged_weight(layer.base.weight.dtype).detach().view(-1)
        torch.testing.assert_close(w[layer.indices.long()] - frozen_at(frozen, layer, model),
                                   layer.values.detach(), rtol=0, atol=1e-6)
    # ... and taking the deltas off gives back every base tensor bit for bit
    spiel.remove_deltas(model)
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert after.keys() == {k.replace(".base.", ".") for k in frozen}
    for k, v in frozen.items():
        assert torch.equal(after[k.replace(".base.", ".")], v), k


def frozen_at(frozen: dict, layer, model) -> torch.Tensor:
    """W0 at a layer's active positions, from the frozen copy."""
    name = next(n for n, m in model.named_modules() if m is layer)
    return frozen[name + ".base.weight"].view(-1)[layer.indices.long()]


# -----------------------------------------------------------------------------
# 9. the budget


def target_shapes(args):
    kv = args.n_kv_heads * args.head_dim
    per_layer = [(args.dim, args.dim), (kv, args.dim), (kv, args.dim), (args.dim, args.dim),  # wq wk wv wo
                 (args.ffn_dim, args.dim), (args.dim, args.ffn_dim), (args.ffn_dim, args.dim)]  # w1 w2 w3
    return per_layer * args.n_layers


def test_split_budget_sums_exactly():
    """largest-remainder split: exact sum, at least 1 and at most the size per matrix, proportional."""
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
    """density, count and LoRA-rank budgets give the expected totals on the 14 targeted matrices; only the
    values train; bad budgets and adding deltas twice are errors."""
    args = ModelArgs(**TINY)
    shapes = target_shapes(args)
    targeted = sum(o * i for o, i in shapes)
    assert len(shapes) == 14

    def total(**budget):
        model = tiny_model()
        layers = add_sparse_deltas(model, PROJECTIONS, **budget)
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
            add_sparse_deltas(tiny_model(), PROJECTIONS, **bad)
    model = tiny_model()
    add_sparse_deltas(model, PROJECTIONS, num_tunable=100)
    with pytest.raises(ValueError):
        add_sparse_deltas(model, PROJECTIONS, num_tunable=100)  # deltas already added


def test_lora_param_count_seed_and_summary():
    """lora_param_count = rank * (in + out) over the targets; the seed decides the positions; the summary
    states the count, the matrices and the split by projection."""
    args = ModelArgs(**TINY)
    assert lora_param_count(tiny_model(), PROJECTIONS, 5) == 5 * sum(o + i for o, i in target_shapes(args))
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    la, lb, lc = (add_sparse_deltas(m, PROJECTIONS, density=0.05, seed=s) for m, s in ((a, 1), (b, 1), (c, 2)))
    assert all(torch.equal(la[n].indices, lb[n].indices) for n in la)
    assert not all(torch.equal(la[n].indices, lc[n].indices) for n in la)
    text = budget_summary(a)
    k = sum(m.indices.numel() for m in la.values())
    assert f"{k:,}" in text and "14 matrices" in text
    for proj in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        n = sum(m.indices.numel() for name, m in la.items() if name.endswith("." + proj))
        assert f"{proj} {n:,}" in text


# -----------------------------------------------------------------------------
# 10. random positions


@pytest.mark.parametrize("n,k", [(10 ** 7, 100), (10 ** 6, 1), (1000, 250), (1000, 251), (1000, 990), (1000, 1000)])
def test_random_positions(n, k):
    """k distinct sorted positions in [0, n), decided by the generator."""
    p = random_positions(n, k, torch.Generator().manual_seed(0))
    assert p.numel() == k
    assert torch.unique(p).numel() == k
    assert torch.equal(p, p.sort().values)
    assert int(p.min()) >= 0 and int(p.max()) < n
    assert torch.equal(p, random_positions(n, k, torch.Generator().manual_seed(0)))  # the generator decides


def test_random_positions_uniform():
    """the k << n path is uniform: each decile gets about 10%."""
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(200):  # the sparse path (k << n): deciles should get 10% each
        counts += torch.bincount(random_positions(10_000, 100, g) // 1000, minlength=10)
    assert counts.sum() == 20_000 and (counts - 2000).abs().max() < 200, counts


# -----------------------------------------------------------------------------
# 11. the two gradient paths (dense dW then gather, or a sampled dense-dense matmul at the needed entries)


@pytest.mark.parametrize("bias", [False, True])
def test_dense_and_sparse_gradient_paths_agree(bias):
    """d(values) and dx are the same on both paths (fp64), also with slots out of position order."""
    torch.manual_seed(3)
    base = torch.nn.Linear(24, 17, bias=bias).double()
    layer = spiel.SparseDeltaLinear(base, 60)
    with torch.no_grad():
        layer.values.copy_(torch.randn(60, dtype=torch.float64))
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    grads = {}
    for path in ("dense", "sparse"):
        spiel.set_grad_path(torch.nn.Sequential(layer), path)
        assert layer.grad_path == path
        layer.values.grad, x.grad = None, None
        (layer(x) ** 2).sum().backward()
        grads[path] = (layer.values.grad.clone(), x.grad.clone())
    torch.testing.assert_close(grads["dense"][0], grads["sparse"][0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grads["dense"][1], grads["sparse"][1], atol=1e-12, rtol=1e-12)
    # slots out of position order (as after a hand edit): the sparse path still maps gradients to slots
    perm = torch.randperm(60)
    spiel.release(layer)  # positions move: the resident weight gives W0 back first (section 9)
    layer.indices.copy_(layer.indices[perm])
    with torch.no_grad():
        layer.values.copy_(layer.values[perm])
    layer.values.grad = None
    (layer(x) ** 2).sum().backward()
    torch.testing.assert_close(layer.values.grad, grads["dense"][0][perm], atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda v: spiel.SparseDeltaFn.apply(x.detach(), v, layer),
                                    (layer.values.detach().double().requires_grad_(),))


def test_sampled_grad_and_csr_pattern():
    """sampled_grad(layer, dy^T, x^T, positions) is (dy^T x) at any positions (unsorted, repeated), from the
    token-major copies (out, N) and (in, N); csr_pattern gives the CSR pattern (row pointers, columns) and the sort
    order, cached until the positions are changed in place."""
    g = torch.Generator().manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(9, 7, bias=False).double(), 10, generator=g)
    dy, x = torch.randn(6, 7, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64)
    dW = (dy.T @ x).view(-1)
    dy_t, x_t = dy.T.contiguous(), layer.inputs.token_major(x)
    assert torch.equal(x_t, x.T) and x_t.is_contiguous()
    pos = torch.tensor([50, 3, 3, 62, 0, 17, 62, 9])
    torch.testing.assert_close(spiel.sampled_grad(layer, dy_t, x_t, pos), dW[pos], rtol=1e-12, atol=1e-12)
    csr, order = spiel.csr_pattern(layer, pos)
    assert torch.equal(pos[order], pos.sort().values)
    assert torch.equal(csr.col_indices(), (pos[order] % 9).int())
    assert torch.equal(csr.crow_indices(), torch.tensor([0, 3, 5, 5, 5, 5, 6, 8], dtype=torch.int32))  # rows 0 0 0 1 1 5 6 6
    assert csr.shape == (7, 9) and not csr.values().any()
    idx = layer.indices
    first = spiel.csr_pattern(layer, idx)
    assert first[1] is None  # sorted slots: no reorder
    assert spiel.csr_pattern(layer, idx)[0] is first[0]  # cached
    idx[0] = int(idx[0])  # an in-place write (here of the same value) bumps the version: recomputed
    assert spiel.csr_pattern(layer, idx)[0] is not first[0]
    torch.testing.assert_close(spiel.sampled_grad(layer, dy_t, x_t, idx), dW[idx.long()], rtol=1e-12, atol=1e-12)


def test_layers_that_read_one_input_transpose_it_once():
    """the delta layers of a model share one Inputs: wq, wk and wv (w1 and w3) read the same tensor, and their
    backward passes reuse its transpose; a new input, or the same one written in place, is transposed anew."""
    model = Transformer(ModelArgs(**TINY))
    layers = spiel.add_sparse_deltas(model, PROJECTIONS, density=0.05)
    inputs = {id(m.inputs) for m in layers.values()}
    assert len(inputs) == 1
    shared = next(iter(layers.values())).inputs
    calls = []
    real = torch.Tensor.contiguous

    def counting(t, *a, **k):
        calls.append(tuple(t.shape))
        return real(t, *a, **k)
    x = torch.randn(12, 64)
    torch.Tensor.contiguous = counting
    try:
        first = shared.token_major(x)
        assert shared.token_major(x.view(12, 64)) is first and len(calls) == 1  # a view of the same input: reused
        x.mul_(1)  # written in place: a new version, a new transpose
        assert shared.token_major(x) is not first and len(calls) == 2
        assert shared.token_major(torch.randn(12, 64)) is not first and len(calls) == 3
    finally:
        torch.Tensor.contiguous = real
    # the backward of a whole model transposes each distinct input once: 4 per block, for 7 matrices
    tokens, seen = torch.randint(256, (2, 10)), []
    real_tm = spiel.Inputs.token_major

    def watched(self, x):
        before = self.last
        out = real_tm(self, x)
        seen.append(self.last is before)  # True: reused
        return out
    spiel.Inputs.token_major = watched
    try:
        model(tokens, tokens)[1].backward()
    finally:
        spiel.Inputs.token_major = real_tm
    assert len(seen) == 14 and seen.count(False) == 8, seen  # 2 blocks x 7 matrices, 2 x 4 inputs


def test_csr_pattern_cache_is_not_fooled_by_a_reused_address():
    """the sparse pattern is cached for one tensor object, not for an address: the cache (`.pattern` of the
    layer, or of the window passed as cache) holds the positions tensor itself and its version, so a new tensor
    at the same address (as an AG window's positions can land where the closed window's were) with version 0 and
    the same length gets its own pattern. Here two tensors share memory deterministically (both views of one
    numpy array)."""
    layer = SparseDeltaLinear(nn.Linear(9, 7, bias=False).double(), 10)
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(6, 7, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64)
    dW = (dy.T @ x).view(-1)
    dy_t, x_t = dy.T.contiguous(), x.T.contiguous()
    memory = np.array([1, 5, 12, 30, 44, 60], dtype=np.int64)
    old = torch.from_numpy(memory)
    for cache in (None, Window(layer.indices)):  # the layer's own cache, and a window's
        holder = layer if cache is None else cache
        holder.pattern = None
        memory[:] = [1, 5, 12, 30, 44, 60]
        torch.testing.assert_close(spiel.sampled_grad(layer, dy_t, x_t, old, cache=cache), dW[old])
        assert holder.pattern[0] is old and holder.pattern[1] == old._version  # the tensor itself, not its address
        memory[:] = [2, 8, 20, 33, 40, 61]  # the memory now holds other positions (as a new allocation would)
        new = torch.from_numpy(memory)
        assert new.data_ptr() == old.data_ptr() and new._version == 0 and new is not old
        torch.testing.assert_close(spiel.sampled_grad(layer, dy_t, x_t, new, cache=cache), dW[new])
        assert holder.pattern[0] is new and holder.pattern[1] == new._version  # recomputed for the new tensor


def test_back_to_back_windows_sparse_path_gradients():
    """AG windows back to back (Schedule(interval=2, first=1)), sparse path forced, 2 micro-batches a step:
    every d(values) and every candidate gradient equals the dense dW. This is the end-to-end form of the
    csr_pattern bug above: it fails when the allocator gives a new window's positions the closed window's
    memory (a standalone copy of this loop failed in most runs; inside this suite the heap happened not to
    reuse the address, so it passes here). Kept as the regression test for the fix."""
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(12, 10, bias=False).double(), 20).double()
    layer.grad_path = "sparse"
    opt = spiel.AdamW([layer.values], lr=1e-2)
    schedule = Schedule(100, interval=2, first=1)
    sel = Selector(nn.Sequential(layer), "ag", schedule, opt)
    wrong = []

    def micro_batches(t):  # loss = sum(y * dy): the backward gets dy; each micro-batch's gradients checked
        for micro in range(2):
            x = torch.randn(5, 12, dtype=torch.float64)
            dy = torch.randn(5, 10, dtype=torch.float64)
            w = layer.window
            before = None if w.candidates is None else w.step_sum.clone()
            grad_before = torch.zeros_like(layer.values) if layer.values.grad is None else layer.values.grad.clone()
            yield (layer(x) * dy).sum()  # (train_step runs its backward before asking for the next)
            dW = (dy.T @ x).view(-1)
            if not torch.allclose(layer.values.grad - grad_before, dW[layer.indices.long()]):
                wrong.append(("values", t, micro))
            if before is not None and not torch.allclose(w.step_sum - before, dW[w.candidates.long()].float(),
                                                         atol=1e-5):
                wrong.append(("candidates", t, micro))

    reselections = 0
    for t in range(1, 60):
        reselections += train.train_step(t, micro_batches(t), 1, [layer.values], opt, sel)[2] is not None
    assert reselections == 30  # t = 1, 3, ..., 59: every window closed by a reselection
    assert not wrong, f"wrong gradients at {wrong[:4]} ... ({len(wrong)} in all)"


def test_grad_path_choice_is_forced_or_follows_density(monkeypatch):
    """use_sparse_path: auto follows SPARSE_DENSITY_MAX per device type (CPU 8%, CUDA never), a forced path
    wins; the forced sparse path really runs; inside an open window the first micro-batch is dense (it chooses
    the candidates) and later ones take the sparse path at the k active positions plus the k candidates."""
    layer = spiel.SparseDeltaLinear(torch.nn.Linear(10, 10), 5)  # density 5%
    x = torch.randn(3, 10)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert spiel.SPARSE_DENSITY_MAX == {"cpu": 0.08, "cuda": 0.0}
    assert spiel.use_sparse_path(layer, cpu)  # below the CPU threshold
    assert not spiel.use_sparse_path(layer, cuda)  # unmeasured on CUDA: the authors' dense path
    monkeypatch.setitem(spiel.SPARSE_DENSITY_MAX, "cpu", 0.01)
    assert not spiel.use_sparse_path(layer, cpu)
    layer.grad_path = "sparse"
    assert spiel.use_sparse_path(layer, cpu) and spiel.use_sparse_path(layer, cuda)
    layer.grad_path = "dense"
    assert not spiel.use_sparse_path(layer, cpu)
    layer.grad_path = "sparse"
    calls = []
    monkeypatch.setattr(spiel, "sampled_grad", lambda layer, dy_t, x_t, pos, cache=None: calls.append(pos.numel()) or
                        torch.zeros(pos.numel()))
    layer(x.requires_grad_()).sum().backward()
    assert calls == [5]  # the forced path really ran, at the 5 active positions
    layer.window = Window(layer.indices)
    layer(x).sum().backward()
    assert calls == [5] and layer.window.candidates is not None  # the window's first micro-batch: dense dW
    layer(x).sum().backward()
    assert calls == [5, 5, 5]  # then the sparse path at the candidates and at the active positions
    with pytest.raises(ValueError):
        spiel.set_grad_path(torch.nn.Sequential(layer), "fast")


def test_sparse_path_in_bf16():
    """bf16 inputs: the sparse path computes in fp32 and agrees with the dense path; grads are fp32."""
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
    per row, not per slot, so sorting the slots must leave it alone (and move values and momentum along: the
    optimizer's per_slot state, passed as type(optimizer).per_slot)."""
    layer = spiel.SparseDeltaLinear(torch.nn.Linear(32, 16), 16)  # k == out == 16
    perm = torch.randperm(16)
    layer.indices.copy_(layer.indices[perm])  # slots out of position order
    opt = sm3_for({"0": layer}, lr=0.1, momentum=0.9)
    train.train_step(1, [layer(torch.randn(5, 32)).pow(2).sum()], 1, [layer.values], opt, None)
    st = opt.state[layer.values]
    row, col, mom = st["row"].clone(), st["col"].clone(), st["momentum_buffer"].clone()
    vals, idx = layer.values.detach().clone(), layer.indices.clone()
    order = layer.indices.argsort()
    spiel.sort_slots(layer, st, SM3.per_slot)
    assert torch.equal(layer.indices, idx[order]) and torch.equal(layer.indices, layer.indices.sort().values)
    assert torch.equal(layer.values.detach(), vals[order])
    assert torch.equal(st["row"], row) and torch.equal(st["col"], col)
    assert torch.equal(st["momentum_buffer"], mom[order])


def test_resident_weight_trains_exactly_like_the_transient_one():
    """section 9: a full-precision base holding W0 + delta gives bit-identical training (fp32) to building the
    merged weight afresh, through windows and reselections; moving positions without release() is refused."""
    finals = []
    for resident in (True, False):
        torch.manual_seed(0)
        model = tiny_model()
        layers = add_sparse_deltas(model, PROJECTIONS, density=0.1)
        for layer in layers.values():
            layer.resident = resident
        opt = spiel.AdamW([m.values for m in layers.values()], lr=1e-2)
        run_steps(model, "ag", opt, Schedule(12, interval=5, first=2), 12, lambda t, micro: tokens(seed=t, B=2, T=17),
                  2 * 16)
        finals.append({k: v.clone() for k, v in model.state_dict().items() if k.endswith((".values", ".indices"))})
    assert finals[0].keys() == finals[1].keys() and all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    layer = next(iter(layers.values()))
    layer.resident = True
    layer.merged_weight(layer.base.weight.dtype)
    with torch.no_grad():
        layer.indices[0] = (layer.indices.max() + 1) % math.prod(layer.weight_shape)
    with pytest.raises(RuntimeError, match="release"):
        layer.merged_weight(layer.base.weight.dtype)


@pytest.mark.parametrize("part", [1 << 22, 22, 1])  # one foreach call for all; [5, 17] and [64]; one each
def test_adamw_foreach_equals_the_per_delta_formula_bit_for_bit(part):
    """spiel.AdamW updates many matrices' deltas per foreach call (in parts of at most `part` deltas); it equals,
    bit for bit, the formula written out per tensor: m = lerp(m, g, 1 - b1), v = b2 v + (1 - b2) g^2, age += 1,
    p = p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps) with per-element bias corrections 1 - b^age (ages differ:
    grown deltas are younger), however the matrices are split into parts."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(n, generator=g)) for n in (5, 17, 64)]
    ref = [p.detach().clone() for p in params]
    opt = spiel.AdamW(params, lr=3e-3, weight_decay=0.1)
    opt.part = part
    state = [None] * len(ref)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for i, (r, gr) in enumerate(zip(ref, grads)):
            if state[i] is None:
                state[i] = [torch.zeros_like(r) for _ in range(3)]
            m, v, age = state[i]
            age += 1
            m.lerp_(gr, 1 - 0.9)
            v.mul_(0.999).addcmul_(gr, gr, value=1 - 0.999)
            denom = (v / (1 - torch.pow(0.999, age))).sqrt_().add_(1e-6)
            r.mul_(1 - 3e-3 * 0.1).sub_((m / (1 - torch.pow(0.9, age))).div_(denom), alpha=3e-3)
        if step == 2:  # regrow: some deltas start over (age 0, zero moments), as drop-and-grow leaves them
            for i, p in enumerate(params):
                for key in ("exp_avg", "exp_avg_sq", "age"):
                    opt.state[p][key][::3] = 0
                    state[i][("exp_avg", "exp_avg_sq", "age").index(key)][::3] = 0
    for p, r in zip(params, ref):
        assert torch.equal(p.detach(), r)
