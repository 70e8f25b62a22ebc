"""
Tests for quantize.py: int8 (per-row absmax) and NF4 (QLoRA's 4-bit code, blocks of 64, double-quantized
absmax) against naive references, their storage, QuantLinear as a linear layer with the dequantized weight
(gradient to the input only), quantize_model swapping only the targeted projections, the meta-device build
filled by load_weight, and the state dict through safetensors.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llama import PROJECTIONS
import quantize  # noqa: E402
from quantize import (NF4_CODE, NF4_DQ_BLOCK, QuantLinear, dequantize_int8, dequantize_nf4, quantize_int8,
                      quantize_model, quantize_nf4)

# NF4 table as printed in bitsandbytes' kernels (QLoRA appendix E), kept here as a golden value
NF4_GOLDEN = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def weight(out, inp, seed=0):
    # gaussian weights with a different scale per row and a few outliers, like a real projection
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 0.1
    w.view(-1)[torch.randint(0, out * inp, (8,), generator=g)] *= 20
    return w


# -----------------------------------------------------------------------------
# int8

def test_int8_per_row_roundtrip_within_half_step():
    w = weight(32, 64)
    w[3] = 0  # a zero row must not divide by zero
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (32,) and scales.dtype == torch.float32
    torch.testing.assert_close(scales, w.abs().amax(1) / 127)
    wd = dequantize_int8(q, scales, torch.float32)
    assert torch.isfinite(wd).all() and (wd[3] == 0).all()
    assert ((wd - w).abs() <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert q.abs().amax(1)[scales > 0].eq(127).all()  # the row absmax uses the full range


def test_int8_bf16_input_quantized_in_fp32():
    w = weight(16, 32).bfloat16()
    q, s = quantize_int8(w)
    q32, s32 = quantize_int8(w.float())
    assert torch.equal(q, q32) and torch.equal(s, s32)
    assert dequantize_int8(q, s, torch.bfloat16).dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# nf4 against a naive per-element reference in float32 numpy scalars

def naive_nf4(w, block, dq_block):
    f32 = np.float32
    code = [f32(c) for c in NF4_GOLDEN]
    flat = w.flatten().numpy()
    absmax, idx = [], []
    for b in range(len(flat) // block):
        vals = flat[b * block:(b + 1) * block]
        m = max(abs(v) for v in vals)
        absmax.append(m)
        for v in vals:
            x = v / m if m > 0 else f32(0)
            dist = [abs(x - c) for c in code]
            idx.append(dist.index(min(dist)))  # the first (lower) code on a tie
    packed = [(idx[2 * j] << 4) | idx[2 * j + 1] for j in range(len(idx) // 2)]  # first -> high nibble
    # double quantization: center, then int8 absmax per group of dq_block, zero padded
    mean = f32(math.fsum(float(a) for a in absmax) / len(absmax))
    centered = [a - mean for a in absmax]
    centered += [f32(0)] * (-len(centered) % dq_block)
    deq = []
    for g in range(len(centered) // dq_block):
        grp = centered[g * dq_block:(g + 1) * dq_block]
        s = max(abs(c) for c in grp) / f32(127)
        deq += [f32(round(float(c / s))) * s if s > 0 else f32(0) for c in grp]
    absmax = [d + mean for d in deq[:len(absmax)]]
    wd = [code[i] * absmax[k // block] for k, i in enumerate(idx)]
    return torch.tensor(packed, dtype=torch.uint8), torch.tensor(np.array(wd, dtype=np.float32))


def test_nf4_code_table():
    assert NF4_CODE.dtype == torch.float32
    assert torch.equal(NF4_CODE, torch.tensor(NF4_GOLDEN))


def test_nf4_matches_naive():
    assert NF4_DQ_BLOCK == 256  # QLoRA's
    w = weight(80, 448, seed=2)  # 560 blocks of 64: 3 groups of 256 absmax values, the last one padded
    w[0, :64] = 0  # a zero block
    state = quantize_nf4(w)
    packed, wd_naive = naive_nf4(w, 64, 256)
    assert set(state) == {"qweight", "absmax_q", "absmax_scales", "absmax_mean"}
    assert state["qweight"].dtype == torch.uint8 and state["qweight"].shape == (560, 32)
    assert torch.equal(state["qweight"].flatten(), packed)
    assert state["absmax_q"].dtype == torch.int8 and state["absmax_q"].shape == (3, 256)
    assert state["absmax_scales"].dtype == torch.float32 and state["absmax_scales"].shape == (3,)
    assert state["absmax_mean"].shape == ()
    assert (state["absmax_q"][2, 560 - 512:] == 0).all()  # the padding
    wd = dequantize_nf4(**state, shape=w.shape, dtype=torch.float32)
    # the two means may differ by an ulp (different summation order)
    torch.testing.assert_close(wd.flatten(), wd_naive, rtol=1e-5, atol=0)
    assert (wd[0, :64] == 0).all()


def test_nf4_codes_equal_the_nearest_code_search_at_every_boundary():
    """the threshold count gives the argmin over the 16 float32 distances (ties to the lower code) exactly: on
    the midpoints, one float32 step either side of them and of the thresholds, and on random values."""
    from quantize import NF4_THRESHOLDS
    t, mid = torch.tensor(NF4_THRESHOLDS), (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    near = [v for p in (t, mid) for v in (p, torch.nextafter(p, torch.full_like(p, 2.0)),
                                          torch.nextafter(p, torch.full_like(p, -2.0)))]
    x = torch.cat([*near, NF4_CODE, torch.rand(64 * 1000, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    x = torch.cat([x, torch.zeros(-x.numel() % 63)]).view(-1, 63)  # blocks of 64 whose absmax is 1: x stays x
    w = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
    want = (w.flatten()[:, None] - NF4_CODE).abs().argmin(-1)  # the 16 distances, first minimum
    q = quantize_nf4(w)["qweight"].flatten()
    assert torch.equal(torch.stack([q >> 4, q & 0xF], -1).flatten().long(), want)


def test_nf4_shape_errors_and_bf16():
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        quantize_nf4(torch.randn(3, 5))
    w = weight(16, 64).bfloat16()
    a, b = quantize_nf4(w), quantize_nf4(w.float())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert dequantize_nf4(**a, shape=w.shape, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        QuantLinear(5, 3, "nf4")
    with pytest.raises(ValueError, match="unknown quantization mode"):
        QuantLinear(64, 16, "int4")


# -----------------------------------------------------------------------------
# the module

def quant_linear(w, mode):
    m = QuantLinear(w.shape[1], w.shape[0], mode)
    m.load_weight(w)
    return m


@pytest.mark.parametrize("mode,limit", [("int8", 0.52), ("nf4", 0.27)])
def test_storage(mode, limit):
    """a quantized weight takes about 1/2 (int8) or 1/4 (nf4: 4-bit codes plus double-quantized block absmax)
    of the bf16 weight's bytes, counting every buffer; the buffers are exactly what the state dict saves."""
    w = weight(256, 512)
    m = quant_linear(w, mode)
    nbytes = sum(b.numel() * b.element_size() for b in m.buffers())
    ratio = nbytes / (w.numel() * w.bfloat16().element_size())  # of the weight stored in bf16
    assert (0.25 if mode == "nf4" else 0.5) <= ratio <= limit  # the codes alone, plus a little for the scales
    assert nbytes == sum(t.numel() * t.element_size() for t in m.state_dict().values())


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_forward_is_linear_with_dequantized_weight(mode):
    w = weight(24, 64)
    m = quant_linear(w, mode)
    assert m.weight_shape == (24, 64) and m.dequantize().dtype == torch.float32
    assert list(m.parameters()) == []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 64).to(dtype)
        assert torch.equal(m(x), F.linear(x, m.dequantize(dtype)))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    rel = (m(x) - F.linear(x, w)).norm() / F.linear(x, w).norm()  # and close to the unquantized layer
    assert rel < (0.2 if mode == "nf4" else 0.03)  # loose: the weights have 20x outliers


def test_gradient_flows_to_input_only():
    m = quant_linear(weight(24, 64), "nf4")
    x = torch.randn(3, 64, requires_grad=True)
    m(x).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * F.linear(x, m.dequantize()) @ m.dequantize())
    assert all(not b.requires_grad and b.grad is None for b in m.buffers())


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        for name in PROJECTIONS:
            setattr(self, name, nn.Linear(dim, dim, bias=False))
        self.norm = nn.LayerNorm(dim)


class Tiny(nn.Module):
    def __init__(self, dim=64, vocab=32):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim) for _ in range(2)])
        self.output = nn.Linear(dim, vocab, bias=False)


def test_quantize_model_swaps_only_targets():
    torch.manual_seed(0)
    model = Tiny()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_model(model, "nf4", PROJECTIONS)
    for layer, i in ((layer, i) for i, layer in enumerate(model.layers)):
        for name in PROJECTIONS:
            q = getattr(layer, name)
            assert isinstance(q, QuantLinear) and q.mode == "nf4"
            w = ref[f"layers.{i}.{name}.weight"]
            assert torch.equal(q.dequantize(), dequantize_nf4(**quantize_nf4(w), shape=w.shape, dtype=torch.float32))
        assert isinstance(layer.norm, nn.LayerNorm)
    assert type(model.output) is nn.Linear and torch.equal(model.output.weight, ref["output.weight"])
    assert torch.equal(model.tok_embeddings.weight, ref["tok_embeddings.weight"])
    # custom targets
    model = quantize_model(Tiny(), "int8", targets=("wq",))
    assert isinstance(model.layers[0].wq, QuantLinear) and type(model.layers[0].wk) is nn.Linear
    # a targeted Linear with a bias (Qwen2's q, k, v) keeps it in full precision: y = x W^T + b
    biased = nn.Module()
    biased.wq = nn.Linear(64, 8)
    x = torch.randn(3, 64)
    want = biased.wq(x).detach()
    quantize_model(biased, "int8", PROJECTIONS)
    assert isinstance(biased.wq, QuantLinear) and not biased.wq.bias.requires_grad
    torch.testing.assert_close(biased.wq(x), F.linear(x, biased.wq.dequantize(torch.float32)) + biased.wq.bias)
    assert (biased.wq(x) - want).abs().max() < 0.02


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_meta_build_then_load_weight(mode):
    torch.manual_seed(0)
    real = Tiny()
    with torch.device("meta"):
        model = quantize_model(Tiny(), mode, PROJECTIONS)
        lone = QuantLinear(64, 24, mode)
    q = model.layers[1].w2
    assert isinstance(q, QuantLinear) and q.qweight.is_meta
    q.load_weight(real.layers[1].w2.weight)
    assert not any(b.is_meta for b in q.buffers())
    ref = quant_linear(real.layers[1].w2.weight, mode)
    assert torch.equal(q.dequantize(), ref.dequantize())
    w = weight(24, 64)
    lone.load_weight(w)
    assert lone.qweight.device.type == "cpu" and torch.equal(lone.dequantize(), quant_linear(w, mode).dequantize())


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_state_dict_safetensors_roundtrip(tmp_path, mode):
    m = quant_linear(weight(24, 64), mode)
    expected = {"qweight", "scales"} if mode == "int8" else {"qweight", "absmax_q", "absmax_scales", "absmax_mean"}
    assert set(m.state_dict()) == expected
    save_file(m.state_dict(), tmp_path / "q.safetensors")
    fresh = QuantLinear(64, 24, mode)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), m(x))


def test_quantizing_in_chunks_equals_the_whole_matrix_at_once():
    """quantize_int8 and quantize_nf4 work a chunk of quantize.CHUNK weights at a time (reused buffers); across
    chunk boundaries and a partial last chunk they give exactly what one pass over the whole matrix gives."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 2624, generator=g) * 0.02  # 2.6M weights: two whole chunks and a part
    w[3, :70] = 0  # an all-zero NF4 block
    q8, s8 = quantize.quantize_int8(w)
    s_ref = w.abs().amax(-1) / 127
    assert torch.equal(s8, s_ref)
    assert torch.equal(q8, torch.round(w / quantize._safe(s_ref)[:, None]).clamp(-127, 127).to(torch.int8))
    nf4 = quantize.quantize_nf4(w)
    blocks = w.reshape(-1, quantize.NF4_BLOCK)
    x = blocks / quantize._safe(blocks.abs().amax(-1))[:, None]
    codes = sum((x >= t).to(torch.uint8) for t in quantize.NF4_THRESHOLDS)  # (n_blocks, 64)
    assert torch.equal(nf4["qweight"], (codes[:, 0::2] << 4) | codes[:, 1::2])
