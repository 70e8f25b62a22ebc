"""
Tests for sm3.py: the vectorised SM3-II against a naive per-element reference with explicit cover
sets, the 0/0 rule, state_dict round trips, sm3_row_col, and a least-squares smoke test.
"""

import io
import itertools
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sm3 import SM3, sm3_row_col  # noqa: E402


class FakeLayer:
    """Just what SM3 reads from a SpIEL layer: flat row-major indices into an (out, in) matrix."""

    def __init__(self, indices, weight_shape):
        self.indices = indices
        self.weight_shape = weight_shape


def sparse_param(k, weight_shape, dtype=torch.float64, index_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = weight_shape[0] * weight_shape[1]
    indices = torch.randperm(n, generator=gen)[:k].to(index_dtype)
    p = torch.nn.Parameter(torch.randn(k, generator=gen, dtype=dtype))
    p.sparse_delta = FakeLayer(indices, weight_shape)
    return p


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
def test_dense_matches_reference(shape, momentum, wd):
    gen = torch.Generator().manual_seed(1)
    lr, eps = 0.1, 1e-30
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
    opt = SM3([p], lr=lr, momentum=momentum, eps=eps, weight_decay=wd)
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
    assert opt.state[p]["step"] == 4


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.1)])
def test_sparse_matches_reference(index_dtype, momentum, wd):
    gen = torch.Generator().manual_seed(2)
    lr, eps, (n_out, n_in), k = 0.1, 1e-30, (4, 5), 7
    p = sparse_param(k, (n_out, n_in), index_dtype=index_dtype, seed=3)
    layer = p.sparse_delta
    opt = SM3([p], lr=lr, momentum=momentum, eps=eps, weight_decay=wd)
    rows = [{(i, j) for j in range(n_in)} for i in range(n_out)]
    cols = [{(i, j) for i in range(n_out)} for j in range(n_in)]
    covers = rows + cols
    # the reference is keyed by slot s, so that a slot's momentum follows it across index changes
    ref = {"w": {s: p[s].item() for s in range(k)}, "m": {}, "mu": [0.0] * len(covers)}
    for t in range(5):
        p.grad = random_grad((k,), gen, t)
        opt.step()
        pos = {s: divmod(int(layer.indices[s]), n_in) for s in range(k)}
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
                if x not in layer.indices.tolist()]
        layer.indices[[0, 3, 5]] = torch.tensor(free[:3], dtype=index_dtype)
    row, col = sm3_row_col(opt, p)
    torch.testing.assert_close(torch.cat([row, col]), torch.tensor(ref["mu"], dtype=torch.float64))


# -----------------------------------------------------------------------------
# the 0/0 rule

@pytest.mark.parametrize("eps", [0.0, 1e-30])
def test_zero_grad_gives_zero_update(eps):
    w = torch.nn.Parameter(torch.ones(3, 4))
    v = sparse_param(6, (3, 4), dtype=torch.float32)
    v0 = v.detach().clone()
    opt = SM3([w, v], lr=0.5, eps=eps)
    w.grad = torch.zeros(3, 4)
    w.grad[0, 0] = 1.0  # row 0 and col 0 get a positive accumulator, the rest stay 0
    v.grad = torch.zeros(6)
    v.grad[0] = 2.0
    for _ in range(2):
        opt.step()
        assert torch.isfinite(w).all() and torch.isfinite(v).all()
    expected = torch.ones(3, 4)
    expected[0, 0] = 1.0 - 0.5 * (1.0 + 2 ** -0.5)  # Adagrad-like: 1/sqrt(1), then 1/sqrt(2)
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(v.detach()[1:], v0[1:])
    assert v[0].item() < v0[0].item()


# -----------------------------------------------------------------------------
# state_dict round trip

def _clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if hasattr(p, "sparse_delta"):
            layer = p.sparse_delta
            q.sparse_delta = FakeLayer(layer.indices.clone(), layer.weight_shape)
        out.append(q)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    gen = torch.Generator().manual_seed(4)
    a = [torch.nn.Parameter(torch.randn(3, 4, generator=gen).to(dtype)),
         torch.nn.Parameter(torch.randn(5, generator=gen).to(dtype)),
         sparse_param(6, (4, 5), dtype=dtype, seed=5),
         torch.nn.Parameter(torch.randn(2, generator=gen).to(dtype))]  # never gets a grad
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    opt_a = SM3(a, **kw)
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in a[:3]] for _ in range(5)]
    for gs in grads[:3]:
        for p, g in zip(a, gs):
            p.grad = g
        opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    b = _clone_params(a)
    opt_b = SM3(b, lr=1.0)  # hyperparameters come from the state dict
    opt_b.load_state_dict(sd)
    st = opt_b.state[b[0]]
    assert set(st) == {"step", "acc_0", "acc_1", "momentum_buffer"}
    assert set(opt_b.state[b[2]]) == {"step", "row", "col", "momentum_buffer"}
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
# sm3_row_col

def test_sm3_row_col():
    p = sparse_param(4, (3, 5), dtype=torch.float32)
    opt = SM3([p], lr=0.1)
    row, col = sm3_row_col(opt, p)
    assert row.shape == (3,) and col.shape == (5,) and row.dtype == torch.float32
    assert not row.any() and not col.any()
    assert p not in opt.state  # asking must not create state
    p.grad = torch.tensor([1.0, -2.0, 3.0, 0.5])
    opt.step()
    row, col = sm3_row_col(opt, p)
    assert row is opt.state[p]["row"] and col is opt.state[p]["col"]
    rows, cols = p.sparse_delta.indices // 5, p.sparse_delta.indices % 5
    exp_row, exp_col = torch.zeros(3), torch.zeros(5)
    for r, c, g in zip(rows.tolist(), cols.tolist(), p.grad.tolist()):
        exp_row[r] = max(exp_row[r].item(), g * g)  # first step: nu = g^2
        exp_col[c] = max(exp_col[c].item(), g * g)
    torch.testing.assert_close(row, exp_row)
    torch.testing.assert_close(col, exp_col)


# -----------------------------------------------------------------------------
# smoke test

def test_lowers_least_squares_loss():
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
