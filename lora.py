"""
LoRA, the baseline SpIEL is compared against: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv 2106.09685, section 4.1. Each targeted frozen weight W0 (out, in) gets
W = W0 + (alpha / r) B A with A (r, in) and B (out, r) trainable; B = 0 at the start, so W = W0.
It targets the same projections as spiel.py (llama.target_linears), and finetune.py saves and reads both.
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama import matrix_shape, swap_module, target_linears


class LoRALinear(nn.Module):
    """a frozen base linear (nn.Linear or a quantized one) plus the low-rank update scaling * B A."""

    def __init__(self, base: nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.1,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        out_f, in_f = self.weight_shape = matrix_shape(base)
        device = next(base.buffers()).device if hasattr(base, "dequantize") else base.weight.device
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        # A as in the paper's code (kaiming-uniform, a = sqrt(5)), drawn on the CPU so CPU and GPU runs agree;
        # B = 0. both fp32 whatever the base dtype
        a = torch.empty(rank, in_f, device="cpu" if device.type != "meta" else "meta")
        if device.type != "meta":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(a.to(device))  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_f, rank, device=device))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # on the low-rank path's input only

    def forward(self, x):
        h = F.linear(self.dropout(x), self.A.to(x.dtype))  # (..., r)
        return self.base(x) + F.linear(h, self.B.to(x.dtype)) * self.scaling  # (..., out)

    def extra_repr(self):
        out_f, in_f = self.weight_shape
        return f"{out_f}x{in_f}, rank={self.rank}, alpha={self.alpha:g}"


def lora_layers(model: nn.Module) -> dict:
    """name -> LoRALinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, targets, rank: int, alpha: float = 16.0, dropout: float = 0.1, seed: int = 0) -> dict:
    """freeze the model and wrap each linear named in `targets` (e.g. llama.PROJECTIONS) in a LoRALinear.
    -> name -> layer"""
    model.requires_grad_(False)
    linears = target_linears(model, targets)
    if not linears:
        raise ValueError("no targeted linear layer in the model (LoRA already added?)")
    g = torch.Generator().manual_seed(seed)
    for name, base in linears.items():
        swap_module(model, name, LoRALinear(base, rank, alpha, dropout, generator=g))
    return lora_layers(model)


def summary(model: nn.Module) -> str:
    """the adapters' rank and where they sit ("" for a model without LoRA)."""
    layers = lora_layers(model)
    if not layers:
        return ""
    m = next(iter(layers.values()))
    projections = dict.fromkeys(n.rpartition(".")[2] for n in layers)
    return (f"LoRA: rank {m.rank}, alpha {m.alpha:g} (scaling {m.scaling:g}), on {len(layers)} matrices "
            f"({', '.join(projections)})")


def rank_for_budget(model: nn.Module, targets, num_params: int) -> int:
    """the largest rank whose trainable count on the targets is <= num_params (call it before adding LoRA)."""
    per_rank = sum(sum(matrix_shape(m)) for m in target_linears(model, targets).values())  # in + out per matrix
    if num_params < per_rank:
        raise ValueError(f"a budget of {num_params:,} is below LoRA rank 1 ({per_rank:,} parameters)")
    return num_params // per_rank


@torch.no_grad()
def merge_lora(model: nn.Module):
    """W0 += scaling B A (in fp32, rounded once); the plain linears are put back. Never into a quantized base."""
    for name, layer in lora_layers(model).items():
        if hasattr(layer.base, "dequantize"):
            raise ValueError(f"{name}: refusing to merge into a quantized weight; load the base in full precision")
        w = layer.base.weight
        w.copy_(w.float() + layer.scaling * (layer.B.float() @ layer.A.float()))
        swap_module(model, name, layer.base)


def lora_tensors(model: nn.Module) -> tuple:
    """(name -> (A (r, in), B (out, r)) fp32 of every LoRA layer, in model order; {"rank", "alpha", "dropout"})."""
    layers = lora_layers(model)
    first = next(iter(layers.values()), None)
    hyper = {} if first is None else {"rank": first.rank, "alpha": first.alpha, "dropout":
                                      first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0}
    return {name: (m.A.float(), m.B.float()) for name, m in layers.items()}, hyper


@torch.no_grad()
def attach_lora(model: nn.Module, adapters: dict, rank: int, alpha: float, dropout: float = 0.0) -> dict:
    """freeze the model and wrap each linear named in `adapters` (name -> (A, B), shapes checked by the caller)
    in a LoRALinear holding them. -> name -> layer"""
    modules = dict(model.named_modules())
    model.requires_grad_(False)
    for name, (A, B) in adapters.items():
        layer = LoRALinear(modules[name], rank, alpha, dropout).train(model.training)  # (eval: no dropout)
        layer.A.copy_(A)
        layer.B.copy_(B)
        swap_module(model, name, layer)
    return lora_layers(model)
