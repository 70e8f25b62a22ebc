"""
Weight-only quantization of the frozen base weights W0: int8 and NF4.

This backs qSpIEL (SpIEL paper, arXiv 2401.16405: sparse fine-tuning on top of a quantized base) and
implements NF4 as in QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3: "4-bit NormalFloat
Quantization" and "Double Quantization"). Int8 is plain symmetric absmax, per row or per group.

Quantization here is about memory, not speed: the forward dequantizes the whole weight to the input's
dtype and calls a dense matmul, keeping nothing dense between calls. Sparse deltas are never merged into
a quantized weight (4-bit rounding would erase them); to merge, dequantize first.

Layout: pure quantize/dequantize functions -> QuantLinear (buffers only, no parameters) ->
quantize_model, an explicit recursive swap of the targeted nn.Linear children.
Note: cast the model to its compute dtype *before* quantize_model; a later model.to(torch.bfloat16)
would also cast the fp32 scale buffers.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# the seven projections of a LLaMA block in Meta naming; embeddings and the output head stay dense
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
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


def _n_blocks(n, block, shape, what):
    if block <= 0 or n % block:
        raise ValueError(f"{what}: weight of shape {tuple(shape)} does not split into blocks of {block}")
    return n // block


def _safe(scale):
    # an all-zero row/block has scale 0; divide by a tiny number instead (0 / tiny = 0)
    return scale.clamp_min(torch.finfo(torch.float32).tiny)


# -----------------------------------------------------------------------------
# int8: symmetric absmax, one scale per row or per group of columns

def quantize_int8(w, group_size=None):
    out, inp = w.shape
    n_groups = 1 if group_size is None else _n_blocks(inp, group_size, w.shape, "int8")
    wg = w.float().reshape(out, n_groups, -1)  # (out, groups, in // groups), fp32 even for bf16 input
    scales = wg.abs().amax(-1) / 127  # (out, groups)
    q = torch.round(wg / _safe(scales)[..., None]).clamp(-127, 127).to(torch.int8)
    scales = scales.squeeze(1) if group_size is None else scales  # (out,) per row
    return q.view(out, inp), scales


def dequantize_int8(q, scales, dtype):
    out, inp = q.shape
    scales = scales.view(out, -1)  # (out, groups)
    w = q.view(out, scales.shape[1], -1).float() * scales[..., None]  # (out, groups, in // groups)
    return w.view(out, inp).to(dtype)


# -----------------------------------------------------------------------------
# nf4: per-block absmax over the flattened weight, nearest code, two codes per byte

def quantize_nf4(w, block_size=NF4_BLOCK, double_quant_block=NF4_DQ_BLOCK):
    n_blocks = _n_blocks(w.numel(), block_size, w.shape, "nf4")
    if block_size % 2:
        raise ValueError(f"nf4: block_size must be even to pack two codes per byte, got {block_size}")
    blocks = w.float().reshape(n_blocks, block_size)  # (n_blocks, block)
    absmax = blocks.abs().amax(-1)  # (n_blocks,)
    x = (blocks / _safe(absmax)[:, None]).view(-1)  # (numel,) in [-1, 1]
    # nearest code by argmin over the 16 distances (ties go to the lower code), in chunks of 1M
    # elements so the (chunk, 16) distance matrix stays small
    code = NF4_CODE.to(w.device)
    idx = torch.cat([(c[:, None] - code).abs().argmin(-1) for c in x.split(1 << 20)]).to(torch.uint8)
    idx = idx.view(n_blocks, block_size // 2, 2)
    # the first element of each pair goes in the high nibble (the bitsandbytes layout)
    state = {"qweight": (idx[..., 0] << 4) | idx[..., 1]}  # (n_blocks, block // 2) uint8
    if double_quant_block is None:
        state["absmax"] = absmax  # (n_blocks,) fp32
        return state
    # double quantization: center the absmax values, then int8 symmetric with one fp32 scale per
    # group of double_quant_block values. QLoRA/bitsandbytes use an 8-bit float code here; int8 is
    # simpler and costs the same memory. The last group is zero-padded; the padded (groups, dq_block)
    # shape is stored so that dequantize can read the layout from the shapes.
    mean = absmax.mean()  # () fp32
    n_groups = -(-n_blocks // double_quant_block)
    centered = F.pad(absmax - mean, (0, n_groups * double_quant_block - n_blocks))
    centered = centered.view(n_groups, double_quant_block)  # (groups, dq_block)
    scales = centered.abs().amax(-1) / 127  # (groups,)
    q = torch.round(centered / _safe(scales)[:, None]).clamp(-127, 127).to(torch.int8)
    state.update(absmax_q=q, absmax_scales=scales, absmax_mean=mean)
    return state


def dequantize_nf4(qstate, shape, dtype):
    packed = qstate["qweight"]  # (n_blocks, block // 2) uint8
    n_blocks = packed.shape[0]
    if "absmax" in qstate:
        absmax = qstate["absmax"]  # (n_blocks,)
    else:
        absmax = qstate["absmax_q"].float() * qstate["absmax_scales"][:, None]  # (groups, dq_block)
        absmax = absmax.view(-1)[:n_blocks] + qstate["absmax_mean"]  # (n_blocks,)
    idx = torch.stack([packed >> 4, packed & 0xF], -1).view(n_blocks, -1)  # (n_blocks, block)
    w = NF4_CODE.to(packed.device)[idx.long()] * absmax[:, None]  # (n_blocks, block) fp32
    return w.view(shape).to(dtype)


# -----------------------------------------------------------------------------
# the module: quantized weight in buffers, dense weight only inside forward

class DequantLinearFn(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly, in forward and again in backward: left to autograd, F.linear
    would keep each layer's dense W from forward to backward (for dx), a dense copy of the whole base."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.layer.dequantize(dy.dtype), None  # W0 is frozen: no gradient for it


class QuantLinear(nn.Module):
    def __init__(self, in_features, out_features, mode, device=None, group_size=None):
        super().__init__()
        if mode not in ("int8", "nf4"):
            raise ValueError(f"unknown quantization mode {mode!r}, expected 'int8' or 'nf4'")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.group_size = group_size  # int8: columns per scale (None: per row); nf4: block (None: 64)
        self.dtype = torch.get_default_dtype()  # compute dtype of dequantize(), set by load_weight
        # empty buffers of the final shapes, so load_state_dict works on a fresh module
        shape = (out_features, in_features)
        if mode == "int8":
            groups = 1 if group_size is None else _n_blocks(in_features, group_size, shape, "int8")
            buffers = dict(qweight=(shape, torch.int8),
                           scales=((out_features,) if group_size is None else (out_features, groups), torch.float32))
        else:
            block = group_size or NF4_BLOCK
            n_blocks = _n_blocks(out_features * in_features, block, shape, "nf4")
            n_groups = -(-n_blocks // NF4_DQ_BLOCK)
            buffers = dict(qweight=((n_blocks, block // 2), torch.uint8),
                           absmax_q=((n_groups, NF4_DQ_BLOCK), torch.int8),
                           absmax_scales=((n_groups,), torch.float32),
                           absmax_mean=((), torch.float32))
        for name, (size, dt) in buffers.items():
            self.register_buffer(name, torch.empty(size, dtype=dt, device=device))

    @property
    def weight_shape(self):
        return (self.out_features, self.in_features)

    @torch.no_grad()
    def load_weight(self, w):
        # quantize a full-precision (out, in) weight; new tensors on w's device replace the buffers
        if tuple(w.shape) != self.weight_shape:
            raise ValueError(f"load_weight: expected shape {self.weight_shape}, got {tuple(w.shape)}")
        if self.mode == "int8":
            self.qweight, self.scales = quantize_int8(w, self.group_size)
        else:
            for name, t in quantize_nf4(w, self.group_size or NF4_BLOCK).items():
                setattr(self, name, t)
        self.dtype = w.dtype

    def dequantize(self, dtype=None):
        dtype = dtype or self.dtype
        if self.mode == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_nf4(dict(self.named_buffers()), self.weight_shape, dtype)

    def forward(self, x):
        return DequantLinearFn.apply(x, self)

    def nbytes(self):
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"group_size={self.group_size}")


def quantize_model(model, mode, targets=None, group_size=None):
    # replace, in place, every nn.Linear child whose attribute name is in targets with a QuantLinear.
    # a Linear on the meta device becomes an empty QuantLinear on meta (the loader fills it later)
    targets = DEFAULT_TARGETS if targets is None else targets
    for name, child in model.named_children():
        if isinstance(child, nn.Linear) and name in targets:
            if child.bias is not None:
                raise ValueError(f"quantize_model: {name} has a bias; QuantLinear supports bias-free layers only")
            q = QuantLinear(child.in_features, child.out_features, mode, child.weight.device, group_size)
            q.dtype = child.weight.dtype
            if not child.weight.is_meta:
                q.load_weight(child.weight)
            setattr(model, name, q)
        else:
            quantize_model(child, mode, targets, group_size)
    return model
