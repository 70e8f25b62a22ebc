"""
How much GPU memory fine-tuning a LLaMA-family model needs, estimated before you buy (or rent) the GPU.

    python tools/memory.py --preset 7B --method spiel-ag --quantize int8 --seq-len 2048 --grad-checkpoint
    python tools/memory.py --preset Llama-3.1-8B --method spiel-ma --quantize nf4 --grad-checkpoint
    python tools/memory.py --ckpt Qwen2.5-7B-Instruct --method spiel-ag --quantize int8 --grad-checkpoint
    python tools/memory.py --table                    # the README's: TABLE_PRESETS x 4 methods x 3 base precisions
    python tools/memory.py --measure --json mem.json  # on a GPU: measure a 7B-shaped model (or --preset's)

The arithmetic is SpIEL's (Ansell et al. 2024, arXiv 2401.16405, section 3 and its appendix on memory
and speed): the frozen base, k sparse deltas (fp32 value + int32 index), their gradients, the optimizer
state (AdamW with a per-element age for SpIEL-AG, SM3's row/column accumulators for SpIEL-MA), the AG
accumulation window while it is open, activations and transients. Quantized bases are int8 (absmax per
row) or NF4 with double quantization (QLoRA, Dettmers et al. 2023, arXiv 2305.14314, section 3).
A sanity bound for 7B at the paper's budget (159,907,840 deltas): trainable state of 24 B per delta for AG
(value, index, gradient, m, v, age: 3.84 GB) and 12 B for MA (value, index, gradient: 1.92 GB), LoRA 16 B per
parameter (2.56 GB); an open AG window adds 16 B per delta; the base is 13.5 GB in bf16, about 7 GB in int8
and 3.8 GB in NF4 (tests/test_memory.py checks these).

Everything that is a tensor is counted from a real tensor: the model is built on the meta device (shapes
and dtypes, no storage), quantized and given its trainable part exactly as train.py does, one optimizer
step is taken on it (so the optimizer creates its real state) and an AG window is filled from a meta
gradient. Only activations and transients, which exist inside forward and backward, come from a model
of what autograd keeps (`saved_activations` and `loss_bytes` below; tests/test_memory.py checks it against
autograd). So what the family's models differ by is counted as they hold it: grouped-query attention's smaller
k/v projections, q/k/v biases (Qwen2), a tied output head, and a large vocabulary: Llama 3.1's 128,256 and
Qwen2.5's 152,064 rows make the embedding and the output head 1.05 and 1.09 GB each in bf16, and the loss
computes its fp32 logits a chunk at a time (llama.LOSS_CHUNK), so they cost at most 0.8 GB at any length.

Peak = persistent + max(backward phase, optimizer-step phase), where
  persistent     = weights + trainable part + gradients + optimizer state + AG window
  backward phase = saved activations + max(logits, one block's backward + the largest weight transient)
  optimizer step = the optimizer's temporaries for its largest tensor (SpIEL-AG: for one foreach part).
It is an upper bound by design: the gradients, counted as persistent, only fill up during backward.
GB here is 1e9 bytes. --measure checks the goal on one GPU: 7B, int8 base, 2048 tokens, batch 1, grad
checkpointing: SpIEL-MA below 16 GB and SpIEL-AG below 20 GB of torch.cuda.max_memory_allocated.
"""

import argparse
import gc
import inspect
import math
import os
import sys
import time
import weakref

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
import config  # noqa: E402
import files  # noqa: E402
import hub  # noqa: E402
import llama  # noqa: E402
import lora  # noqa: E402
import spiel  # noqa: E402
import system  # noqa: E402
import train  # noqa: E402
from llama import PRESETS, PROJECTIONS, ModelArgs, RMSNorm, Transformer, read_shapes  # noqa: E402
from quantize import quantize_model  # noqa: E402
from sm3 import SM3  # noqa: E402

GB = 1e9
METHODS = ("spiel-ag", "spiel-ma", "lora", "full")
# a CPU run's own memory counts the process itself: python, torch and its libraries, measured in this process
# (which has imported what train.py imports) before any model exists
CPU_RUNTIME = system.anon_rss()
GOALS = {"spiel-ma": 16 * GB, "spiel-ag": 20 * GB}  # 7B, int8 base, seq 2048, batch 1, grad checkpointing
TABLE_PRESETS = ("7B", "Llama-3.1-8B", "Qwen2.5-7B", "13B")  # the README's memory table, by size
# peak bytes per weight element of one dense (out, in) copy of a frozen projection, as quantize.py and
# spiel.py build it: bf16 clone; int8: its fp32 copy and the scaled fp32 product; nf4: the unpacked codes
# (uint8), their int64 copy for the lookup and the fp32 lookup
DEQUANT_BYTES = {None: None, "int8": 8, "nf4": 13}  # None: the compute dtype's size
# SpIEL-AG's window picking a matrix's candidates (spiel.Window.choose, in that matrix's backward, the window's
# first micro-batch), per weight: the merged weight (kept for dx), the dense gradient and its |.|, in the compute
# dtype, and top_k's bool mask (1 B); per delta of the matrix: top_k's work (the positions above its cut and their
# values, the k chosen, sorted). Measured on the CPU, fp32, a (14336, 4096) int8 matrix with 1M to 11M deltas:
# 12.7 B per weight + 51 B per delta above what the matrix keeps (13 and 52 here)
CHOOSE_BYTES = 52  # per delta
# temporaries of one optimizer step on its largest tensor (spiel.AdamW: on one foreach part), per element:
# spiel.AdamW (SpIEL-AG: fp32 grad copy, m_hat, v_hat, the update and its pieces) and SM3 on a sparse delta
# (int64 rows/cols/indices, nu, the update);
# torch.optim.AdamW (LoRA, full; foreach=False) makes sqrt(v) and sqrt(v) / c: two tensors of the parameter's
# dtype, so its entry is a count of parameter-sized elements, not bytes
STEP_BYTES = {"adamw": 24, "sm3": 40}
TORCH_ADAMW_STEP_TENSORS = 2


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# -----------------------------------------------------------------------------
# the model as it will sit in memory: built on the meta device (shapes and dtypes, no storage)


def train_args(method, density=None, lora_rank=64, lora_dropout=0.1, sm3_momentum=0.0, targets="all"):
    """train.py's arguments for this method, budget and targets (its parser is the one source of defaults)."""
    argv = ["--method", method, "--lora-rank", str(lora_rank), "--lora-dropout", str(lora_dropout),
            "--sm3-momentum", str(sm3_momentum), "--targets", targets]
    argv += ["--density", str(density)] if density else ["--match-lora-rank", str(lora_rank)]
    return config.get_parser().parse_args(argv)


def meta_model(args: ModelArgs, method, quantize=None, dtype=torch.bfloat16, window_open=True, targets="all",
               **budget):
    """the model with its trainable part as train.py builds it (train.add_trainable), on the meta device (no
    storage, no random draws), its optimizer with real (meta) state after one step, and an AG window if open."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if quantize and method == "full":
        raise ValueError("full fine-tuning needs a full-precision base (no --quantize)")
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype)  # load_model's layout: weights in the compute dtype, quantized after, rope in fp32
    model.reset_rope("meta")
    if quantize:
        quantize_model(model, quantize, PROJECTIONS)
    _, optimizer, selector = train.add_trainable(model, train_args(method, targets=targets, **budget), total_steps=100)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)  # autograd gives a gradient the dtype of its parameter
    optimizer.step()  # creates the optimizer's state, exactly as on the first real step
    if method == "spiel-ag" and window_open:
        selector.begin_step(1)
        for layer in selector.layers.values():  # the window's first micro-batch picks the candidates
            layer.window.choose(torch.empty(math.prod(layer.weight_shape), dtype=dtype, device="meta"))
    return model, optimizer


def persistent_bytes(model, optimizer) -> dict:
    """the tensors that live through a whole training step, by kind."""
    deltas = {id(t) for m in spiel.delta_layers(model).values() for t in (m.values, m.indices)}
    full = all(p.requires_grad for p in model.parameters())
    out = {"base weights": 0, "other weights": 0, "trainable": 0}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in deltas or (t.requires_grad and not full):
            out["trainable"] += nbytes(t)  # sparse deltas (values, indices) or LoRA's A and B
        elif any(part in PROJECTIONS for part in name.split(".")):
            out["base weights"] += nbytes(t)  # the seven projections: dense or quantized (+ scales)
        else:
            out["other weights"] += nbytes(t)  # embeddings, norms, output head, rope tables
    out["gradients"] = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    out["optimizer state"] = sum(nbytes(v) for st in optimizer.state.values() for v in st.values()
                                 if torch.is_tensor(v))
    out["AG window"] = sum(nbytes(v) for m in spiel.delta_layers(model).values() if m.window
                           for v in vars(m.window).values() if torch.is_tensor(v) and v is not m.indices)
    # a full-precision base holding W0 + delta keeps W0 aside at the k active entries
    out["resident W0"] = sum(m.indices.numel() * m.base.weight.element_size()
                             for m in spiel.delta_layers(model).values() if m.resident)
    return out


# -----------------------------------------------------------------------------
# activations: what autograd keeps from forward to backward (a model, checked by tests/test_memory.py)


def trains_all(method, targets) -> bool:
    """full fine-tuning of every projection: then norms, embeddings and the output head train too."""
    return method == "full" and set(targets) == set(PROJECTIONS)


def saved_activations(args: ModelArgs, method, tokens: int, elem: int, lora_rank=64, lora_dropout=0.1,
                      mask_bytes=1, targets=PROJECTIONS) -> dict:
    """bytes that autograd saves, for one block whose input needs a gradient and for the head; `tokens` is
    batch x sequence length, `elem` the compute dtype's size. Attention is SDPA's flash kernel: no T^2.
    A dropout mask is bool on CUDA (mask_bytes=1); the CPU keeps it in the input's dtype."""
    N, d, f, H, r = tokens, args.dim, args.ffn_dim, args.n_heads, lora_rank
    dkv = args.n_kv_heads * args.head_dim
    every = trains_all(method, targets)  # every weight trains, norms included
    norm = 4 * N * d + 4 * N  # RMSNorm keeps the fp32 copy of its input and 1/rms (N, 1)
    if every:
        norm += elem * N * d  # a trainable gain also keeps the normalised input
    attn = elem * N * (2 * d + 2 * dkv) + 4 * N * H  # flash: q, k (rotated), v, the output, logsumexp fp32
    ffn = 3 * elem * N * f  # SwiGLU: gate (for silu), silu(gate) and up (for the product)
    # the targeted projections' inputs (wo's is the attention output, already counted; a frozen one keeps
    # nothing): the normalised block inputs (each shared by wq/wk/wv and by w1/w3) and the SwiGLU product
    inputs = elem * N * (d * bool({"wq", "wk", "wv"} & set(targets)) + d * bool({"w1", "w3"} & set(targets))
                         + f * ("w2" in targets))
    if method == "lora":  # the frozen base keeps nothing; the low-rank path keeps its input and x A
        all_shapes = {"wq": (d, d), "wk": (dkv, d), "wv": (dkv, d), "wo": (d, d), "w1": (f, d), "w3": (f, d),
                      "w2": (d, f)}  # (out, in)
        shapes = [all_shapes[t] for t in targets]
        if lora_dropout > 0:  # each target drops out its own copy of the input, and keeps the mask
            inputs = sum((elem + mask_bytes) * N * i for _, i in shapes)
        inputs += len(shapes) * elem * N * r  # x A (N, r) for the B matmul
        if elem != 4:  # A and B cast to the compute dtype, kept for the input's gradient
            inputs += sum(elem * r * (o + i) for o, i in shapes)
    head = 4 * N * d + 4 * N  # the final norm
    if every:  # its gain, the output head's input, the embedding's token ids
        head += 2 * elem * N * d + 8 * N
    block = 2 * norm + attn + ffn + inputs
    # the first block's input (the frozen embedding's output) needs no gradient: its first norm keeps nothing,
    # and with no attention projection targeted, neither do its attention and the norm after it
    first = block - norm - (0 if {"wq", "wk", "wv", "wo"} & set(targets) else attn + norm)
    return {"block": block, "first block": block if every else first, "head": head}


def loss_bytes(args: ModelArgs, method, tokens: int, elem: int, targets=PROJECTIONS) -> dict:
    """the loss (llama.Transformer.loss, every position counted as labelled), in chunks of n positions (n x vocab
    = llama.LOSS_CHUNK logits): "saved", what it keeps from forward to backward, and "backward", its peak in
    backward, one chunk at a time: the fp32 log-softmax (n, vocab) saved for backward, its gradient and the
    logits' gradient. Both hold the int64 targets and the bool mask of labelled positions. One chunk saves its
    log-softmax; several are recomputed in backward from the labelled hidden states, which they save (a trained
    output head saves them anyway: saved_activations' "head"), and a trained head's gradient is summed over the
    chunks out of place: the sum so far, the chunk's and the new sum, (vocab, dim) each, the first one counted
    with the gradients. tests/test_memory.py checks "saved" against autograd; "backward" came within 25 MB of a
    CPU process's own memory (glibc's mmap threshold at 1 MB, as train.py sets it) for heads of 128,256 x 512
    (2,048 tokens) and 32,000 x 4,096 (512 tokens, 4 chunks), frozen or trained, fp32 and bf16."""
    N, V = tokens, args.vocab_size
    n = min(N, max(1, llama.LOSS_CHUNK // V))
    ids = 8 * N + N
    if n == N:
        return {"saved": 4 * N * V + ids, "backward": 3 * 4 * N * V + ids}
    if trains_all(method, targets):  # a trained head: each chunk's weight gradient (vocab, dim) joins a sum
        return {"saved": ids, "backward": ids + max(3 * 4 * n * V, 4 * n * V + 2 * elem * V * args.dim)}
    h = elem * N * args.dim
    return {"saved": h + ids, "backward": h + 3 * 4 * n * V + ids}


# -----------------------------------------------------------------------------
# the estimate


def estimate(args: ModelArgs, method: str = "spiel-ag", quantize=None, seq_len: int = 2048, batch_size: int = 1,
             grad_checkpoint: bool = False, density=None, lora_rank: int = 64, lora_dropout: float = 0.1,
             sm3_momentum: float = 0.0, window_open: bool = True, dtype=torch.bfloat16, gpus: int = 1,
             fsdp: bool = False, device: str = "cuda", targets: str = "all") -> dict:
    """peak training memory in bytes per GPU, by kind (see the module docstring for how they add up to "total").

    quantize: None, "int8" or "nf4" (the frozen projections). SpIEL's budget is `density` of the targeted
    weights, else as many deltas as LoRA of rank `lora_rank` trains (the paper's: 64); targets: train.py's
    --targets (all, attention, mlp, or a list of projections). gpus > 1: torchrun's
    data parallel, everything replicated; with fsdp the weights FSDP holds (the parameters: a quantized
    base's buffers stay replicated; the trainable deltas / adapters are left whole) are split over the GPUs,
    and the block being computed is whole again (with the next one prefetched)."""
    quantize = None if quantize in (None, "none", "bf16") else quantize
    targets = config.parse_targets(targets)
    model, optimizer = meta_model(args, method, quantize, dtype, window_open, targets, density=density,
                                  lora_rank=lora_rank, lora_dropout=lora_dropout, sm3_momentum=sm3_momentum)
    est = persistent_bytes(model, optimizer)
    if device == "cpu":  # (train.py on a CPU computes in fp32: the caller passes dtype)
        est["runtime"] = CPU_RUNTIME
        # the sparse value gradient's cached patterns (spiel.csr_pattern): row pointers and a column per delta,
        # int32; an open AG window keeps its candidates' too
        est["sparse patterns"] = sum(4 * (m.weight_shape[0] + 1 + m.indices.numel()) * (1 + bool(m.window))
                                     for m in spiel.delta_layers(model).values()
                                     if spiel.use_sparse_path(m, torch.device("cpu")))
    if fsdp and gpus > 1:
        est["resident W0"] = 0  # a sharded base cannot hold the deltas: the transient merged weight instead
        est["unsharded blocks"] = 2 * est["base weights"] // args.n_layers if not quantize else 0  # (whole, x2)
        est["base weights"] //= 1 if quantize else gpus
        est["other weights"] //= gpus
        if method == "full":  # every weight is sharded, with its gradient and optimizer state
            est["unsharded blocks"] = 2 * (est["base weights"] * gpus) // args.n_layers
            est["gradients"] //= gpus
            est["optimizer state"] //= gpus
    if method == "lora":  # a SpIEL budget (density) sets LoRA's rank, as in train.py: model the rank it got
        lora_rank = next(iter(lora.lora_layers(model).values())).rank
    elem, N, L = torch.finfo(dtype).bits // 8, batch_size * seq_len, args.n_layers
    act = saved_activations(args, method, N, elem, lora_rank, lora_dropout, targets=targets.split(","))
    if grad_checkpoint:  # each block keeps only its input; its activations come back one block at a time
        est["activations"] = L * elem * N * args.dim + act["head"]
        block = act["block"]
    else:
        est["activations"] = act["first block"] + (L - 1) * act["block"] + act["head"]
        block = 0
    est["logits"] = loss_bytes(args, method, N, elem, targets.split(","))["backward"]
    # one block's backward: its (recomputed) activations and the activation gradients in flight (the
    # SwiGLU's three (N, ffn) gradients and two (N, dim) ones)
    est["block backward"] = block + 3 * elem * N * args.ffn_dim + 2 * elem * N * args.dim
    # the largest dense (out, in) temporary: a dequantized / merged weight (forward, backward), the dense weight
    # gradient of a sparse delta, or an open AG window picking its candidates (CHOOSE_BYTES)
    largest = args.dim * max(args.dim, args.ffn_dim)  # w1, w2, w3: (ffn, dim) or (dim, ffn)
    targeted = max(math.prod(m.weight_shape) for m in spiel.delta_layers(model).values()) \
        if method.startswith("spiel") else largest  # (the largest matrix with deltas)
    dequant = DEQUANT_BYTES[quantize] or elem
    per_elem = {"spiel-ag": max(dequant, 2 * elem), "spiel-ma": max(dequant, elem)}.get(method, 0)
    est["weight transient"] = max(largest * (DEQUANT_BYTES[quantize] or 0), targeted * per_elem)
    if method == "spiel-ag" and window_open:
        est["weight transient"] = max([est["weight transient"]] + [
            (3 * elem + 1) * math.prod(m.weight_shape) + CHOOSE_BYTES * m.indices.numel()
            for m in spiel.delta_layers(model).values()])
    biggest = max((p for g in optimizer.param_groups for p in g["params"]), key=torch.Tensor.numel)
    per_elem = STEP_BYTES["sm3"] if isinstance(optimizer, SM3) else STEP_BYTES["adamw"] \
        if isinstance(optimizer, spiel.AdamW) else TORCH_ADAMW_STEP_TENSORS * biggest.element_size()
    # spiel.AdamW steps many matrices per foreach call: up to spiel.AdamW.part deltas share the temporaries
    n_all = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    counted = max(biggest.numel(), min(n_all, spiel.AdamW.part)) if isinstance(optimizer, spiel.AdamW) else \
        biggest.numel()
    est["optimizer step"] = counted * per_elem
    persistent = sum(est.get(k, 0) for k in ("base weights", "other weights", "trainable", "gradients",
                                             "optimizer state", "AG window", "resident W0", "unsharded blocks",
                                             "runtime", "sparse patterns"))
    backward = est["activations"] + max(est["logits"], est["block backward"] + est["weight transient"])
    est["total"] = persistent + max(backward, est["optimizer step"])
    return est


NOTES = {
    "base weights": "the seven projections of every block (bf16, or int8/nf4 + scales)",
    "other weights": "embeddings, norms, output head (compute dtype), rope tables",
    "trainable": "deltas: fp32 values + int32 indices; LoRA: fp32 A and B; full: 0 (the weights)",
    "gradients": "of the trainable tensors, in their dtype",
    "optimizer state": "AG: AdamW m, v, age (fp32); MA: SM3 row + col (+ momentum); LoRA/full: m, v (param dtype)",
    "AG window": "while open, per delta: candidate (int32, as the indices), fp32 step/grad/square sums",
    "runtime": "CPU: the process before any model (interpreter, torch, its libraries), measured here",
    "sparse patterns": "CPU, below 8% density: the sampled gradient's cached patterns, 4 B per delta (x2 in a window)",
    "activations": "saved for backward: block inputs (checkpointing) or every block's tensors",
    "logits": "fp32 log-softmax and two gradients of its size (a loss chunk's tokens x vocab)",
    "block backward": "one block recomputed + activation gradients in flight",
    "weight transient": "the largest dense (out, in) temporary: dequantized/merged weight, dense grad, AG choosing",
    "optimizer step": "temporaries of the step on the largest tensor or foreach part (after backward)",
    "unsharded blocks": "--fsdp: one block's weights gathered whole, and the next one prefetched",
    "resident W0": "SpIEL on a full-precision base: W0 at each delta, in the base's dtype (spiel.py section 9)",
}


def model_name(preset: str) -> str:
    """a preset as people call the model: "7B" is LLaMA 2 7B, "Llama-3.1-8B" is itself."""
    return f"LLaMA 2 {preset}" if preset[0].isdigit() else preset


def fmt(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.2f} MB"


def describe(est: dict, title: str) -> str:
    unit, scale = ("GB", GB) if est["total"] >= 0.1 * GB else ("MB", 1e6)  # MB for the tiny test models
    lines = [title, f"  {'':18s} {unit:>7s}"]
    for k, v in est.items():
        if k == "total":
            continue
        overlap = "  }" if k in ("logits", "block backward", "weight transient", "optimizer step") else "   "
        lines.append(f"  {k:18s} {v / scale:7.2f}{overlap} {NOTES[k]}")
    lines.append("  (the lines marked } are not all alive at once: peak = persistent + max(activations + max(logits,"
                 "\n   block backward + weight transient), optimizer step))")
    lines.append(f"  {'peak estimate':18s} {est['total'] / scale:7.2f}")
    return "\n".join(lines)


def table(seq_len=2048, batch_size=1) -> str:
    """the README's table: peak GB for TABLE_PRESETS, every method and base, grad checkpointing on."""
    lines = ["| model | method | bf16 base | int8 base | nf4 base |", "|---|---|---:|---:|---:|"]
    for preset in TABLE_PRESETS:
        for method in METHODS:
            cells = []
            for q in (None, "int8", "nf4"):
                if method == "full" and q:
                    cells.append("n/a")
                    continue
                cells.append(f"{estimate(PRESETS[preset], method, q, seq_len, batch_size, True)['total'] / GB:.1f} GB")
            lines.append(f"| {preset} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gpu_table(seq_len=2048, batch_size=1) -> str:
    """the README's torchrun table: peak GB per GPU for 13B and 70B in bf16 on 1, 2, 4, 8 GPUs, without and
    with --fsdp (grad checkpointing, the paper's budget)."""
    counts = (1, 2, 4, 8)
    lines = ["| model | method | " + " | ".join(f"{n} GPU{'s' * (n > 1)}" for n in counts) + " | " +
             " | ".join(f"{n} GPUs --fsdp" for n in counts[1:]) + " |", "|---|---|" + "---:|" * (2 * len(counts) - 1)]
    for preset in ("13B", "70B"):
        for method in METHODS:
            cells = [estimate(PRESETS[preset], method, None, seq_len, batch_size, True, gpus=n, fsdp=fsdp)["total"]
                     for fsdp, ns in ((False, counts), (True, counts[1:])) for n in ns]
            lines.append(f"| {preset} | {method} | " + " | ".join(f"{c / GB:.1f}" for c in cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the measurement (GPU): a random-weight model of the preset's shapes, a few steps of SpIEL-AG and -MA


def random_model(args: ModelArgs, device, dtype, quantize=None, seed=0) -> Transformer:
    """random weights of the preset's shapes made on `device` one tensor at a time (never a whole bf16 copy:
    each projection is quantized right after it is drawn)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype)
    if quantize:
        quantize_model(model, quantize, PROJECTIONS)
    for module in model.modules():
        if hasattr(module, "load_weight"):
            module.load_weight(torch.randn(module.weight_shape, device=device, dtype=dtype) * 0.02)
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(module, RMSNorm):
                t = torch.ones(p.shape, device=device, dtype=dtype)
            else:
                t = torch.randn(p.shape, device=device, dtype=dtype) * 0.02
            setattr(module, name, nn.Parameter(t, requires_grad=False))
    if args.tie_embeddings:  # one matrix, two uses (each module got its own tensor above)
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"tensors left on the meta device: {left[:3]}"
    return model


def measure(args: ModelArgs, device="cuda", quantize="int8", seq_len=2048, batch_size=1, steps=8, lora_rank=64,
            density=None, json_path=None, seed=0) -> dict:
    """train SpIEL-AG, then SpIEL-MA, for `steps` steps on random tokens with grad checkpointing (schedule:
    reselections at steps 2 and 6; AG's windows are open on steps 1-2 and 4-6) and report the peak of
    torch.cuda.max_memory_allocated, tokens/s and the estimate side by side."""
    cuda = str(device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --measure needs a CUDA GPU and this machine has none (the estimate itself, "
                         "without --measure, runs anywhere)")
    dtype = system.default_dtype(device)  # bf16 on the GPU, as train.py; fp32 on the CPU (its bf16 matmuls crawl)
    seq_len = min(seq_len, args.max_seq_len)
    t0 = time.time()
    model = random_model(args, device, dtype, quantize, seed)
    model.grad_checkpoint = True
    model.train()
    print(f"random {args.n_layers}-layer model (dim {args.dim}) on {device}, {dtype}, base {quantize or 'dense'}, "
          f"built in {time.time() - t0:.1f}s; {batch_size} x {seq_len} tokens per step, grad checkpointing")
    report = {"device": torch.cuda.get_device_name() if cuda else str(device), "dtype": str(dtype),
              "quantize": quantize, "seq_len": seq_len, "batch_size": batch_size, "steps": steps,
              "grad_checkpoint": True, "runs": {}}
    for method in ("spiel-ag", "spiel-ma"):
        est = estimate(args, method, quantize, seq_len, batch_size, True, density, lora_rank, dtype=dtype)
        try:
            run = measure_one(model, method, cuda, seq_len, batch_size, steps, lora_rank, density, seed)
        except torch.cuda.OutOfMemoryError as e:  # still report (and try the other method)
            run = {"oom": str(e).splitlines()[0], "peak_allocated": torch.cuda.max_memory_allocated()}
        alive = [weakref.ref(m) for m in spiel.delta_layers(model).values()]
        spiel.remove_deltas(model)  # back to the bare base
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        # the goal is 7B's (int8, 2048 tokens); another shape is measured against its estimate only
        run.update(estimate=est["total"], estimate_breakdown=est, goal=GOALS[method] if args == PRESETS["7B"] else None)
        report["runs"][method] = run
        if "oom" in run:
            print(f"{method}: out of memory at {fmt(run['peak_allocated'])} (estimate {fmt(est['total'])})")
            continue
        # nothing of this run may outlive it (it would count in the next run's peak)
        assert all(r() is None for r in alive), "the deltas of the last run are still referenced"
        run["estimate_persistent"] = {k: est[k] for k in run["live_persistent"]}
        peak = "n/a (cpu)" if run["peak_allocated"] is None else fmt(run["peak_allocated"])
        print(f"{method}: peak allocated {peak}, estimate {fmt(est['total'])}, {run['tokens_per_s']:,.0f} tokens/s, "
              f"loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}, reselections {run['reselections']}")
        if run["layer_caches"]:
            print(f"  note: the delta layers also hold {fmt(run['layer_caches'])} of cached tensors (not estimated)")
    if cuda:
        for method, run in [(m, r) for m, r in report["runs"].items() if r["goal"]]:
            ok = "oom" not in run and run["peak_allocated"] < run["goal"]
            print(f"goal {method} < {run['goal'] / GB:.0f} GB: {'met' if ok else 'NOT met'} "
                  f"({fmt(run['peak_allocated'])} measured, {fmt(run['estimate'])} estimated)")
    if json_path:
        files.write_json(json_path, report)
    return report


def measure_one(model, method, cuda, seq_len, batch_size, steps, lora_rank, density, seed) -> dict:
    """`steps` training steps of one SpIEL method, as train.py runs them (one micro-batch per step)."""
    a = train_args(method, density=density, lora_rank=lora_rank)
    a.reselect_every, a.first_reselect = 4, 2
    _, optimizer, selector = train.add_trainable(model, a, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.buffers()).device
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, changed, t_start = [], {}, time.time()
    for t in range(1, steps + 1):
        if t == 2:  # step 1 warms up (kernels, allocator): time the rest
            if cuda:
                torch.cuda.synchronize()
            t_start = time.time()
        tokens = torch.randint(model.args.vocab_size, (batch_size, seq_len + 1), generator=gen).to(device)
        n = tokens[:, 1:].numel()
        loss, _, reselected = train.train_step(t, [model(tokens[:, :-1], tokens[:, 1:], reduction="sum")[1]], n,
                                               [layer.values for layer in selector.layers.values()], optimizer,
                                               selector)
        if reselected:  # drop and regrow
            changed[t] = sum(reselected[0].values())
        losses.append(loss)
    if cuda:
        torch.cuda.synchronize()
    timed = max(steps - 1, 1)
    return {"peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
            "tokens_per_s": timed * batch_size * seq_len / (time.time() - t_start), "losses": losses,
            "reselections": changed,
            "live_persistent": persistent_bytes(model, optimizer),  # after the run: no gradients, windows closed
            "layer_caches": layer_caches(model)}


def layer_caches(model) -> int:
    """bytes the delta layers hold in plain attributes (caches, e.g. a sparse pattern): not estimated, so a
    measurement above the estimate by about this much says where the difference is."""
    tensors = {}
    for layer in spiel.delta_layers(model).values():
        for name, v in vars(layer).items():
            if name not in ("_parameters", "_buffers", "_modules", "window"):
                for t in (v if isinstance(v, (tuple, list)) else [v]):
                    if torch.is_tensor(t) and t.layout == torch.sparse_csr:  # (its values: one broadcast zero)
                        parts = (t.crow_indices(), t.col_indices())
                    else:
                        parts = [t] if torch.is_tensor(t) else []
                    for p in parts:
                        tensors[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(tensors.values())


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    defaults = {k: p.default for k, p in inspect.signature(estimate).parameters.items()}  # one source of defaults
    ap = config.Parser(prog="tools/memory.py", description=__doc__)
    a = ap.add_argument
    a("--preset", default="7B", choices=list(PRESETS), help="model shapes (ignored with --ckpt)")
    a("--ckpt", help="read the shapes from this checkpoint folder instead of a preset")
    a("--method", default=defaults["method"], choices=METHODS)
    a("--quantize", choices=["none", "int8", "nf4"], help="how the frozen base is stored (default: none; "
      "--measure: int8)")
    a("--seq-len", type=config.COUNT, default=defaults["seq_len"])
    a("--batch-size", type=config.COUNT, default=defaults["batch_size"], help="sequences per micro-batch")
    a("--grad-checkpoint", action="store_true", help="recompute each block in backward (as train.py's flag)")
    a("--density", type=config.FRACTION, default=defaults["density"], help="SpIEL budget as a fraction of the targeted "
      "weights (default: as many deltas as LoRA of --lora-rank trains)")
    a("--lora-rank", type=config.COUNT, default=defaults["lora_rank"])
    a("--targets", type=config.parse_targets, default=defaults["targets"], help="as train.py's --targets")
    a("--lora-dropout", type=config.BELOW_1, default=defaults["lora_dropout"])
    a("--sm3-momentum", type=config.BELOW_1, default=defaults["sm3_momentum"])
    a("--table", action="store_true", help=f"print the markdown table of {'/'.join(TABLE_PRESETS)} x methods x "
      "bases and exit")
    a("--gpus", type=config.COUNT, default=1, help="per-GPU estimate for torchrun on this many GPUs")
    a("--fsdp", action="store_true", help="with --gpus: the base sharded by FSDP (train.py --fsdp)")
    a("--gpu-table", action="store_true", help="print the markdown table of 13B/70B x methods x GPUs and exit")
    a("--measure", action="store_true", help="GPU: measure SpIEL-AG and -MA on a random-weight model")
    a("--json", help="--measure: write the results here")
    a("--steps", type=config.COUNT, default=8, help=argparse.SUPPRESS)
    a("--device", default="cuda", choices=["cuda", "cpu"], help="where it trains: cuda (bf16 compute), or cpu (fp32 "
      "compute as train.py there, plus the process itself and the sparse gradient's caches: fullsize.py checks it)")
    args = ap.parse_args(argv)
    quantize = None if args.quantize in (None, "none") else args.quantize
    if args.table:
        print(f"Peak GPU memory (estimate, GB = 1e9 bytes), seq {args.seq_len}, batch {args.batch_size}, "
              f"grad checkpointing, SpIEL and LoRA at the paper's budget (LoRA rank 64):\n")
        print(table(args.seq_len, args.batch_size))
        return 0
    if args.gpu_table:
        print(f"Peak memory per GPU (estimate, GB = 1e9 bytes) under torchrun, bf16 base, seq {args.seq_len}, batch "
              f"{args.batch_size} per GPU, grad checkpointing, the paper's budget (LoRA rank 64):\n")
        print(gpu_table(args.seq_len, args.batch_size))
        return 0
    margs = read_shapes(hub.resolve(args.ckpt)) if args.ckpt else PRESETS[args.preset]
    if args.measure:
        if args.json:
            files.check_writable(args.json, "--json", folder=False)  # (before the minutes of measuring)
        measure(margs, args.device, "int8" if args.quantize is None else quantize, args.seq_len, args.batch_size,
                args.steps, args.lora_rank, args.density, args.json)
        return 0
    est = estimate(margs, args.method, quantize, args.seq_len, args.batch_size, args.grad_checkpoint, args.density,
                   args.lora_rank, args.lora_dropout, args.sm3_momentum, gpus=args.gpus, fsdp=args.fsdp,
                   targets=args.targets,
                   dtype=torch.float32 if args.device == "cpu" else torch.bfloat16, device=args.device)
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(margs).parameters())
    print(describe(est, f"{args.ckpt or model_name(args.preset)} ({n / 1e9:.2f}B parameters): {args.method}, base "
                        f"{args.quantize if quantize else 'bf16'}, {args.batch_size} x {args.seq_len} tokens, grad "
                        f"checkpointing {'on' if args.grad_checkpoint else 'off'}" + (f"; per GPU of {args.gpus}"
                        f"{' with --fsdp' if args.fsdp else ''}" if args.gpus > 1 else "")))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (files.CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
