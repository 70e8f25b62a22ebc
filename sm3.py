"""
SM3: a memory-efficient adaptive optimizer, written out by hand.

Anil, Gupta, Koren, Singer, "Memory-Efficient Adaptive Optimization", arXiv 1901.11150. We implement
the SM3-II rule (Section 3, Algorithm 2): every entry belongs to a few "cover sets" (the
rows and columns of a matrix, the slices of a tensor), each cover set keeps one accumulator, and an
entry's Adagrad denominator is the smallest accumulator of the sets that hold it.

SpIEL (Ansell et al. 2024, arXiv 2401.16405) trains its sparse deltas with SM3 in the SpIEL-MA
variant: a delta matrix of shape (out, in) keeps only a row accumulator (out,) and a column
accumulator (in,), and at reselection the score of an inactive position (i, j) is row[i] * col[j].
`sm3_row_col` hands those two vectors to the growth code in spiel.py.

All optimizer state is kept in fp32 (fp64 for fp64 params), whatever the parameter dtype.
"""

import torch


def _state_dtype(p):
    # fp32 at least: bf16/fp16 params get fp32 state, fp64 params keep fp64 (handy for exact tests)
    return torch.promote_types(p.dtype, torch.float32)


def _precondition(g, nu, eps):
    # update = g / sqrt(nu + eps), with 0/0 treated as 0: nu >= g^2, so nu == 0 means g == 0
    return torch.where(nu > 0, g * (nu + eps).rsqrt(), torch.zeros_like(g))


def sm3_row_col(optimizer, p):
    """The live (row (out,), col (in,)) accumulators of a sparse delta; zeros before its 1st step."""
    state = optimizer.state.get(p, {})
    if "row" in state:
        return state["row"], state["col"]
    n_out, n_in = p.sparse_delta.weight_shape
    return (torch.zeros(n_out, dtype=_state_dtype(p), device=p.device),
            torch.zeros(n_in, dtype=_state_dtype(p), device=p.device))


class SM3(torch.optim.Optimizer):

    def __init__(self, params, lr=1e-3, momentum=0.0, eps=1e-30, weight_decay=0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"bad SM3 hyperparameters: {lr=} {momentum=} {eps=} {weight_decay=}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, eps, wd = group["lr"], group["momentum"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue  # params without a gradient are skipped (no state is created)
                if p.grad.is_sparse:
                    raise RuntimeError("SM3 takes dense gradients; sparse deltas use p.sparse_delta")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                g = p.grad.to(_state_dtype(p))
                if hasattr(p, "sparse_delta"):
                    u = self._sparse_update(p, g, state, eps)
                else:
                    u = self._dense_update(p, g, state, eps)
                if beta > 0:
                    # m = beta * m + (1 - beta) * update, per element; spiel.py zeroes grown slots
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(u)
                    u = state["momentum_buffer"].mul_(beta).add_(u, alpha=1 - beta)
                # decoupled weight decay on the pre-step weights, then the step, in fp32, one rounding:
                # p <- p - lr * wd * p - lr * (m or update)
                w = p.to(u.dtype)
                p.copy_(w - lr * wd * w - lr * u)
        return loss

    def _dense_update(self, p, g, state, eps):
        # a dense param of rank r (a 0-d scalar counts as shape (1,)): one accumulator per dim d,
        # acc_d of shape (size_d,), whose entry j covers the slice {i : i[d] == j}
        g = g.reshape(p.shape or (1,))
        r = g.dim()
        if "acc_0" not in state:
            for d in range(r):
                state[f"acc_{d}"] = torch.zeros(g.shape[d], dtype=g.dtype, device=g.device)
        # nu = min over d of acc_d broadcast along d, + g^2                   # (*p.shape)
        nu = None
        for d in range(r):
            acc = state[f"acc_{d}"].view([-1 if e == d else 1 for e in range(r)])
            nu = acc if nu is None else torch.minimum(nu, acc)
        nu = nu + g * g
        # SM3-II for dense params: acc_d = max of nu over all other dims, no max with the old value
        # (every slice is visited each step, and the new max is never smaller than the old one).
        # a rank-1 param thus gets plain Adagrad.
        for d in range(r):
            others = [e for e in range(r) if e != d]
            state[f"acc_{d}"] = nu.amax(dim=others) if others else nu.clone()
        return _precondition(g, nu, eps).view(p.shape)

    def _sparse_update(self, p, g, state, eps):
        # a SpIEL sparse delta: p is the (k,) `values`, its layer holds k unique flat row-major
        # positions into an (out, in) matrix. drop/grow rewrites indices in place, so read them now.
        layer = p.sparse_delta
        n_out, n_in = layer.weight_shape
        idx = layer.indices.long()                                              # (k,)
        assert idx.shape == p.shape, f"indices {tuple(idx.shape)} vs values {tuple(p.shape)}"
        rows, cols = idx // n_in, idx % n_in                                    # (k,), (k,)
        if "row" not in state:
            state["row"] = torch.zeros(n_out, dtype=g.dtype, device=g.device)  # (out,)
            state["col"] = torch.zeros(n_in, dtype=g.dtype, device=g.device)   # (in,)
        row, col = state["row"], state["col"]
        nu = torch.minimum(row[rows], col[cols]) + g * g                        # (k,)
        # only active entries are seen, so most of a row is not visited in a step: keep
        # max(old, new) here, i.e. row[i] = max(row[i], max of nu over active (i, j)), col likewise
        row.scatter_reduce_(0, rows, nu, "amax", include_self=True)
        col.scatter_reduce_(0, cols, nu, "amax", include_self=True)
        return _precondition(g, nu, eps)

    def load_state_dict(self, state_dict):
        # torch casts loaded state to the param dtype (fp32 accumulators would become bf16 for bf16
        # params); copy the saved tensors back in at full precision
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for k, v in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(v) and v.is_floating_point():
                    self.state[p][k] = v.to(device=p.device, dtype=_state_dtype(p), copy=True)
