"""
SpIEL: sparse fine-tuning with a fixed budget of trainable deltas whose positions move during training.
Ansell, Vulic, Sterz, Korhonen, Ponti 2024, "Scaling Sparse Fine-Tuning to Large Language Models",
arXiv 2401.16405, section 3.

Each targeted weight W0 (out, in) of the frozen base gets `indices` (k flat row-major positions) and
`values` (k trainable fp32 numbers): W = W0 + scatter(indices, values). Every few optimizer steps the
deltas of smallest |value| are dropped and as many new positions are grown, chosen by
- SpIEL-AG: gradients accumulated at k candidate positions over a short window (optimizer: AdamW), or
- SpIEL-MA: the outer product of SM3's row and column accumulators (optimizer: SM3, sm3.py).

The file follows the paper: 1 the layer and its gradient, 2 the budget, 3 the schedule, 4 SpIEL-AG's
window, 5 SpIEL-MA's candidates, 6 drop and grow, 7 the optimizer, 8 merging and attaching, and last
9 the speed-ups, which are not the method (a resident merged weight, and the sparse value gradient).
docs/method.md states the decisions the paper leaves open, and where this code departs from the authors'.
"""


import math
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llama import matrix_shape, swap_module, target_linears
from system import check_ranks_agree

# -----------------------------------------------------------------------------
# 1. the sparse-delta layer and its gradient (section 3.1)


class SparseDeltaFn(torch.autograd.Function):
    """y = x (W0 + scatter(indices, values))^T. W0 gets no gradient; d(values) = (dy^T x)[indices].
    The merged weight is built transiently in forward and again in backward (a full-precision base instead
    holds it in its own storage while the deltas are attached: resident_weight, section 9)."""

    @staticmethod
    def forward(ctx, x, values, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, values)
        bias = getattr(layer.base, "bias", None)  # frozen: not an input of this Function, so no gradient
        y = F.linear(x, layer.merged_weight(x.dtype, values), None if bias is None else bias.to(x.dtype))
        ctx.written = layer.written  # (section 9: the resident weight's write this forward made, or None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        layer = ctx.layer
        if ctx.written is not None and ctx.written is layer.written and dy.dtype == layer.base.weight.dtype:
            w = layer.base.weight  # still as this forward wrote it (section 9): k writes saved
        else:
            w = layer.merged_weight(dy.dtype, values)
        dx = dy @ w if ctx.needs_input_grad[0] else None  # (..., in)
        if not ctx.needs_input_grad[1]:
            return dx, None, None
        g = value_grad(layer, dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]))  # (N, out), (N, in)
        return dx, g if g.dtype == values.dtype else g.to(values.dtype), None


def value_grad(layer, dy, x) -> torch.Tensor:
    """d(values) (k,) from dy (N, out) and x (N, in). While SpIEL-AG's window is open (section 4) the same
    product also gives the gradient at the window's candidates, handed to layer.window here: the window has to
    see every micro-batch's gradient, and the backward pass is the only place where it exists (never stored)."""
    w, idx = layer.window, layer.indices
    if w is not None and w.candidates is None:  # the window's first micro-batch: candidates from dense dW
        g = (dy.T @ x).view(-1)  # (out * in,) transient
        w.choose(g)
        w.add(g[w.candidates])
        return g[idx]
    if use_sparse_path(layer, dy.device):  # only the needed entries of dW (section 9)
        dy_t, x_t = dy.T.contiguous(), layer.inputs.token_major(x)  # (out, N), (in, N): tokens contiguous
        if w is not None:  # the candidates' entries too (their sparsity pattern is cached on the window)
            w.add(sampled_grad(layer, dy_t, x_t, w.candidates, cache=w))
        return sampled_grad(layer, dy_t, x_t, idx)
    g = (dy.T @ x).view(-1)  # the authors' way: dense dW (out, in), then gather
    if w is not None:
        w.add(g[w.candidates])
    return g[idx]


class SparseDeltaLinear(nn.Module):
    """a frozen base linear (nn.Linear or a quantized one) plus k trainable deltas at flat positions.
    resident: let a full-precision base hold W0 + delta in its own storage (section 9); off under --fsdp.
    inputs: the Inputs its backward takes the input's transpose from (section 9), shared by the layers of a
    model; a layer of its own by default."""

    def __init__(self, base: nn.Module, k: int, generator: Optional[torch.Generator] = None,
                 indices: Optional[torch.Tensor] = None, resident: bool = True, inputs=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        out_f, in_f = self.weight_shape = matrix_shape(base)
        if not 0 < k <= out_f * in_f:
            raise ValueError(f"cannot place {k} deltas in a {out_f}x{in_f} matrix")
        device = next(base.buffers()).device if hasattr(base, "dequantize") else base.weight.device
        if indices is None:  # uniform without replacement (the meta device draws nothing); sorted (section 9)
            indices = torch.empty(k, device="meta") if device.type == "meta" else random_positions(out_f * in_f, k,
                                                                                                 generator)
        self.register_buffer("indices", indices.to(device, torch.int32 if out_f * in_f < 2**31 else torch.int64))
        self.values = nn.Parameter(torch.zeros(k, device=device))  # (k,) fp32, 0 at the start: W = W0
        self.window = None  # SpIEL-AG's open accumulation window (a Window), opened and closed by the Selector
        self.grad_path = "auto"  # how d(values) is computed: "dense", "sparse" or "auto" (section 9)
        self.pattern = None  # section 9: the sparsity pattern of the indices, cached (rebuilt when they change)
        self.inputs = Inputs() if inputs is None else inputs  # section 9: x^T, shared by layers of one input
        # section 9: W0 at the active positions while the base holds W0 + delta, and a token of the last write
        self.resident, self.w0, self.written = resident and isinstance(base, nn.Linear), None, None

    def merged_weight(self, dtype, values=None) -> torch.Tensor:
        """W0 + scatter(indices, values) in `dtype`: a transient (out, in) tensor (or, resident, the base's own
        weight holding it: section 9)."""
        base, values = self.base, self.values if values is None else values
        if self.resident and base.weight.dtype == dtype:
            return resident_weight(self, values)
        release(self)  # (a resident base holding W0 + delta from an earlier call in its own dtype: W0 again)
        w = base.dequantize(dtype) if hasattr(base, "dequantize") else base.weight.to(dtype, copy=True)
        return w.view(-1).index_add_(0, self.indices, values.to(dtype)).view(self.weight_shape)

    def forward(self, x):
        return SparseDeltaFn.apply(x, self.values, self)

    def extra_repr(self):
        out_f, in_f = self.weight_shape
        return f"{out_f}x{in_f}, k={self.indices.numel()} ({self.indices.numel() / (out_f * in_f):.2%})"


def random_positions(n: int, k: int, generator=None) -> torch.Tensor:
    """k distinct positions in [0, n), uniformly, sorted. For k << n: draw with replacement, deduplicate and
    keep a random k (a randperm of a 45M-entry 7B matrix would cost a second each)."""
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
# 2. the budget: k_total deltas split across the targeted matrices in proportion to their size (section 3)


def lora_param_count(model: nn.Module, targets, rank: int) -> int:
    """parameters LoRA of this rank trains on the targeted projections: rank * (in + out) per matrix."""
    return sum(rank * sum(matrix_shape(m)) for m in target_linears(model, targets).values())


def split_budget(sizes: list, total: int) -> list:
    """`total` deltas across matrices of these sizes, proportionally (largest remainder: the sum is exact)."""
    if total < len(sizes):
        raise ValueError(f"a budget of {total:,} deltas cannot give each of {len(sizes)} matrices one")
    raw = [total * s / sum(sizes) for s in sizes]
    ks = [int(r) for r in raw]
    for i in sorted(range(len(sizes)), key=lambda i: raw[i] - ks[i], reverse=True)[:total - sum(ks)]:
        ks[i] += 1
    ks = [min(max(k, 1), s) for k, s in zip(ks, sizes)]
    while sum(ks) > total:  # the floor of 1 per matrix overshot a tiny budget: trim the largest shares
        ks[max(range(len(ks)), key=ks.__getitem__)] -= 1
    return ks


def add_sparse_deltas(model: nn.Module, targets, density: Optional[float] = None, num_tunable: Optional[int] = None,
                      lora_rank: Optional[int] = None, seed: int = 0, resident: bool = True) -> dict:
    """freeze the model and swap each linear named in `targets` (e.g. llama.PROJECTIONS) for a SparseDeltaLinear.
    The budget is exactly one of: a density of the targeted weights, a count, or as many deltas as LoRA of rank
    r trains on them. resident: see SparseDeltaLinear. -> name -> layer"""
    if sum(x is not None for x in (density, num_tunable, lora_rank)) != 1:
        raise ValueError("give exactly one of density, num_tunable, lora_rank")
    model.requires_grad_(False)
    linears = target_linears(model, targets)
    if not linears:
        raise ValueError("no targeted linear layer in the model (deltas already added?)")
    sizes = [math.prod(matrix_shape(m)) for m in linears.values()]
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    total = round(density * sum(sizes)) if density is not None else \
        num_tunable if num_tunable is not None else lora_param_count(model, targets, lora_rank)
    if not 0 < total <= sum(sizes):
        raise ValueError(f"a budget of {total:,} deltas does not fit {sum(sizes):,} targeted weights")
    g, inputs = torch.Generator().manual_seed(seed), Inputs()
    for (name, base), k in zip(linears.items(), split_budget(sizes, total)):
        swap_module(model, name, SparseDeltaLinear(base, k, generator=g, resident=resident, inputs=inputs))
    return delta_layers(model)


def budget_summary(model: nn.Module) -> str:
    """trainable deltas vs the base, and where they sit by projection."""
    layers = delta_layers(model)
    k = sum(m.indices.numel() for m in layers.values())
    targeted = sum(math.prod(m.weight_shape) for m in layers.values())
    by_proj = {}
    for name, m in layers.items():
        by_proj[name.rpartition(".")[2]] = by_proj.get(name.rpartition(".")[2], 0) + m.indices.numel()
    return (f"sparse deltas: {k:,} in {len(layers)} matrices, density {k / targeted:.3%} of their "
            f"{targeted:,} weights; by projection: " + ", ".join(f"{p} {n:,}" for p, n in by_proj.items()))


# -----------------------------------------------------------------------------
# 3. the schedule, counted in optimizer steps t = 1..T (section 3)


class Schedule:
    """when to reselect, what fraction to replace, and (SpIEL-AG) when the accumulation window is open.

    First reselection at t = first (all k due: those chosen again stay), then every `interval` steps a fraction
    rho0 (1 - t/T) (linear) or rho0 (1 + cos(pi t/T)) / 2 (cosine). The AG window holds the backward
    passes of steps 1..first, then of steps r - first .. r before each later reselection r.
    interval 0: the first reselection only; the support stays fixed after it (an ablation)."""

    def __init__(self, total_steps: int, interval: int = 20, first: int = 5, rho0: float = 0.2, decay: str = "linear"):
        if decay not in ("linear", "cosine"):
            raise ValueError(f"unknown decay {decay!r}: use linear or cosine")
        if first < 1 or not (interval == 0 or interval > first):
            raise ValueError(f"need interval > first >= 1 (or interval 0), got interval {interval}, first {first}")
        self.T, self.interval, self.first, self.rho0, self.decay = total_steps, interval, first, rho0, decay

    def is_reselection(self, t: int) -> bool:
        later = self.interval > 0 and t > self.first and (t - self.first) % self.interval == 0
        return t < self.T and (t == self.first or later)

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
        if not self.interval:
            return False
        r = t + (-(t - self.first)) % self.interval  # the next reselection at or after t
        return r - t <= self.first and self.is_reselection(r)


# -----------------------------------------------------------------------------
# 4. SpIEL-AG: accumulated gradients at candidate positions (section 3.2)


class Window:
    """one matrix's accumulation window. Its k candidates are the positions of largest |dW| in the window's
    first micro-batch (`choose`); every backward pass then adds dW at the candidates to `step_sum` (`add`, from
    value_grad), and after each optimizer step `end_step` folds that step's gradient, scaled as gradient
    clipping scaled it, into the sums. So the statistics are those of the step gradients AdamW sees."""

    def __init__(self, indices: torch.Tensor):
        self.indices, self.candidates, self.steps, self.pattern = indices, None, 0, None
        self.step_sum = self.grad_sum = self.sq_sum = None  # (k,) fp32 once the candidates are chosen

    def choose(self, g: torch.Tensor):
        k = self.indices.numel()
        # (k,) sorted, as the indices (top_k: x.topk(k), faster; sorted: section 9 reads them row by row)
        self.candidates = top_k(g.abs(), k).sort().values.to(self.indices.dtype)
        if dist.is_initialized():  # every rank grows from the same candidates: rank 0's
            dist.broadcast(self.candidates, src=0)
        self.step_sum, self.grad_sum, self.sq_sum = (torch.zeros(k, device=g.device) for _ in range(3))

    def add(self, gc: torch.Tensor):
        self.step_sum += gc.float()  # (k,) accumulated in fp32

    def end_step(self, scale: float = 1.0):
        if self.candidates is None:
            return
        if dist.is_initialized():  # the step's gradient is the sum over ranks (the loss is normalised globally)
            dist.all_reduce(self.step_sum)
        g = self.step_sum * scale
        self.grad_sum += g
        self.sq_sum += g * g
        self.steps += 1
        self.step_sum.zero_()

    def seed(self, grown: torch.Tensor, betas) -> dict:
        """AdamW state for deltas grown at candidates `grown`: moments such that bias correction at age =
        window steps returns the window's mean step gradient and mean squared step gradient."""
        (b1, b2), n = betas, self.steps
        mean, mean_sq = self.grad_sum[grown] / n, self.sq_sum[grown] / n
        return {"exp_avg": mean * (1 - b1 ** n), "exp_avg_sq": mean_sq * (1 - b2 ** n), "age": torch.full_like(mean, n)}

    def state_dict(self) -> dict:  # at a step boundary: step_sum is zero
        return {"candidates": self.candidates, "grad_sum": self.grad_sum, "sq_sum": self.sq_sum, "steps": self.steps}

    def load_state_dict(self, sd: dict):
        self.steps = sd["steps"]
        if sd["candidates"] is not None:
            self.candidates = sd["candidates"].to(self.indices.device, self.indices.dtype)
            self.grad_sum, self.sq_sum = sd["grad_sum"].clone(), sd["sq_sum"].clone()
            self.step_sum = torch.zeros_like(self.grad_sum)


# -----------------------------------------------------------------------------
# 5. SpIEL-MA: candidates from SM3's row and column accumulators (section 3.3)


def ma_candidates(active: torch.Tensor, n: int, row: torch.Tensor, col: torch.Tensor, mask=None):
    """the n inactive positions of largest row[i] * col[j] and their scores; active: the k active flat
    positions; mask: see member. The (out, in) outer product is never formed: how many of its entries reach a
    threshold is counted row by row on the sorted columns, a bisection finds the threshold that leaves n
    inactive positions above it, and only those (about n + k) are scored."""
    out_f, in_f = row.numel(), col.numel()
    n = min(n, out_f * in_f - active.numel())
    col_sorted, col_order = col.sort()  # (in,) ascending
    active_scores = row[active // in_f] * col[active % in_f]  # (k,)

    def per_row(tau: float):  # (out,) per row, how many columns reach tau: col[j] >= tau / row[i]
        bound = torch.where(row > 0, tau / row, math.inf if tau > 0 else -math.inf)
        return in_f - torch.searchsorted(col_sorted, bound)

    lo, hi = 0.0, float(row.max() * col.max())
    for _ in range(32):  # bisection: the largest tau that leaves at least n inactive positions at or above it
        mid = (lo + hi) / 2
        above = int(per_row(mid).sum()) - int((active_scores >= mid).sum())
        lo, hi = (mid, hi) if above >= n else (lo, mid)
    m = per_row(lo)  # (out,) how many of each row's largest columns to score; M = m.sum() ~ n + k
    rows = torch.repeat_interleave(torch.arange(out_f, device=row.device), m)  # (M,) row of each entry
    rank = torch.arange(rows.numel(), device=row.device) - (m.cumsum(0) - m)[rows]  # (M,) 0.. within a row
    cols = col_order[in_f - 1 - rank]  # (M,) the row's columns, largest first
    pos = rows * in_f + cols  # (M,) flat positions
    keep = ~member(active, pos, out_f * in_f, mask)  # (M,) inactive ones only
    pos, score = pos[keep], row[rows[keep]] * col[cols[keep]]  # (M',)
    top = top_k(score, min(n, score.numel()))  # (n,)
    return pos[top], score[top]


def member(values: torch.Tensor, x: torch.Tensor, size: int, mask=None) -> torch.Tensor:
    """which entries of x (flat positions < size) are among `values`, through a bool mask over all positions.
    `mask` (at least `size` entries, all False) is False again afterwards: only the entries set are cleared, so
    the Selector keeps one for all its matrices (zeroing a fresh (out, in) mask for every call was a third of a
    7B reselection). Without one, a fresh mask."""
    mask = torch.zeros(size, dtype=torch.bool, device=x.device) if mask is None else mask
    mask[values] = True
    hit = mask[x]
    mask[values] = False
    return hit


def random_candidates(active: torch.Tensor, n: int, size: int, generator: torch.Generator, mask=None) -> tuple:
    """n positions drawn uniformly among those not in `active` (k flat positions of a matrix of `size`), and
    scores that rank them in draw order: what --regrow random grows instead of the criterion's choice."""
    n = min(n, size - active.numel())
    draw = random_positions(size, min(size, n + active.numel()), generator).to(active.device)  # >= n inactive
    draw = draw[~member(active, draw, size, mask)]  # (>= n,) inactive, a uniform sample of them
    pick = draw[torch.randperm(draw.numel(), generator=generator)[:n].to(draw.device)]  # (n,)
    return pick, torch.arange(n, 0, -1, dtype=torch.float32, device=pick.device)


# -----------------------------------------------------------------------------
# 6. drop and grow (section 3), and the Selector that runs the schedule for a whole model


@torch.no_grad()
def drop_and_grow(layer: SparseDeltaLinear, n: int, cand: torch.Tensor, score: torch.Tensor, regrow_dropped: bool,
                  mask=None):
    """drop the n smallest |values| and grow the n best-scoring eligible candidates at value 0. Candidates
    that stay active are never eligible; with regrow_dropped (AG, as the authors) a dropped position may be
    chosen again and simply keeps its slot, value and state; without (MA, as the authors) every position
    active now is excluded. If too few candidates are eligible, fewer are dropped: k stays constant. mask: see
    member. Returns (slots whose position changed (m,), index into `cand` of what grew there (m,))."""
    idx, k, size = layer.indices.long(), layer.indices.numel(), math.prod(layer.weight_shape)
    n = min(n, k)
    while True:
        drop = top_k(-layer.values.abs(), n)  # (n,) the slots of the n smallest |value|
        stays = torch.ones(k, dtype=torch.bool, device=idx.device)
        stays[drop] = False
        eligible = ~member(idx[stays] if regrow_dropped else idx, cand, size, mask)  # never what stays / is
        if int(eligible.sum()) >= n:
            break
        n = int(eligible.sum())  # too few candidates: drop fewer (which may make fewer eligible: repeat)
    chosen = top_k(score.masked_fill(~eligible, -math.inf), n)  # (n,) into cand: the best eligible
    again = member(idx[drop], cand[chosen], size, mask)  # (n,) chosen, but just dropped: it keeps its slot
    freed = drop[~member(cand[chosen], idx[drop], size, mask)]  # (m,) dropped slots not chosen again
    new = chosen[~again]  # (m,) into cand: the positions that move into those slots
    layer.indices[freed] = cand[new].to(layer.indices.dtype)
    layer.values[freed] = 0.0
    return freed, new


@torch.no_grad()
def sort_slots(layer: SparseDeltaLinear, state: dict, per_slot=()):
    """reorder the k slots so the indices ascend (row by row), moving values and the optimizer state named in
    `per_slot` (one entry per delta) along: section 9 reads the active entries in this order."""
    perm = layer.indices.argsort()
    layer.indices.copy_(layer.indices[perm])
    layer.values.copy_(layer.values[perm])
    for key in per_slot:
        if key in state:
            state[key].copy_(state[key][perm])


class Selector:
    """runs drop-and-grow for every SparseDeltaLinear of a model: method "ag" (with spiel.AdamW) or "ma"
    (with sm3.SM3). Per optimizer step t (train.train_step is the one place that calls them, in this order):
    begin_step(t) before the step's backward passes, end_step(clip scale) after gradient clipping, the
    optimizer's step, then reselect(t) when schedule.is_reselection(t).
    regrow "random" (an ablation): grow uniformly random inactive positions instead of the method's choice
    (no AG window is opened); drawn from `seed`, the step and the matrix, so every process of a torchrun run
    and every resume draws the same."""

    def __init__(self, model: nn.Module, method: str, schedule: Schedule, optimizer, regrow: str = "criterion",
                 seed: int = 0):
        if method not in ("ag", "ma") or regrow not in ("criterion", "random"):
            raise ValueError(f"unknown SpIEL method {method!r} or regrowth {regrow!r}: use ag or ma, criterion "
                             f"or random")
        self.layers, self.method, self.schedule, self.optimizer = delta_layers(model), method, schedule, optimizer
        self.regrow, self.seed = regrow, seed
        self.mask = None  # member()'s bool mask over the largest matrix, made at the first reselection

    def begin_step(self, t: int):
        """SpIEL-AG: open the windows if step t's backward passes belong to one."""
        if self.method == "ag" and self.regrow == "criterion" and self.schedule.window_open(t):
            for layer in self.layers.values():
                layer.window = layer.window or Window(layer.indices)

    def end_step(self, clip_scale: float = 1.0):
        """SpIEL-AG: fold this step's gradient at the candidates, scaled as clipping scaled the deltas'."""
        for layer in self.layers.values():
            if layer.window is not None:
                layer.window.end_step(clip_scale)

    @torch.no_grad()
    def reselect(self, t: int) -> dict:
        """drop and regrow in every matrix; -> name -> number of positions that changed."""
        frac, changed = self.schedule.fraction(t), {}
        per_slot = type(self.optimizer).per_slot  # the optimizer state that has one entry per delta
        if self.mask is None:
            size, first = max(math.prod(m.weight_shape) for m in self.layers.values()), next(iter(self.layers.values()))
            self.mask = torch.zeros(size, dtype=torch.bool, device=first.indices.device)
        for i, (name, layer) in enumerate(self.layers.items()):
            release(layer)  # a resident weight gives W0 back before the positions move (section 9)
            n, state = int(layer.indices.numel() * frac), self.optimizer.state[layer.values]
            if self.regrow == "random":  # the ablation: candidates drawn at random, grown with fresh state
                g = torch.Generator().manual_seed((self.seed * 100_003 + t) * 1_009 + i)  # (seed, step, matrix)
                cand, score = random_candidates(layer.indices.long(), n, math.prod(layer.weight_shape), g, self.mask)
                slots, new = drop_and_grow(layer, n, cand, score, False, self.mask)
                seed = {}
            elif self.method == "ag":  # candidates: the window's; score |accumulated gradient|
                w = layer.window
                if w is None or not w.steps:
                    raise RuntimeError(f"step {t}: {name} has no accumulated gradients (was the window open?)")
                slots, new = drop_and_grow(layer, n, w.candidates.long(), w.grad_sum.abs(), True, self.mask)
                seed = w.seed(new, self.optimizer.param_groups[0]["betas"])
            else:  # candidates: the top row[i] * col[j] among inactive positions
                row, col = self.optimizer.accumulators(layer.values)
                cand, score = ma_candidates(layer.indices.long(), n, row, col, self.mask)
                slots, new = drop_and_grow(layer, n, cand, score, False, self.mask)
                seed = {}
            for key in per_slot:  # fresh optimizer state for the grown slots: zeros, or AG's seed
                if key in state:
                    state[key][slots] = seed[key].to(state[key].dtype) if key in seed else 0
            sort_slots(layer, state, per_slot)
            layer.window = None
            changed[name] = slots.numel()
        if dist.is_initialized():  # a cheap check that every rank holds the same indices
            check_ranks_agree([layer.indices for layer in self.layers.values()], t)
        return changed

    def state_dict(self) -> dict:
        """the open AG windows (plain tensors and ints: loadable with weights_only=True)."""
        return {name: layer.window.state_dict() for name, layer in self.layers.items() if layer.window is not None}

    def load_state_dict(self, sd: dict):
        for name, layer in self.layers.items():
            layer.window = None
            if name in sd:
                layer.window = Window(layer.indices)
                layer.window.load_state_dict(sd[name])


# -----------------------------------------------------------------------------
# 7. the optimizer of SpIEL-AG: AdamW with a step count per element


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay on the pre-step value) whose bias correction uses a per-element age,
    so a delta grown at step t is corrected as a fresh parameter (or as one seeded with `age` window steps)."""
    per_slot = ("exp_avg", "exp_avg_sq", "age")  # all its state has one entry per delta (the Selector moves it)
    part = 1 << 22  # deltas per foreach call at most: its temporaries (12 B a delta) stay at 50 MB at 7B width

    def __init__(self, params, lr=1e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p].update({key: torch.zeros_like(p, dtype=torch.float32) for key in self.per_slot})
            for ps in in_parts(params, self.part):  # many matrices' deltas per foreach call (one call per op)
                m, v, age = ([self.state[p][key] for p in ps] for key in self.per_slot)
                g = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in ps]
                torch._foreach_add_(age, 1)
                torch._foreach_lerp_(m, g, 1 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, g, g, value=1 - b2)
                # step = m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^age), v_hat = v / (1 - b2^age)
                denom = torch._foreach_div(v, one_minus(torch._foreach_pow(b2, age)))
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
                update = torch._foreach_div(m, one_minus(torch._foreach_pow(b1, age)))
                torch._foreach_div_(update, denom)
                if wd:
                    torch._foreach_mul_(ps, 1 - lr * wd)  # decoupled weight decay, on the pre-step value
                torch._foreach_add_(ps, [u if u.dtype == p.dtype else u.to(p.dtype) for u, p in zip(update, ps)],
                                    alpha=-lr)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for st in self.state.values():  # torch casts state to the param dtype; ours stays fp32
            for key in ("exp_avg", "exp_avg_sq", "age"):
                if key in st:
                    st[key] = st[key].float()


def in_parts(tensors: list, limit: int):
    """the list in consecutive runs of at most `limit` elements in all (a larger tensor alone)."""
    run, n = [], 0
    for t in tensors:
        if run and n + t.numel() > limit:
            yield run
            run, n = [], 0
        run, n = run + [t], n + t.numel()
    if run:
        yield run


def one_minus(xs: list) -> list:
    """1 - x for each tensor of a list, in place."""
    torch._foreach_neg_(xs)
    torch._foreach_add_(xs, 1)
    return xs


# -----------------------------------------------------------------------------
# 8. merge and attach: a delta is indices + values; merged, W0 += scatter(values) (section 3). Fine-tunes add
# up: deltas trained apart on one base can be merged one after another (finetune.py writes and reads them)


@torch.no_grad()
def merge_deltas(model: nn.Module):
    """W0 += scatter(values) in fp32, rounded once to W0's dtype; the plain linears are put back. Never into
    a quantized base (4-bit rounding would erase the deltas)."""
    for name, layer in delta_layers(model).items():
        if hasattr(layer.base, "dequantize"):
            raise ValueError(f"{name}: refusing to merge into a quantized weight; load the base in full precision")
        release(layer)
        w = layer.base.weight
        w.copy_(w.float().view(-1).index_add_(0, layer.indices, layer.values.float()).view(w.shape))
        swap_module(model, name, layer.base)


def remove_deltas(model: nn.Module):
    """put the plain base linears back, holding W0 exactly (as before the deltas were added)."""
    for name, layer in delta_layers(model).items():
        release(layer)
        swap_module(model, name, layer.base)


def delta_tensors(model: nn.Module) -> dict:
    """name -> (indices (k,) int32/64, values (k,) fp32) of every delta layer, in model order (what is saved)."""
    return {name: (m.indices, m.values.float()) for name, m in delta_layers(model).items()}


@torch.no_grad()
def attach_deltas(model: nn.Module, deltas: dict) -> dict:
    """freeze the model and give each linear named in `deltas` (name -> (indices, values), checked by the caller:
    unique positions inside its matrix) those deltas, slots sorted by position (section 9). -> name -> layer"""
    modules, inputs = dict(model.named_modules()), Inputs()
    model.requires_grad_(False)
    for name, (idx, val) in deltas.items():
        order = idx.argsort()
        layer = SparseDeltaLinear(modules[name], idx.numel(), indices=idx[order], inputs=inputs)
        layer.values.copy_(val[order])
        swap_module(model, name, layer)
    return delta_layers(model)


# -----------------------------------------------------------------------------
# 9. the speed-ups. A resident merged weight: section 1 builds W0 + scatter(values) afresh in every forward and
# backward, an (out, in) copy each time; a full-precision base can instead hold W0 + delta in its own storage
# while the deltas are attached: the k active entries are rewritten at every use, and W0 there is kept aside to
# be put back by release() before the positions change (the Selector, a resume) or the deltas come off. Not for a
# quantized base (no dense storage) nor a sharded one (--fsdp gathers its storage afresh for every block).
# The sparse value gradient: outside AG windows only the k active entries of dW are needed (the authors compute
# all of dW and gather); each is dy[:, row] . x[:, col] over the N tokens, a sampled product (SDDMM).


@torch.no_grad()
def resident_weight(layer, values) -> torch.Tensor:
    """the base weight, holding W0 + scatter(indices, values)."""
    w, key = layer.base.weight.view(-1), (layer.indices, layer.indices._version)  # these positions, as they are now
    if layer.w0 is None:
        layer.w0 = (key, w[layer.indices])  # (k,) W0 at the active positions
    elif layer.w0[0][0] is not key[0] or layer.w0[0][1] != key[1]:
        raise RuntimeError("the positions of resident deltas changed: call spiel.release(layer) before moving them")
    if w.dtype == values.dtype:  # (an fp32 base: nothing to convert)
        w[layer.indices] = layer.w0[1] + values
    else:  # W0 + v summed in fp32 (fp64 stays fp64), rounded once
        acc = torch.promote_types(w.dtype, torch.float32)
        w[layer.indices] = (layer.w0[1].to(acc) + values.to(acc)).to(w.dtype)
    layer.written = object()  # a token for this write: a backward may reuse what its own forward wrote
    return layer.base.weight


@torch.no_grad()
def release(layer):
    """put W0 back at the active positions (the base is W0 again), before they move or the deltas come off."""
    if layer.w0 is not None:
        if layer.w0[0][0] is not layer.indices or layer.w0[0][1] != layer.indices._version:
            raise RuntimeError("the positions of resident deltas changed before they were released")
        layer.base.weight.view(-1)[layer.indices] = layer.w0[1]
        layer.w0 = layer.written = None


# "auto" takes the sparse path below this density. Each sampled entry costs about as much as 1 / SPARSE_DENSITY_MAX
# dense multiply-adds (measured with tools/bench.py --grad-paths, docs/bench.md). A fixed rule, not a per-run timing,
# so a run (and its resume) is deterministic. CUDA is unmeasured here: auto keeps the authors' dense path there.
SPARSE_DENSITY_MAX = {"cpu": 0.08, "cuda": 0.0}


def use_sparse_path(layer, device) -> bool:
    if layer.grad_path != "auto":
        return layer.grad_path == "sparse"
    return layer.indices.numel() / math.prod(layer.weight_shape) < SPARSE_DENSITY_MAX.get(device.type, 0.0)


def set_grad_path(model: nn.Module, path: str):
    """force the value-gradient path of every delta layer: "auto", "dense" or "sparse"."""
    if path not in ("auto", "dense", "sparse"):
        raise ValueError(f"unknown gradient path {path!r}: use auto, dense or sparse")
    for layer in delta_layers(model).values():
        layer.grad_path = path


def csr_pattern(layer, positions: torch.Tensor, cache=None) -> tuple:
    """(the sparsity pattern of `positions` (m,) as a CSR tensor of the layer's shape, its values a zero broadcast
    (nothing stored per entry); the order that sorts `positions`, or None if they are sorted), kept in
    `cache.pattern` (default: the layer's; an AG window keeps its candidates') for this very tensor until it
    changes (drop-and-grow writes indices in place: a new version). Row pointers and columns in int32 where they
    fit: 4 bytes a delta."""
    cache = layer if cache is None else cache
    if cache.pattern is None or cache.pattern[0] is not positions or cache.pattern[1] != positions._version:
        pos = positions.long()
        order = None if bool((pos[1:] >= pos[:-1]).all()) else pos.argsort()
        pos = pos if order is None else pos[order]
        out_f, in_f = layer.weight_shape
        small = torch.int32 if pos.numel() < 2**31 else torch.long
        crow = torch.zeros(out_f + 1, dtype=small, device=pos.device)
        crow[1:] = torch.bincount(pos // in_f, minlength=out_f).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it works as used here
            warnings.simplefilter("ignore")
            zeros = torch.zeros((), device=pos.device).expand(pos.numel())  # (m,) values: one stored zero
            csr = torch.sparse_csr_tensor(crow, (pos % in_f).to(small), zeros, layer.weight_shape,
                                          check_invariants=False)
        cache.pattern = (positions, positions._version, csr, order)
    return cache.pattern[2:]


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """the indices of the k largest entries of x (1-D), as x.topk(k) (any k of equal ones): on a CPU a topk
    with k in the tens of thousands sorts most of x, so cut at a threshold read off a regular sample of x
    first (low enough to keep at least k) and rank only what is above it."""
    if k >= x.numel():
        return torch.arange(x.numel(), device=x.device)
    if x.device.type != "cpu" or 4 * k >= x.numel():
        return x.topk(k, sorted=False).indices
    sample = x[::max(1, x.numel() // 16384)]  # a regular sample of 16384 or more
    share = 2 * k / x.numel()  # twice the share of x that is kept: the sample's quantile errs by far less
    while True:
        cut = sample.kthvalue(max(1, int(sample.numel() * (1 - share)))).values
        above = (x >= cut).nonzero().squeeze(1)  # (> k,) every entry at least as large as the cut
        if above.numel() >= k:
            return above[x[above].topk(k, sorted=False).indices]
        share *= 4  # (too few above the cut: lower it)


class Inputs:
    """the token-contiguous transpose x^T (in, N) of a layer's input x (N, in), which the SDDMM reads, made once
    per input: wq, wk and wv read the same x (the attention norm's output), and so do w1 and w3, and their
    backward passes run one after another, so the last transpose is kept and reused while it is still that
    input's. One is shared by the delta layers of a model (add_sparse_deltas). It holds the input itself, so its
    key (storage, offset, shape, strides, version) cannot match a different tensor at a reused address."""

    def __init__(self):
        self.last = None  # (key, x, x^T)

    def token_major(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride(), x._version)
        if self.last is None or self.last[0] != key:
            self.last = (key, x, x.T.contiguous())
        return self.last[2]


def sampled_grad(layer, dy_t: torch.Tensor, x_t: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
    """(dy^T x) at `positions` (m,) only, from dy^T (out, N) and x^T (in, N), token-contiguous so that each dot
    product reads contiguous memory; cache: where the pattern is kept."""
    if dy_t.dtype not in (torch.float32, torch.float64):  # no half-precision SDDMM kernel: compute it in fp32
        dy_t, x_t = dy_t.float(), x_t.float()
    pattern, order = csr_pattern(layer, positions, cache)
    g = torch.sparse.sampled_addmm(pattern.to(dy_t.dtype), dy_t, x_t.T, beta=0.0).values()  # (m,)
    return g if order is None else torch.empty_like(g).index_copy_(0, order, g)
