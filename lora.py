"""
LoRA, the baseline SpIEL is compared against: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv 2106.09685, section 4.1. Each targeted frozen weight W0 (out, in) gets
W = W0 + (alpha / r) * B A with A (r, in) and B (out, r) trainable, B = 0 at the start so W = W0.

The API mirrors spiel.py (add / merge / unmerge / remove / save / load), and `rank_for_budget` picks the
rank whose trainable count fits a SpIEL budget, so both methods can be run with the same number of
trainable parameters (the paper matches LoRA r = 64 on all seven projections).
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama import PROJECTIONS, CheckpointError
from spiel import check_fits, lora_param_count, matrix_shape, read_finetune, target_linears, write_finetune


class LoRALinear(nn.Module):
    """a frozen base linear (nn.Linear or a quantized one) plus the low-rank update scaling * B A."""

    def __init__(self, base: nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.1,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        out_f, in_f = self.weight_shape = matrix_shape(base)
        device = next(base.buffers()).device if hasattr(base, "dequantize") else base.weight.device
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        # A as in the paper's code (kaiming-uniform, a = sqrt(5)), B = 0; both fp32 whatever the base dtype
        a = torch.empty(rank, in_f)  # drawn on the CPU (the generator is a CPU one), so CPU and GPU runs agree
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(a.to(device))  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_f, rank, device=device))  # (out, r)
        self.dropout = nn.Dropout(dropout)  # on the input of the low-rank path only
        self.merged = False

    def delta_weight(self, dtype) -> torch.Tensor:
        """scaling * B A, a transient (out, in) tensor computed in fp32, returned in `dtype`."""
        return (self.scaling * (self.B.float() @ self.A.float())).to(dtype)

    def forward(self, x):
        if self.merged:
            return self.base(x)
        h = F.linear(self.dropout(x), self.A.to(x.dtype))  # (..., r)
        return self.base(x) + F.linear(h, self.B.to(x.dtype)) * self.scaling  # (..., out)

    def extra_repr(self):
        out_f, in_f = self.weight_shape
        return f"{out_f}x{in_f}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict:
    """name -> LoRALinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _swap(model: nn.Module, name: str, new: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def add_lora(model: nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.1, targets=PROJECTIONS,
             seed: int = 0, verbose=True) -> dict:
    """Freeze the model and wrap each targeted linear in a LoRALinear. Returns name -> layer."""
    for p in model.parameters():
        p.requires_grad_(False)
    linears = target_linears(model, targets)
    if not linears:
        raise ValueError(f"no linear layer named one of {targets} in the model (LoRA already added?)")
    g = torch.Generator().manual_seed(seed)
    for name, base in linears.items():
        _swap(model, name, LoRALinear(base, rank, alpha, dropout, generator=g))
    layers = lora_layers(model)
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # a quantized base holds its weight in buffers: count it by shape
        total = sum(p.numel() for p in model.parameters()) + sum(
            m.weight_shape[0] * m.weight_shape[1] for m in model.modules() if hasattr(m, "dequantize"))
        print(f"lora: rank {rank}, alpha {alpha:g} (scaling {alpha / rank:g}), dropout {dropout:g}; "
              f"{trainable:,} trainable of {total:,} parameters ({trainable / total:.3%}) in {len(layers)} matrices")
    return layers


def rank_for_budget(model: nn.Module, num_params: int, targets=PROJECTIONS) -> int:
    """the largest rank whose trainable count is <= num_params (call it before adding LoRA or deltas)."""
    per_rank = lora_param_count(model, 1, targets)  # sum over targets of (in + out)
    if per_rank == 0:
        raise ValueError(f"no linear layer named one of {targets} in the model")
    if num_params < per_rank:
        raise ValueError(f"a budget of {num_params:,} is below LoRA rank 1 ({per_rank:,} parameters)")
    return num_params // per_rank  # the count is linear in the rank


# -----------------------------------------------------------------------------
# merge, unmerge, remove, save, load


@torch.no_grad()
def merge_lora(model: nn.Module):
    """W0 += scaling * B A in place; forward then uses the base alone. Never into a quantized base."""
    for name, layer in lora_layers(model).items():
        if hasattr(layer.base, "dequantize"):
            raise ValueError(f"{name}: refusing to merge into a quantized weight; load the base in full precision")
        if not layer.merged:
            layer.base.weight += layer.delta_weight(layer.base.weight.dtype)
            layer.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module):
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.base.weight -= layer.delta_weight(layer.base.weight.dtype)
            layer.merged = False


def remove_lora(model: nn.Module):
    """put the base linears back in place of the wrappers (a merged base keeps the update: an export)."""
    for name, layer in lora_layers(model).items():
        _swap(model, name, layer.base)


def save_lora(model: nn.Module, path: str, extra: Optional[dict] = None):
    """a safetensors file: per matrix `<name>.A` (r, in) and `<name>.B` (out, r), fp32, plus metadata."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    tensors = {}
    for name, m in layers.items():
        tensors[name + ".A"], tensors[name + ".B"] = m.A.float(), m.B.float()
    first = next(iter(layers.values()))
    write_finetune(model, path, "spiel-lora", layers, tensors,
                   {"rank": str(first.rank), "alpha": str(first.alpha), "dropout": str(first.dropout.p)}, extra)


def load_lora(model: nn.Module, path: str, check_base: bool = True) -> dict:
    """Wrap the linears of a loaded base with the LoRA weights of `path`; returns the metadata. A file
    that does not fit the model (names, shapes) or was trained on another base is an error naming it."""
    tensors, meta, shapes = read_finetune(path, "spiel-lora", "LoRA")
    try:
        rank, alpha, dropout = int(meta["rank"]), float(meta["alpha"]), float(meta.get("dropout", 0.0))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: bad metadata ({e})") from None
    for name, (o, i) in shapes.items():
        A, B = tensors.get(name + ".A"), tensors.get(name + ".B")
        if A is None or B is None or A.shape != (rank, i) or B.shape != (o, rank):
            raise CheckpointError(f"{path}: {name} needs .A ({rank}, {i}) and .B ({o}, {rank})")
    modules = check_fits(model, path, shapes, meta, check_base, "LoRA")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in shapes:
        layer = LoRALinear(modules[name], rank, alpha, dropout)
        with torch.no_grad():
            layer.A.copy_(tensors[name + ".A"])
            layer.B.copy_(tensors[name + ".B"])
        _swap(model, name, layer)
    return meta
