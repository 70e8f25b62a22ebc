"""
SM3: a memory-efficient adaptive optimizer, written out by hand.

Anil, Gupta, Koren, Singer, "Memory-Efficient Adaptive Optimization", arXiv 1901.11150, the SM3-II rule
(section 3, algorithm 2): every entry belongs to a few cover sets (the rows and the columns of a matrix,
the slices of a tensor), each cover set keeps one accumulator, and an entry's Adagrad denominator is the
smallest accumulator of the sets that hold it:
    nu(i) = min over covers r containing i of mu(r) + g(i)^2,   update = g(i) / sqrt(nu(i) + eps),
    mu(r) = max over i in r of nu(i).
eps sits inside the square root and defaults to 1e-8, as in the SpIEL authors' SM3 (the SM3 paper's own
code uses 1e-30); the paper's SpIEL-MA learning rates assume it.

SpIEL-MA (Ansell et al. 2024, arXiv 2401.16405, section 3.3) trains its sparse deltas with SM3: the k
values of a delta on an (out, in) matrix keep a row accumulator (out,) and a column accumulator (in,),
and at reselection the score of an inactive position (i, j) is row[i] * col[j] (spiel.ma_candidates).
Such a parameter is given with its positions: SM3(values, positions={values: (indices, (out, in))}).
All optimizer state is fp32 (fp64 for fp64 params), whatever the parameter dtype.
"""

import torch


class SM3(torch.optim.Optimizer):
    # the state with one entry per element of a parameter: for a sparse delta, one per delta, which spiel.py moves
    # with its delta and zeroes where a delta grows (the row and column accumulators stay where they are)
    per_slot = ("momentum_buffer",)

    def __init__(self, params, lr=1e-3, momentum=0.0, eps=1e-8, weight_decay=0.0, positions=None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"bad SM3 hyperparameters: {lr=} {momentum=} {eps=} {weight_decay=}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay))
        # sparse deltas: values param -> (its flat positions (k,), updated in place by drop-and-grow, and (out, in))
        self.positions = positions or {}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, beta, eps, wd = group["lr"], group["momentum"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue  # no gradient, no state
                state = self.state[p]
                g = p.grad.to(torch.promote_types(p.dtype, torch.float32))
                nu = self.sparse_nu(p, g, state) if p in self.positions else self.dense_nu(g.view(p.shape or (1,)),
                                                                                           state)
                # the preconditioned gradient, with 0/0 as 0 (nu >= g^2, so nu == 0 means g == 0)
                u = torch.where(nu > 0, g.view_as(nu) * (nu + eps).rsqrt(), 0.0).view(p.shape)
                if beta > 0:  # m = beta m + (1 - beta) u, per element (spiel.py zeroes grown slots)
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(u)
                    u = state["momentum_buffer"].mul_(beta).add_(u, alpha=1 - beta)
                if wd == 0 and p.dtype == u.dtype:  # (the same numbers as below, without the decay's passes)
                    p.sub_(lr * u)
                    continue
                w = p.to(u.dtype)  # decoupled weight decay on the pre-step weights; one rounding
                p.copy_(w - lr * wd * w - lr * u)

    @staticmethod
    def dense_nu(g, state):
        """a dense param of rank r: one accumulator per dim d, (size_d,), entry j covering the slice i[d] == j."""
        r = g.dim()
        if "acc_0" not in state:
            state.update({f"acc_{d}": g.new_zeros(g.shape[d]) for d in range(r)})
        nu = None  # min over d of acc_d broadcast along d, + g^2: (*g.shape)
        for d in range(r):
            acc = state[f"acc_{d}"].view([-1 if e == d else 1 for e in range(r)])
            nu = acc if nu is None else torch.minimum(nu, acc)
        nu = nu + g * g
        for d in range(r):  # every slice is seen each step: the new max is the accumulator (a vector: Adagrad)
            others = [e for e in range(r) if e != d]
            state[f"acc_{d}"] = nu.amax(dim=others) if others else nu.clone()
        return nu

    def sparse_nu(self, p, g, state):
        """the k values of a sparse delta: cover sets are the rows and columns of their positions."""
        indices, (n_out, n_in) = self.positions[p]
        r = torch.div(indices, n_in, rounding_mode="floor")  # (k,), read now: drop-and-grow rewrites them in place
        rows, cols = r.long(), (indices - r * n_in).long()
        if "row" not in state:
            state["row"], state["col"] = g.new_zeros(n_out), g.new_zeros(n_in)  # (out,), (in,)
        nu = torch.minimum(state["row"][rows], state["col"][cols]) + g * g  # (k,)
        # only active entries are seen, most of a row is not visited in a step: keep max(old, new)
        state["row"].scatter_reduce_(0, rows, nu, "amax", include_self=True)
        state["col"].scatter_reduce_(0, cols, nu, "amax", include_self=True)
        return nu

    def accumulators(self, p) -> tuple:
        """(row (out,), col (in,)): the accumulators of the sparse delta whose values are `p`, from which SpIEL-MA
        scores an inactive position (i, j) as row[i] * col[j]. Zeros before its first step."""
        _, (n_out, n_in) = self.positions[p]
        st = self.state[p]
        if "row" not in st:
            return torch.zeros(n_out, device=p.device), torch.zeros(n_in, device=p.device)
        return st["row"], st["col"]

    def load_state_dict(self, state_dict):
        # torch casts loaded state to the param dtype (bf16 params would get bf16 accumulators): keep fp32
        super().load_state_dict(state_dict)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(saved, [p for g in self.param_groups for p in g["params"]]):
            for k, v in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(v) and v.is_floating_point():
                    self.state[p][k] = v.to(p.device, torch.promote_types(p.dtype, torch.float32), copy=True)
