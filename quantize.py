"""
Weight-only quantization of the frozen base weights W0: int8 (symmetric absmax per row) and NF4 with
double quantization, as in QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3). It backs qSpIEL
(the SpIEL paper, arXiv 2401.16405: sparse fine-tuning on top of a quantized base).

Quantization here is about memory, not speed: the forward dequantizes the whole weight to the input's
dtype and calls a dense matmul, keeping nothing dense between calls. Deltas are never merged into a
quantized weight (4-bit rounding would erase them); to merge, load the base in full precision.

Layout (as gpt-fast's): pure quantize/dequantize functions -> QuantLinear (buffers only) ->
quantize_model, an explicit recursive swap of the targeted nn.Linear children; it imports nothing of the repo.
Cast the model to its compute dtype *before* quantize_model (a later model.to(bf16) would also cast the fp32
scales).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

NF4_BLOCK = 64  # weights per absmax (QLoRA)
NF4_DQ_BLOCK = 256  # absmax values per second-level scale (QLoRA)
# the 16 NF4 code values: quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0 (QLoRA appendix E;
# the same table as bitsandbytes' CUDA kernels)
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def _safe(scale):  # an all-zero row or block has scale 0: divide by a tiny number instead (0 / tiny = 0)
    return scale.clamp_min(torch.finfo(torch.float32).tiny)


# -----------------------------------------------------------------------------
# int8: symmetric absmax, one fp32 scale per row

CHUNK = 1 << 20  # weights per chunk while quantizing, in reused buffers: a fresh (out, in) temporary costs page
# faults under train.py's 1 MB mmap threshold (NF4 loaded 1.5x slower); 256K chunks took 2x as long (more ops)


def absmax_rows(w):
    """|w|.amax(-1), without an (out, in) temporary for |w|."""
    return torch.maximum(w.amax(-1), w.amin(-1).neg_())


def quantize_int8(w):
    w = w.float()
    scales = absmax_rows(w) / 127  # (out,)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    rows = max(1, CHUNK // w.shape[1])
    buf = torch.empty(min(rows, w.shape[0]), w.shape[1], device=w.device)
    for i in range(0, w.shape[0], rows):
        part = torch.div(w[i:i + rows], _safe(scales[i:i + rows])[:, None], out=buf[:min(rows, w.shape[0] - i)])
        q[i:i + rows] = part.round_().clamp_(-127, 127)
    return q, scales


def dequantize_int8(q, scales, dtype):
    return (q.float() * scales[:, None]).to(dtype)  # (out, in)


# -----------------------------------------------------------------------------
# nf4: absmax per block of 64 over the flattened weight, nearest code, two codes per byte; the absmax
# values themselves quantized to int8 per group of 256 after centering ("double quantization")


def nf4_thresholds() -> torch.Tensor:
    """(15,) the points where the nearest code changes: x >= t[i] is nearer code i + 1 than code i. Each is the
    midpoint of two codes, moved to where float32's |x - code| says so (ties to the lower code), so counting
    the thresholds at or below x gives exactly the argmin over the 16 distances."""
    out, up, down = [], torch.tensor([2.0]), torch.tensor([-2.0])
    for lo, hi in zip(NF4_CODE[:-1, None], NF4_CODE[1:, None]):  # (1,) each
        nearer_hi = lambda x: bool((x - hi).abs() < (x - lo).abs())  # noqa: E731
        t = (lo + hi) / 2
        while nearer_hi(torch.nextafter(t, down)):
            t = torch.nextafter(t, down)
        while not nearer_hi(t):
            t = torch.nextafter(t, up)
        out.append(t)
    return torch.cat(out)


NF4_THRESHOLDS = nf4_thresholds().tolist()

def quantize_nf4(w):
    if w.numel() % NF4_BLOCK:
        raise ValueError(f"nf4: weight of shape {tuple(w.shape)} does not split into blocks of {NF4_BLOCK}")
    blocks = w.float().reshape(-1, NF4_BLOCK)  # (n_blocks, 64)
    absmax = absmax_rows(blocks)  # (n_blocks,)
    # a chunk at a time: scaled to [-1, 1], the nearest code (ties to the lower one) by counting the thresholds
    # each weight reaches (15 compares, 6x faster than the 16 distances and their argmin), two codes a byte
    n, per = blocks.shape[0], CHUNK // NF4_BLOCK
    qweight = torch.empty(n, NF4_BLOCK // 2, dtype=torch.uint8, device=w.device)  # (n_blocks, 32)
    x = torch.empty(min(n, per), NF4_BLOCK, device=w.device)
    code, reached = torch.empty_like(x, dtype=torch.uint8), torch.empty_like(x, dtype=torch.bool)
    for i in range(0, n, per):
        m = min(per, n - i)
        xs = torch.div(blocks[i:i + m], _safe(absmax[i:i + m])[:, None], out=x[:m])
        cs = code[:m].zero_()
        for t in NF4_THRESHOLDS:
            cs += torch.ge(xs, t, out=reached[:m])
        torch.bitwise_or(cs[:, 0::2] << 4, cs[:, 1::2], out=qweight[i:i + m])  # the first of a pair: high nibble
    # double quantization: QLoRA uses an 8-bit float code here; int8 is simpler and costs the same memory.
    # the last group is zero-padded; its padded shape (groups, 256) tells dequantize the layout
    mean = absmax.mean()
    n_groups = -(-absmax.numel() // NF4_DQ_BLOCK)
    centered = F.pad(absmax - mean, (0, n_groups * NF4_DQ_BLOCK - absmax.numel())).view(n_groups, NF4_DQ_BLOCK)
    scales = centered.abs().amax(-1) / 127  # (groups,)
    absmax_q = torch.round(centered / _safe(scales)[:, None]).clamp(-127, 127).to(torch.int8)
    return dict(qweight=qweight, absmax_q=absmax_q, absmax_scales=scales, absmax_mean=mean)


def dequantize_nf4(qweight, absmax_q, absmax_scales, absmax_mean, shape, dtype):
    n_blocks = qweight.shape[0]
    absmax = (absmax_q.float() * absmax_scales[:, None]).view(-1)[:n_blocks] + absmax_mean  # (n_blocks,)
    idx = torch.stack([qweight >> 4, qweight & 0xF], -1).view(n_blocks, -1)  # (n_blocks, 64)
    return (NF4_CODE.to(qweight.device)[idx.long()] * absmax[:, None]).view(shape).to(dtype)


# -----------------------------------------------------------------------------
# the module: quantized weight in buffers, dense weight only inside forward and backward

class DequantLinearFn(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly, in forward and again in backward: left to autograd, F.linear
    would keep each layer's dense W from forward to backward (for dx), a dense copy of the whole base."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.layer.dequantize(dy.dtype), None  # W0 is frozen: no gradient for it


class QuantLinear(nn.Module):
    def __init__(self, in_features, out_features, mode, device=None, bias: bool = False):
        super().__init__()
        if mode not in ("int8", "nf4"):
            raise ValueError(f"unknown quantization mode {mode!r}, expected 'int8' or 'nf4'")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.dtype = torch.get_default_dtype()  # the compute dtype of dequantize(), set by load_weight
        if mode == "int8":  # empty buffers of the final shapes, so load_state_dict works on a fresh module
            buffers = dict(qweight=((out_features, in_features), torch.int8), scales=((out_features,), torch.float32))
        else:
            if (out_features * in_features) % NF4_BLOCK:
                raise ValueError(f"nf4: weight of shape {(out_features, in_features)} does not split into blocks "
                                 f"of {NF4_BLOCK}")
            n_blocks = out_features * in_features // NF4_BLOCK
            buffers = dict(qweight=((n_blocks, NF4_BLOCK // 2), torch.uint8),
                           absmax_q=((-(-n_blocks // NF4_DQ_BLOCK), NF4_DQ_BLOCK), torch.int8),
                           absmax_scales=((-(-n_blocks // NF4_DQ_BLOCK),), torch.float32),
                           absmax_mean=((), torch.float32))
        for name, (size, dt) in buffers.items():
            self.register_buffer(name, torch.empty(size, dtype=dt, device=device))
        # a bias (Qwen2's q, k, v) stays in full precision, frozen
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @property
    def weight_shape(self):
        return (self.out_features, self.in_features)

    @torch.no_grad()
    def load_weight(self, w):
        """quantize a full-precision (out, in) weight; new tensors on w's device replace the buffers."""
        if tuple(w.shape) != self.weight_shape:
            raise ValueError(f"load_weight: expected shape {self.weight_shape}, got {tuple(w.shape)}")
        quantized = dict(zip(("qweight", "scales"), quantize_int8(w))) if self.mode == "int8" else quantize_nf4(w)
        for name, t in quantized.items():
            setattr(self, name, t)
        self.dtype = w.dtype

    def dequantize(self, dtype=None):
        dtype = dtype or self.dtype
        if self.mode == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_nf4(self.qweight, self.absmax_q, self.absmax_scales, self.absmax_mean, self.weight_shape,
                              dtype)

    def forward(self, x):
        return DequantLinearFn.apply(x, self)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize_model(model, mode, targets):
    """replace, in place, every nn.Linear child named one of `targets` (e.g. llama.PROJECTIONS) with a QuantLinear
    (one on the meta device stays empty: the loader fills it)."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear) and name in targets:
            q = QuantLinear(child.in_features, child.out_features, mode, child.weight.device)
            q.dtype, q.bias = child.weight.dtype, None if child.bias is None else child.bias.requires_grad_(False)
            if not child.weight.is_meta:
                q.load_weight(child.weight)
            setattr(model, name, q)
        else:
            quantize_model(child, mode, targets)
    return model
