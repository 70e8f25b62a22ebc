"""
Tests for sm3.py: the vectorised SM3-II against a naive per-element reference with explicit cover
sets (dense params, and sparse deltas given with their positions), the 0/0 rule, eps (1e-8 by default,
inside the square root) against a naive formula, state_dict round trips, the row/column accumulators
SpIEL-MA grows from (SM3.accumulators) and the per-slot state, and a least-squares smoke test.
"""

import inspect
import io
import itertools
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sm3 import SM3  # noqa: E402


def sparse_param(k, weight_shape, dtype=torch.float64, index_dtype=torch.int64, seed=0):
    """a SpIEL-like sparse delta: (values (k,), positions entry {values: (indices (k,), (out, in))})."""
    gen = torch.Generator().manual_seed(seed)
    n = weight_shape[0] * weight_shape[1]
    indices = torch.randperm(n, generator=gen)[:k].to(index_dtype)
    p = torch.nn.Parameter(torch.randn(k, generator=gen, dtype=dtype))
    return p, {p: (indices, tuple(weight_shape))}


# -----------------------------------------------------------------------------
# naive reference: python floats, loops over elements, cover sets as explicit sets of positions

def sm3_reference_step(ref, covers, positions, grads, lr, momentum, eps, wd, keep_old_max):
    """One SM3-II step. ref: {"w", "m": {pos: float}, "mu": [float per cover]}; covers: list of
    sets of positions; positions: the positions updated this step; grads: {pos: float}."""
    nu, upd = {}, {}
    for i in positions:
        nu[i] = min(ref["mu"][r] for r, cover in enumerate(covers) if i in cover) + grads[i] ** 2
        upd[i] = grads[i] / math.sqrt(nu[i] + eps) if nu[i] > 0 else 0.0
    for r, cover in enumerate(covers):
        seen = [nu[i] for i in positions if i in cover]
        old = [ref["mu"][r]] if keep_old_max else []
        if seen:
            ref["mu"][r] = max(old + seen)
    for i in positions:
        if momentum > 0:
            ref["m"][i] = momentum * ref["m"].get(i, 0.0) + (1 - momentum) * upd[i]
            upd[i] = ref["m"][i]
        ref["w"][i] = ref["w"][i] - lr * wd * ref["w"][i] - lr * upd[i]


def dense_covers(shape):
    # for each dim d and each j < shape[d], the slice {i : i[d] == j}; a vector: one cover per element
    elements = list(itertools.product(*[range(n) for n in shape]))
    return [{i for i in elements if i[d] == j} for d in range(len(shape)) for j in range(shape[d])]


def random_grad(shape, gen, step):
    # varying scale across steps (so the dense accumulators can shrink) and some exact zeros
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * (3.0 if step == 0 else 0.5)
    return g * (torch.rand(shape, generator=gen, dtype=torch.float64) > 0.2)


# -----------------------------------------------------------------------------
# equivalence with the reference

@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.1)])
@pytest.mark.parametrize("eps", [1e-30, None])  # None: the default (1e-8)
def test_dense_matches_reference(shape, momentum, wd, eps):
    """dense params of rank 0..3: weights and accumulators equal the naive SM3-II reference over 4 steps;
    no step counter is kept in the state."""
    gen = torch.Generator().manual_seed(1)
    lr = 0.1
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
    opt = SM3([p], lr=lr, momentum=momentum, weight_decay=wd, **({} if eps is None else {"eps": eps}))
    eps = 1e-8 if eps is None else eps
    ref_shape = shape or (1,)  # a 0-d scalar is treated as shape (1,)
    covers = dense_covers(ref_shape)
    positions = list(itertools.product(*[range(n) for n in ref_shape]))
    flat = p.detach().reshape(ref_shape)
    ref = {"w": {i: flat[i].item() for i in positions}, "m": {}, "mu": [0.0] * len(covers)}
    for t in range(4):
        p.grad = random_grad(shape, gen, t)
        opt.step()
        g = p.grad.reshape(ref_shape)
        sm3_reference_step(ref, covers, positions, {i: g[i].item() for i in positions},
                           lr, momentum, eps, wd, keep_old_max=False)
        expected = torch.tensor([ref["w"][i] for i in positions], dtype=torch.float64)
        torch.testing.assert_close(p.detach().reshape(-1), expected)
    # and the accumulators themselves: acc_d[j] is the mu of cover (d, j)
    mu = torch.tensor(ref["mu"], dtype=torch.float64)
    acc = torch.cat([opt.state[p][f"acc_{d}"] for d in range(len(ref_shape))])
    torch.testing.assert_close(acc, mu)
    assert "step" not in opt.state[p]
    assert set(opt.state[p]) == {f"acc_{d}" for d in range(len(ref_shape))} | (
        {"momentum_buffer"} if momentum > 0 else set())


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.1)])
@pytest.mark.parametrize("eps", [1e-30, None])  # None: the default (1e-8)
def test_sparse_matches_reference(index_dtype, momentum, wd, eps):
    """a sparse delta given with its positions: the rows and columns of its positions are the cover sets,
    accumulators keep max(old, new); the positions are re-read every step (drop/grow rewrites them in
    place). Weights and the row/col accumulators equal the naive reference over 5 steps."""
    gen = torch.Generator().manual_seed(2)
    lr, (n_out, n_in), k = 0.1, (4, 5), 7
    p, positions = sparse_param(k, (n_out, n_in), index_dtype=index_dtype, seed=3)
    indices = positions[p][0]
    opt = SM3([p], lr=lr, momentum=momentum, weight_decay=wd, positions=positions,
              **({} if eps is None else {"eps": eps}))
    eps = 1e-8 if eps is None else eps
    rows = [{(i, j) for j in range(n_in)} for i in range(n_out)]
    cols = [{(i, j) for i in range(n_out)} for j in range(n_in)]
    covers = rows + cols
    # the reference is keyed by slot s, so that a slot's momentum follows it across index changes
    ref = {"w": {s: p[s].item() for s in range(k)}, "m": {}, "mu": [0.0] * len(covers)}
    for t in range(5):
        p.grad = random_grad((k,), gen, t)
        opt.step()
        pos = {s: divmod(int(indices[s]), n_in) for s in range(k)}
        # reference in position space, then mapped back to slots
        by_pos = {"w": {pos[s]: ref["w"][s] for s in range(k)},
                  "m": {pos[s]: ref["m"][s] for s in ref["m"]}, "mu": ref["mu"]}
        sm3_reference_step(by_pos, covers, list(pos.values()),
                           {pos[s]: p.grad[s].item() for s in range(k)},
                           lr, momentum, eps, wd, keep_old_max=True)
        ref["w"] = {s: by_pos["w"][pos[s]] for s in range(k)}
        ref["m"] = {s: by_pos["m"][pos[s]] for s in range(k) if pos[s] in by_pos["m"]}
        expected = torch.tensor([ref["w"][s] for s in range(k)], dtype=torch.float64)
        torch.testing.assert_close(p.detach(), expected)
        # drop/grow in place: move three slots to positions not currently active
        free = [x for x in torch.randperm(n_out * n_in, generator=gen).tolist()
                if x not in indices.tolist()]
        indices[[0, 3, 5]] = torch.tensor(free[:3], dtype=index_dtype)
    st = opt.state[p]
    assert "step" not in st and st["row"].shape == (n_out,) and st["col"].shape == (n_in,)
    torch.testing.assert_close(torch.cat([st["row"], st["col"]]), torch.tensor(ref["mu"], dtype=torch.float64))


# -----------------------------------------------------------------------------
# eps: 1e-8 by default, inside the square root (the SpIEL authors' SM3)

def test_default_eps_and_one_step_equals_naive_formula():
    """eps defaults to 1e-8; one step on a small dense vector and on a small sparse delta is exactly the
    per-element g / sqrt(nu + 1e-8) (first step: nu = g^2; a vector is plain Adagrad), and a second step
    uses nu = min(row, col) + g^2 for the delta. Elementwise, written out in python floats."""
    assert inspect.signature(SM3).parameters["eps"].default == 1e-8
    lr = 0.5
    v = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    d, positions = sparse_param(3, (2, 3), seed=7)
    indices = positions[d][0]
    opt = SM3([v, d], lr=lr, positions=positions)
    assert opt.param_groups[0]["eps"] == 1e-8
    v0, d0 = v.detach().clone(), d.detach().clone()
    gv = torch.tensor([1e-3, -2e-4, 3.0], dtype=torch.float64)
    gd = torch.tensor([5e-4, -1.5, 2e-5], dtype=torch.float64)
    v.grad, d.grad = gv.clone(), gd.clone()
    opt.step()
    for i in range(3):
        g = gv[i].item()
        assert v[i].item() == pytest.approx(v0[i].item() - lr * g / math.sqrt(g * g + 1e-8), rel=1e-12, abs=1e-15)
        g = gd[i].item()
        assert d[i].item() == pytest.approx(d0[i].item() - lr * g / math.sqrt(g * g + 1e-8), rel=1e-12, abs=1e-15)
    # second step on the delta: nu = min(row[r], col[c]) + g^2, row / col the max of the first step's g^2
    row, col = [0.0] * 2, [0.0] * 3
    for i in range(3):
        r, c = divmod(int(indices[i]), 3)
        row[r], col[c] = max(row[r], gd[i].item() ** 2), max(col[c], gd[i].item() ** 2)
    d1 = d.detach().clone()
    gd2 = torch.tensor([1e-4, 0.3, -2e-5], dtype=torch.float64)
    v.grad, d.grad = None, gd2.clone()
    opt.step()
    for i in range(3):
        r, c = divmod(int(indices[i]), 3)
        nu = min(row[r], col[c]) + gd2[i].item() ** 2
        assert d[i].item() == pytest.approx(d1[i].item() - lr * gd2[i].item() / math.sqrt(nu + 1e-8), rel=1e-12)


def test_eps_matters_for_tiny_gradients():
    """with nu ~ g^2 small, eps 1e-8 damps the step and 1e-30 does not: a gradient of 1e-5 moves a weight
    by lr / sqrt(1 + 1e-8 / 1e-10) ~ lr / 10 with 1e-8 but by ~ lr with 1e-30; large gradients are alike."""
    steps = {}
    for eps in (1e-8, 1e-30):
        v = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        d, positions = sparse_param(2, (2, 2), seed=1)
        d0 = d.detach().clone()
        opt = SM3([v, d], lr=1.0, eps=eps, positions=positions)
        v.grad = torch.tensor([1e-5, 1.0], dtype=torch.float64)
        d.grad = torch.tensor([1e-5, 1.0], dtype=torch.float64)
        opt.step()
        steps[eps] = (-v.detach(), d0 - d.detach())
    for part in range(2):  # the dense vector, then the sparse delta
        tiny8, big8 = steps[1e-8][part].tolist()
        tiny30, big30 = steps[1e-30][part].tolist()
        assert tiny8 == pytest.approx(1e-5 / math.sqrt(1e-10 + 1e-8), rel=1e-12)  # ~0.0995
        assert tiny30 == pytest.approx(1.0, rel=1e-12)
        assert tiny30 > 9 * tiny8
        assert big8 == pytest.approx(big30, rel=1e-7)


# -----------------------------------------------------------------------------
# the 0/0 rule

@pytest.mark.parametrize("eps", [0.0, 1e-30, 1e-8])
def test_zero_grad_gives_zero_update(eps):
    """entries whose nu is 0 (never a nonzero gradient in their covers) do not move, even with eps = 0;
    the others follow Adagrad-like steps."""
    w = torch.nn.Parameter(torch.ones(3, 4))
    v, positions = sparse_param(6, (3, 4), dtype=torch.float32)
    v0 = v.detach().clone()
    opt = SM3([w, v], lr=0.5, eps=eps, positions=positions)
    w.grad = torch.zeros(3, 4)
    w.grad[0, 0] = 1.0  # row 0 and col 0 get a positive accumulator, the rest stay 0
    v.grad = torch.zeros(6)
    v.grad[0] = 2.0
    for _ in range(2):
        opt.step()
        assert torch.isfinite(w).all() and torch.isfinite(v).all()
    expected = torch.ones(3, 4)
    expected[0, 0] = 1.0 - 0.5 * (1 / math.sqrt(1 + eps) + 1 / math.sqrt(2 + eps))  # 1/sqrt(1), then 1/sqrt(2)
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(v.detach()[1:], v0[1:])
    assert v[0].item() < v0[0].item()


def test_bad_hyperparameters_are_refused():
    """negative lr / eps / weight decay and momentum outside [0, 1) are errors."""
    p = torch.nn.Parameter(torch.zeros(2))
    for bad in (dict(lr=-1.0), dict(eps=-1e-8), dict(weight_decay=-0.1), dict(momentum=1.0), dict(momentum=-0.1)):
        with pytest.raises(ValueError):
            SM3([p], **bad)


# -----------------------------------------------------------------------------
# state_dict round trip

def _clone_params(params, positions):
    """fresh params with the same values, and a positions map with cloned indices for the sparse ones."""
    out, pos = [], {}
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p in positions:
            idx, shape = positions[p]
            pos[q] = (idx.clone(), shape)
        out.append(q)
    return out, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    """a saved and reloaded (weights_only) SM3 continues exactly as the original; the state stays fp32 for
    bf16 params, holds no step counter, and a param that never had a gradient has no state."""
    gen = torch.Generator().manual_seed(4)
    sparse, positions = sparse_param(6, (4, 5), dtype=dtype, seed=5)
    a = [torch.nn.Parameter(torch.randn(3, 4, generator=gen).to(dtype)),
         torch.nn.Parameter(torch.randn(5, generator=gen).to(dtype)),
         sparse,
         torch.nn.Parameter(torch.randn(2, generator=gen).to(dtype))]  # never gets a grad
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    opt_a = SM3(a, positions=positions, **kw)
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in a[:3]] for _ in range(5)]
    for gs in grads[:3]:
        for p, g in zip(a, gs):
            p.grad = g
        opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    b, positions_b = _clone_params(a, positions)
    opt_b = SM3(b, lr=1.0, positions=positions_b)  # hyperparameters come from the state dict
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["lr"] == 0.05 and opt_b.param_groups[0]["eps"] == 1e-8
    st = opt_b.state[b[0]]
    assert set(st) == {"acc_0", "acc_1", "momentum_buffer"}
    assert set(opt_b.state[b[2]]) == {"row", "col", "momentum_buffer"}
    assert b[3] not in opt_b.state
    for pa, pb in zip(a, b):
        for k, v in opt_a.state.get(pa, {}).items():
            if torch.is_tensor(v):
                assert v.dtype == torch.float32 and opt_b.state[pb][k].dtype == torch.float32
                assert torch.equal(v, opt_b.state[pb][k]), k
    for gs in grads[3:]:
        for pa, pb, g in zip(a, b, gs):
            pa.grad, pb.grad = g, g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        assert pa.dtype == dtype and torch.equal(pa, pb)


# -----------------------------------------------------------------------------
# the row and column accumulators of a sparse delta (what SpIEL-MA grows from)

def test_sparse_row_col_accumulators():
    """no state before the first step (accumulators(p), what SpIEL-MA reads, gives zeros of the right shapes);
    after it, state["row"] (out,) and state["col"] (in,) are fp32 and hold the max of g^2 over the active
    entries of each row / column (0 where none is active), and accumulators(p) returns them. Only the momentum
    has one entry per delta (per_slot: what drop-and-grow moves with the slots)."""
    assert SM3.per_slot == ("momentum_buffer",)
    p, positions = sparse_param(4, (3, 5), dtype=torch.float32)
    indices = positions[p][0]
    opt = SM3([p], lr=0.1, positions=positions)
    assert p not in opt.state
    row0, col0 = opt.accumulators(p)
    assert torch.equal(row0, torch.zeros(3)) and torch.equal(col0, torch.zeros(5))
    p.grad = torch.tensor([1.0, -2.0, 3.0, 0.5])
    opt.step()
    row, col = opt.state[p]["row"], opt.state[p]["col"]
    assert row.shape == (3,) and col.shape == (5,) and row.dtype == torch.float32
    rows, cols = indices // 5, indices % 5
    exp_row, exp_col = torch.zeros(3), torch.zeros(5)
    for r, c, g in zip(rows.tolist(), cols.tolist(), p.grad.tolist()):
        exp_row[r] = max(exp_row[r].item(), g * g)  # first step: nu = g^2
        exp_col[c] = max(exp_col[c].item(), g * g)
    torch.testing.assert_close(row, exp_row)
    torch.testing.assert_close(col, exp_col)
    assert all(a is b for a, b in zip(opt.accumulators(p), (row, col)))


# -----------------------------------------------------------------------------
# smoke test

def test_lowers_least_squares_loss():
    """SM3 with momentum fits a small least-squares problem; a param without gradient is left alone."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(64, 8, generator=gen)
    y = x @ torch.randn(8, 3, generator=gen) + 0.5
    w = torch.nn.Parameter(torch.zeros(8, 3))
    b = torch.nn.Parameter(torch.zeros(3))
    unused = torch.nn.Parameter(torch.ones(2))
    opt = SM3([w, b, unused], lr=0.1, momentum=0.5)
    losses = []
    for _ in range(100):
        loss = ((x @ w + b - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    assert torch.equal(unused, torch.ones(2)) and unused not in opt.state
