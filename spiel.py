"""
SpIEL: sparse fine-tuning with a fixed budget of trainable deltas whose positions move during training.
Ansell, Vulić, Sterz, Korhonen, Ponti 2024, "Scaling Sparse Fine-Tuning to Large Language Models",
arXiv 2401.16405, section 3 (the update / drop / grow cycle, SpIEL-AG and SpIEL-MA).

Each targeted weight W0 (out, in) of the frozen base gets `indices` (k flat row-major positions) and
`values` (k trainable fp32 numbers): W = W0 + scatter(indices, values). Every `interval` optimizer steps,
the deltas of smallest |value| are dropped and as many new positions are grown, chosen by
- SpIEL-AG: accumulated gradients of k candidate positions over a short window (optimizer: AdamW), or
- SpIEL-MA: the outer product of SM3's row and column accumulators (optimizer: SM3, sm3.py).
../shared/notes/spiel-algorithm.md states the method and the decisions this file takes.
"""

import hashlib
import json
import math
import os
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama import PROJECTIONS, CheckpointError

# -----------------------------------------------------------------------------
# the sparse-delta linear layer


def dense_weight(base: nn.Module, dtype) -> torch.Tensor:
    """the frozen base weight (out, in) as a fresh or borrowed tensor; a quantized base dequantizes."""
    return base.dequantize(dtype) if hasattr(base, "dequantize") else base.weight.to(dtype)


class SparseDeltaFn(torch.autograd.Function):
    """y = x (W0 + scatter(indices, values))^T. W0 gets no gradient; d(values) = (dy^T x)[indices].

    The merged weight is built transiently in forward and again in backward (never saved), and the
    dense weight gradient of this layer lives only inside its backward.
    """

    @staticmethod
    def forward(ctx, x, values, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, values)
        bias = getattr(layer.base, "bias", None)  # frozen, not an input of this Function: it gets no gradient
        return F.linear(x, layer.merged_weight(x.dtype, values), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        layer = ctx.layer
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx = dy @ layer.merged_weight(dy.dtype, values)  # (..., in)
        if ctx.needs_input_grad[1]:
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, out), (N, in)
            if layer.window is None and choose_grad_path(layer, dy2, x2) == "sparse":
                dvalues = sampled_grad(layer, dy2, x2)  # only the k active entries are computed
            else:
                g = dy2.T @ x2  # dense dW: (out, in), transient
                if layer.window is not None:  # SpIEL-AG: an accumulation window is open
                    accumulate_window(layer.window, g, layer.indices.numel())
                dvalues = g.view(-1)[layer.indices]  # (k,)
            dvalues = dvalues.to(values.dtype)
        return dx, dvalues, None


# -----------------------------------------------------------------------------
# the gradient of the values: dense dW then gather, or a sampled dense-dense matmul (SDDMM)


def row_pointers(layer):
    """CSR row pointers (out + 1,) of the active positions and whether the slots are in position order,
    cached until the indices change (drop/grow writes them in place, which bumps their version). Small:
    out + 1 integers per matrix."""
    key = (layer.indices.data_ptr(), layer.indices._version)
    if layer._rows is None or layer._rows[0] != key:
        idx = layer.indices.long()
        in_order = bool((idx[1:] > idx[:-1]).all())  # kept so by sort_slots; a hand edit may break it
        crow = torch.zeros(layer.weight_shape[0] + 1, dtype=torch.long, device=idx.device)
        crow[1:] = torch.bincount(idx // layer.weight_shape[1], minlength=layer.weight_shape[0]).cumsum(0)
        layer._rows = (key, crow, in_order)
    return layer._rows[1:]


def sampled_grad(layer, dy, x):
    """d(values) = (dy^T x) at the active (row, col) only: each entry is dy[:, row] . x[:, col] over the N
    tokens, k * N multiply-adds instead of out * in * N (torch.sparse.sampled_addmm). dy (N, out), x (N, in)."""
    if dy.dtype not in (torch.float32, torch.float64):  # no half-precision SDDMM kernel: compute it in fp32
        dy, x = dy.float(), x.float()
    crow, in_order = row_pointers(layer)
    idx = layer.indices.long()
    order = None if in_order else idx.argsort()
    if order is not None:
        idx = idx[order]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it works as used here
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, idx % layer.weight_shape[1], torch.zeros(idx.numel(), dtype=dy.dtype,
                                          device=dy.device), layer.weight_shape, check_invariants=False)
    # row-contiguous dy^T (out, N) and column-contiguous x (N, in): each dot product reads contiguous memory
    g = torch.sparse.sampled_addmm(pattern, dy.T.contiguous(), x.T.contiguous().T, beta=0.0).values()  # (k,)
    if order is not None:
        g = torch.empty_like(g).index_copy_(0, order, g)  # back to slot order
    return g


# "auto" takes the sparse path below this density. Each sampled entry costs about as much as SPARSE_COST dense
# multiply-adds, so sparse wins when density < 1 / SPARSE_COST. Measured with bench.py (docs/bench.md); a fixed
# rule rather than a per-run timing, so a run (and its resume) is deterministic. On CUDA it is unmeasured
# here: auto keeps the authors' dense path there; force --grad-path sparse to try the other.
SPARSE_DENSITY_MAX = {"cpu": 0.08, "cuda": 0.0}


def choose_grad_path(layer, dy, x) -> str:
    """"dense" or "sparse" for this layer's value gradient: forced by layer.grad_path, or (auto) by density."""
    if layer.grad_path != "auto":
        return layer.grad_path
    density = layer.indices.numel() / (layer.weight_shape[0] * layer.weight_shape[1])
    return "sparse" if density < SPARSE_DENSITY_MAX.get(dy.device.type, 0.0) else "dense"


def set_grad_path(model: nn.Module, path: str):
    """force the value-gradient path of every sparse-delta layer: "auto", "dense" or "sparse". AG windows
    always use the dense gradient (they need the candidates' gradients too)."""
    if path not in ("auto", "dense", "sparse"):
        raise ValueError(f"unknown gradient path {path!r}: use auto, dense or sparse")
    for layer in delta_layers(model).values():
        layer.grad_path = path


class SparseDeltaLinear(nn.Module):
    """a frozen base linear (nn.Linear or a quantized one) plus k trainable deltas at flat positions."""

    def __init__(self, base: nn.Module, k: int, generator: Optional[torch.Generator] = None,
                 indices: Optional[torch.Tensor] = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        out_f, in_f = self.weight_shape = matrix_shape(base)
        n = out_f * in_f
        if not 0 < k <= n:
            raise ValueError(f"cannot place {k} deltas in a {out_f}x{in_f} matrix")
        device = next(base.buffers()).device if hasattr(base, "dequantize") else base.weight.device
        # initial positions: uniform without replacement (unless given); initial values: 0, so W = W0
        init = random_positions(n, k, generator) if indices is None else indices
        self.register_buffer("indices", init.to(device=device, dtype=torch.int32 if n < 2**31 else torch.int64))
        self.values = nn.Parameter(torch.zeros(k, device=device))  # (k,) fp32
        self.values.sparse_delta = self  # sm3.py finds the rows/cols of each value through this
        self.window = None  # open SpIEL-AG accumulation window (dict of tensors) or None
        self.merged = False
        self.grad_path = "auto"  # how d(values) is computed: "dense", "sparse" or "auto" (see choose_grad_path)
        self._rows = None  # cached CSR row pointers for the sparse path (see row_pointers)

    def merged_weight(self, dtype, values=None) -> torch.Tensor:
        """W0 + scatter(indices, values) in `dtype`, a transient (out, in) tensor."""
        w = dense_weight(self.base, dtype)
        w = w.clone() if not hasattr(self.base, "dequantize") else w  # never write into the base
        values = self.values if values is None else values
        return w.view(-1).index_add_(0, self.indices, values.to(dtype)).view(self.weight_shape)

    def forward(self, x):
        if self.merged:
            return self.base(x)
        return SparseDeltaFn.apply(x, self.values, self)

    def extra_repr(self):
        out_f, in_f = self.weight_shape
        return f"{out_f}x{in_f}, k={self.indices.numel()} ({self.indices.numel() / (out_f * in_f):.2%})"


def random_positions(n: int, k: int, generator=None) -> torch.Tensor:
    """k distinct positions in [0, n), uniformly, sorted. For k << n draw with replacement, deduplicate and
    keep a random k of the distinct ones (a randperm of a 45M-entry 7B matrix would cost a second each)."""
    if 4 * k > n:
        return torch.randperm(n, generator=generator)[:k].sort().values
    while True:
        draw = torch.unique(torch.randint(n, (k + k // 8 + 64,), generator=generator))
        if draw.numel() >= k:
            return draw[torch.randperm(draw.numel(), generator=generator)[:k]].sort().values


def delta_layers(model: nn.Module) -> dict:
    """name -> SparseDeltaLinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


# -----------------------------------------------------------------------------
# putting deltas into a model: the budget


def target_linears(model: nn.Module, targets=PROJECTIONS) -> dict:
    """name -> linear (full precision or quantized) whose attribute name is one of `targets`."""
    found = {}
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in targets and (isinstance(m, nn.Linear) or hasattr(m, "dequantize")):
            found[name] = m
    return found


def lora_param_count(model: nn.Module, rank: int, targets=PROJECTIONS) -> int:
    """how many parameters LoRA of this rank trains on the targets: rank * (in + out) per matrix."""
    sizes = [matrix_shape(m) for m in target_linears(model, targets).values()]
    return sum(rank * (o + i) for o, i in sizes)


def matrix_shape(m) -> tuple:
    """(out, in) of a linear layer, full precision or quantized."""
    return tuple(m.weight_shape) if hasattr(m, "weight_shape") else tuple(m.weight.shape)


def split_budget(sizes: list, total: int) -> list:
    """split `total` deltas across matrices in proportion to their sizes (largest remainder, exact sum)."""
    n = sum(sizes)
    raw = [total * s / n for s in sizes]
    ks = [int(r) for r in raw]
    for i in sorted(range(len(sizes)), key=lambda i: raw[i] - ks[i], reverse=True)[:total - sum(ks)]:
        ks[i] += 1
    if total < len(sizes):
        raise ValueError(f"a budget of {total} deltas cannot give each of {len(sizes)} matrices one")
    ks = [min(max(k, 1), s) for k, s in zip(ks, sizes)]
    while sum(ks) > total:  # the floor of 1 per matrix overshot a small budget: trim the largest shares
        ks[max(range(len(ks)), key=ks.__getitem__)] -= 1
    return ks


def add_sparse_deltas(model: nn.Module, density: Optional[float] = None, num_tunable: Optional[int] = None,
                      lora_rank: Optional[int] = None, targets=PROJECTIONS, seed: int = 0, verbose=True) -> dict:
    """Freeze the model and swap each targeted linear for a SparseDeltaLinear.

    The budget is exactly one of: a density (fraction of the targeted weights), an absolute count, or
    "as many as LoRA of rank r would train". Returns name -> layer.
    """
    if sum(x is not None for x in (density, num_tunable, lora_rank)) != 1:
        raise ValueError("give exactly one of density, num_tunable, lora_rank")
    for p in model.parameters():
        p.requires_grad_(False)
    linears = target_linears(model, targets)
    if not linears:
        raise ValueError(f"no linear layer named one of {targets} in the model")
    sizes = [matrix_shape(m)[0] * matrix_shape(m)[1] for m in linears.values()]
    if density is not None:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        total = round(density * sum(sizes))
    else:
        total = num_tunable if num_tunable is not None else lora_param_count(model, lora_rank, targets)
    if not 0 < total <= sum(sizes):
        raise ValueError(f"a budget of {total} deltas does not fit {sum(sizes)} targeted weights")
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for (name, base), k in zip(linears.items(), split_budget(sizes, total)):
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, SparseDeltaLinear(base, k, generator=g))
    layers = delta_layers(model)
    if verbose:
        print(budget_summary(model))
    return layers


def budget_summary(model: nn.Module) -> str:
    """trainable vs total parameters, and where the budget sits by projection type and by layer."""
    layers = delta_layers(model)
    k = sum(m.indices.numel() for m in layers.values())
    targeted = sum(m.weight_shape[0] * m.weight_shape[1] for m in layers.values())
    total = sum(_numel_base(m) for m in model.modules() if not list(m.children()) or hasattr(m, "dequantize"))
    by_proj, by_layer = {}, {}
    for name, m in layers.items():
        proj, block = name.rpartition(".")[2], name.split(".")[1] if name.startswith("layers.") else "-"
        by_proj[proj] = by_proj.get(proj, 0) + m.indices.numel()
        by_layer[block] = by_layer.get(block, 0) + m.indices.numel()
    lines = [f"sparse deltas: {k:,} trainable of {total:,} parameters ({k / total:.3%}); "
             f"density {k / targeted:.3%} of the {targeted:,} targeted weights in {len(layers)} matrices",
             "  by projection: " + ", ".join(f"{p} {n:,}" for p, n in by_proj.items())]
    if len(by_layer) > 1:
        lines.append("  by layer: " + ", ".join(f"{b}: {n:,}" for b, n in by_layer.items()))
    return "\n".join(lines)


def _numel_base(m):
    if isinstance(m, SparseDeltaLinear):
        return 0  # counted through its base
    if hasattr(m, "weight_shape"):
        return m.weight_shape[0] * m.weight_shape[1]
    return sum(p.numel() for p in m.parameters(recurse=False))


# -----------------------------------------------------------------------------
# the schedule (counted in optimizer steps t = 1..T)


class Schedule:
    """when to reselect, what fraction to replace, and (SpIEL-AG) when the accumulation window is open.

    First reselection at t = first (replaces all k), then every `interval` steps a fraction
    rho0 * (1 - t/T) (linear) or rho0 * (1 + cos(pi t/T)) / 2 (cosine). The AG window holds the backward
    passes of steps 1..first, then of steps r - first .. r before each later reselection r.
    """

    def __init__(self, total_steps: int, interval: int = 20, first: int = 5, rho0: float = 0.2, decay: str = "linear"):
        if decay not in ("linear", "cosine"):
            raise ValueError(f"unknown decay {decay!r}: use linear or cosine")
        if not (interval > first >= 1):
            raise ValueError(f"need interval > first >= 1, got interval {interval}, first {first}")
        self.T, self.interval, self.first, self.rho0, self.decay = total_steps, interval, first, rho0, decay

    def is_reselection(self, t: int) -> bool:
        return t < self.T and (t == self.first or (t > self.first and (t - self.first) % self.interval == 0))

    def fraction(self, t: int) -> float:
        if t == self.first:
            return 1.0
        if self.decay == "linear":
            return self.rho0 * (1 - t / self.T)
        return self.rho0 * (1 + math.cos(math.pi * t / self.T)) / 2

    def window_open(self, t: int) -> bool:
        """is the backward pass of step t part of an accumulation window that ends in a reselection?"""
        if t <= self.first:
            return self.is_reselection(self.first)
        r = t + (-(t - self.first)) % self.interval  # next reselection at or after t
        return r - t <= self.first and self.is_reselection(r)


# -----------------------------------------------------------------------------
# SpIEL-AG: candidates and accumulated gradients


def accumulate_window(window: dict, g: torch.Tensor, k: int):
    """called from backward with the dense gradient g (out, in) of one micro-batch."""
    flat = g.view(-1)
    if window["candidates"] is None:  # first micro-batch of the window: the k largest |gradient|
        window["candidates"] = flat.abs().topk(k, sorted=False).indices  # (k,)
        window["grad_sum"] = torch.zeros(k, device=g.device)
        window["sq_sum"] = torch.zeros(k, device=g.device)
    gc = flat[window["candidates"]].float()  # accumulate in fp32
    window["grad_sum"] += gc
    window["sq_sum"] += gc * gc
    window["count"] += 1


def open_windows(layers: dict):
    for layer in layers.values():
        if layer.window is None:
            layer.window = {"candidates": None, "grad_sum": None, "sq_sum": None, "count": 0}


def close_windows(layers: dict):
    for layer in layers.values():
        layer.window = None


# -----------------------------------------------------------------------------
# drop and grow


def drop_and_grow(layer: SparseDeltaLinear, n: int, cand: torch.Tensor, score: torch.Tensor):
    """Drop the n smallest |values| and grow the n best-scoring eligible candidates (never a position that
    stays active). A dropped position that is grown again simply stays (value and optimizer state kept).
    If fewer than n candidates are eligible, fewer are dropped, so k stays constant.
    Returns (slots whose position changed (m,), the candidates' positions in `cand` grown there (m,)).
    """
    idx, k = layer.indices.long(), layer.indices.numel()
    order = layer.values.detach().abs().argsort(stable=True)  # slots, smallest |value| first
    n = min(n, k)
    while True:
        drop_slots, keep = order[:n], idx[order[n:]]  # keep: positions that stay active
        eligible = ~torch.isin(cand, keep)
        if int(eligible.sum()) >= n:
            break
        n = int(eligible.sum())  # too few candidates: drop fewer (which may make fewer eligible: repeat)
    if n == 0:
        return order[:0], cand[:0]
    s = score.masked_fill(~eligible, float("-inf"))
    grown = s.topk(n).indices  # positions in cand (n,)
    stays = torch.isin(cand[grown], idx[drop_slots])  # dropped and grown again: keeps its slot
    freed = drop_slots[~torch.isin(idx[drop_slots], cand[grown])]
    new = grown[~stays]
    layer.indices[freed] = cand[new].to(layer.indices.dtype)
    with torch.no_grad():
        layer.values[freed] = 0.0  # grown deltas start at 0
    return freed, new


def ma_candidates(layer: SparseDeltaLinear, n: int, row: torch.Tensor, col: torch.Tensor, chunk_elems: int = 2**24):
    """SpIEL-MA: the top n + k positions by row[i] * col[j], computed a block of rows at a time so the
    (out, in) outer product never exists whole. Returns (positions, scores); drop_and_grow filters out
    the positions that stay active (at most k of the best), so n eligible ones remain."""
    out_f, in_f = layer.weight_shape
    want = min(n + layer.indices.numel(), out_f * in_f)
    rows_per = max(1, chunk_elems // in_f)
    best_pos = torch.empty(0, dtype=torch.long, device=row.device)
    best_score = torch.empty(0, device=row.device)
    for r0 in range(0, out_f, rows_per):
        block = row[r0:r0 + rows_per, None] * col[None, :]  # (rows, in)
        s, p = block.view(-1).topk(min(want, block.numel()), sorted=False)
        best_score, sel = torch.cat([best_score, s]).topk(min(want, best_score.numel() + s.numel()), sorted=False)
        best_pos = torch.cat([best_pos, p + r0 * in_f])[sel]
    return best_pos, best_score


PER_SLOT_STATE = ("exp_avg", "exp_avg_sq", "age", "momentum_buffer")  # optimizer state with one entry per delta


def reset_optimizer_slots(optimizer, param, slots, seed: Optional[dict] = None):
    """fresh optimizer state for the grown slots of `param`: zeros, or (AG) the window's seed values."""
    state = optimizer.state.get(param, {})
    for key in PER_SLOT_STATE:
        if key in state:
            state[key][slots] = seed[key].to(state[key].dtype) if seed and key in seed else 0


@torch.no_grad()
def sort_slots(layer: SparseDeltaLinear, optimizer=None):
    """reorder the k slots so the indices ascend (row by row), moving values and per-element optimizer state
    along; the sparse gradient path reads the active entries in this order without an extra index array."""
    perm = layer.indices.argsort()
    layer.indices.copy_(layer.indices[perm])
    layer.values.copy_(layer.values[perm])
    state = optimizer.state.get(layer.values, {}) if optimizer is not None else {}
    for key in PER_SLOT_STATE:  # by name: SM3's row/col accumulators are per matrix row/column, not per slot
        if key in state:
            state[key].copy_(state[key][perm])


class Selector:
    """Runs the drop/grow schedule for every SparseDeltaLinear of a model (method "ag" or "ma")."""

    def __init__(self, model: nn.Module, method: str, schedule: Schedule, grad_accum: int = 1):
        if method not in ("ag", "ma"):
            raise ValueError(f"unknown SpIEL method {method!r}: use ag or ma")
        self.layers = delta_layers(model)
        self.method, self.schedule, self.grad_accum = method, schedule, grad_accum

    def begin_step(self, t: int):
        """SpIEL-AG: open the accumulation window if step t's backward passes belong to one."""
        if self.method == "ag" and self.schedule.window_open(t):
            open_windows(self.layers)

    @torch.no_grad()
    def reselect(self, t: int, optimizer) -> dict:
        """drop and regrow in every matrix; returns name -> number of positions that changed."""
        frac = self.schedule.fraction(t)
        changed = {}
        for name, layer in self.layers.items():
            n = int(layer.indices.numel() * frac)
            if self.method == "ag":
                w = layer.window
                if w is None or w["candidates"] is None:
                    raise RuntimeError(f"step {t}: {name} has no accumulated gradients (was the window open?)")
                cand, score = w["candidates"], w["grad_sum"].abs()
            else:
                from sm3 import sm3_row_col
                row, col = sm3_row_col(optimizer, layer.values)
                cand, score = ma_candidates(layer, n, row, col)
            slots, grown = drop_and_grow(layer, n, cand, score)
            betas = optimizer.param_groups[0]["betas"] if self.method == "ag" else None
            seed = self.ag_seed(layer.window, grown, betas) if self.method == "ag" else None
            reset_optimizer_slots(optimizer, layer.values, slots, seed)
            sort_slots(layer, optimizer)
            changed[name] = slots.numel()
        close_windows(self.layers)
        return changed

    def ag_seed(self, w: dict, grown: torch.Tensor, betas) -> dict:
        """Adam state of grown deltas from the window, such that bias correction at the seeded age returns the
        expected first and second moments of one optimizer step's gradient. A step's gradient G is the sum
        of grad_accum (GA) micro-batch gradients g (each already divided by the step's target tokens), so
        E[G] = GA m and E[G^2] = (GA m)^2 + GA Var(g), with m and Var(g) the window's per-micro-batch mean and
        variance. (Scaling each g^2 by GA^2 instead would overstate the variance GA-fold.)"""
        b1, b2 = betas
        ga, n = self.grad_accum, w["count"]
        age = n / ga  # optimizer steps' worth of samples
        m, s = w["grad_sum"][grown] / n, w["sq_sum"][grown] / n
        mean, mean_sq = ga * m, (ga * m) ** 2 + ga * (s - m * m).clamp_min(0)
        return {"exp_avg": mean * (1 - b1 ** age), "exp_avg_sq": mean_sq * (1 - b2 ** age),
                "age": torch.full_like(mean, age)}

    def state_dict(self) -> dict:
        """the open AG windows (plain tensors and ints: loadable with weights_only=True)."""
        return {name: dict(layer.window) for name, layer in self.layers.items() if layer.window is not None}

    def load_state_dict(self, sd: dict):
        close_windows(self.layers)
        for name, w in sd.items():
            self.layers[name].window = dict(w)


# -----------------------------------------------------------------------------
# AdamW with a step count per element (SpIEL-AG's optimizer)


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose bias correction uses a per-element age, so a delta grown at
    step t is corrected as a fresh parameter (or as one seeded with `age` steps of window statistics)."""

    def __init__(self, params, lr=1e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    st["age"] = torch.zeros_like(p, dtype=torch.float32)
                g = p.grad.float()
                st["age"] += 1
                st["exp_avg"].lerp_(g, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = st["exp_avg"] / (1 - b1 ** st["age"])
                v_hat = st["exp_avg_sq"] / (1 - b2 ** st["age"])
                upd = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * p.float()
                p.sub_((group["lr"] * upd).to(p.dtype))

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for st in self.state.values():  # torch casts state to the param dtype; ours stays fp32
            for k in ("exp_avg", "exp_avg_sq", "age"):
                if k in st:
                    st[k] = st[k].float()


# -----------------------------------------------------------------------------
# merge, unmerge, save, load


@torch.no_grad()
def merge_deltas(model: nn.Module):
    """W0 += scatter(values) in place; forward then uses the base alone. Never into a quantized base.
    Each matrix is summed in fp32 and rounded once to its dtype (a bf16 base loses nothing more)."""
    for name, layer in delta_layers(model).items():
        if hasattr(layer.base, "dequantize"):
            raise ValueError(f"{name}: refusing to merge into a quantized weight; load the base in full precision")
        if not layer.merged:
            _add_scattered(layer.base.weight, layer.indices, layer.values)
            layer.merged = True


@torch.no_grad()
def unmerge_deltas(model: nn.Module):
    for layer in delta_layers(model).values():
        if layer.merged:
            _add_scattered(layer.base.weight, layer.indices, -layer.values)
            layer.merged = False


def _add_scattered(w, indices, values):
    w32 = w.float()  # the weight itself if it is fp32, else an fp32 copy
    w32.view(-1).index_add_(0, indices, values.float())
    if w32 is not w:
        w.copy_(w32)


def remove_deltas(model: nn.Module):
    """put the base linears back in place of the wrappers (merged or not)."""
    modules = dict(model.named_modules())
    for name, layer in delta_layers(model).items():
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, layer.base)


def base_fingerprint(model: nn.Module) -> str:
    """a short hash of weights SpIEL never touches (norms, a slice of the embedding), rounded to bf16 so the
    same base loaded in another dtype or quantized gives the same answer."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.endswith("norm.weight") or name == "tok_embeddings.weight":
            t = t[:64] if name == "tok_embeddings.weight" else t
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def write_finetune(model: nn.Module, path: str, fmt: str, layers: dict, tensors: dict, meta: dict, extra=None):
    """write a spiel safetensors file (delta or LoRA) with the metadata both share: format, the shape of each
    matrix, the row order, the base fingerprint, plus `meta` and `extra`. Temp file + rename: a crash never
    leaves a half-written file."""
    from safetensors.torch import save_file

    meta = {"format": fmt, "shapes": json.dumps({n: list(m.weight_shape) for n, m in layers.items()}),
            "row_order": "meta",  # q/k rows in Meta's RoPE order (an HF checkpoint is permuted on load)
            "base_fingerprint": base_fingerprint(model), **meta}
    meta.update({key: str(v) for key, v in (extra or {}).items()})
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def save_delta(model: nn.Module, path: str, extra: Optional[dict] = None):
    """a safetensors file: per matrix `<name>.indices` and `<name>.values` (fp32), plus metadata."""
    layers = delta_layers(model)
    if not layers:
        raise ValueError("the model has no sparse deltas to save")
    tensors = {}
    for name, m in layers.items():
        tensors[name + ".indices"], tensors[name + ".values"] = m.indices, m.values.float()
    k = sum(m.indices.numel() for m in layers.values())
    density = k / sum(m.weight_shape[0] * m.weight_shape[1] for m in layers.values())
    write_finetune(model, path, "spiel-delta", layers, tensors,
                   {"num_deltas": str(k), "density": f"{density:.6g}"}, extra)


def read_finetune(path: str, fmt: str, what: str):
    """(tensors, metadata, shapes) of a spiel safetensors file of format `fmt` ("spiel-delta" or
    "spiel-lora"); errors name the file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {what} file not found")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: not a spiel {what} file (metadata format is {meta.get('format')!r})")
    try:
        shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: bad metadata ({e})") from None
    if len(tensors) != 2 * len(shapes):
        raise CheckpointError(f"{path}: tensors and metadata disagree")
    return tensors, meta, shapes


def check_fits(model: nn.Module, path: str, shapes: dict, meta: dict, check_base: bool, what: str) -> dict:
    """the model's modules, once every matrix of the file is a plain linear of the right shape in the model
    and (check_base) the file was trained on this base; errors name the file."""
    modules = dict(model.named_modules())
    for name, (o, i) in shapes.items():
        base = modules.get(name)
        if base is None or not (isinstance(base, nn.Linear) or hasattr(base, "dequantize")):
            raise CheckpointError(f"{path}: {what} for {name}, which this model does not have as a plain linear "
                                  f"(another model, or a fine-tune already added?)")
        if matrix_shape(base) != (o, i):
            raise CheckpointError(f"{path}: {name} is {o}x{i} in the file but "
                                  f"{matrix_shape(base)[0]}x{matrix_shape(base)[1]} in this model (another model?)")
    if check_base and meta.get("base_fingerprint") not in (None, base_fingerprint(model)):
        raise CheckpointError(f"{path}: trained on another base model (fingerprint {meta['base_fingerprint']} "
                              f"!= {base_fingerprint(model)})")
    return modules


def read_delta(path: str):
    """(tensors, metadata, shapes) of a delta file, its indices checked; errors name the file."""
    tensors, meta, shapes = read_finetune(path, "spiel-delta", "delta")
    for name, (o, i) in shapes.items():
        idx, val = tensors.get(name + ".indices"), tensors.get(name + ".values")
        if idx is None or val is None or idx.shape != val.shape or idx.dim() != 1:
            raise CheckpointError(f"{path}: {name} needs 1-D .indices and .values of equal length")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= o * i):
            raise CheckpointError(f"{path}: {name} has indices outside its {o}x{i} matrix")
        if torch.unique(idx).numel() != idx.numel():
            raise CheckpointError(f"{path}: {name} has repeated indices")
    return tensors, meta, shapes


def load_delta(model: nn.Module, path: str, check_base: bool = True) -> dict:
    """Attach the deltas of `path` to a loaded base (wrapping its linears). A delta that does not fit the
    model (names, shapes) or was trained on another base is an error naming the file."""
    tensors, meta, shapes = read_delta(path)
    modules = check_fits(model, path, shapes, meta, check_base, "delta")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in shapes:
        base = modules[name]
        idx, val = tensors[name + ".indices"], tensors[name + ".values"]
        order = idx.argsort()  # slots sorted by position (see sort_slots)
        layer = SparseDeltaLinear(base, idx.numel(), indices=idx[order])
        with torch.no_grad():
            layer.values.copy_(val[order])
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, layer)
    return meta
