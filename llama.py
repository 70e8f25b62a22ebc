"""
LLaMA from scratch, and loading a checkpoint in Meta's or Hugging Face's layout: LLaMA 2 and the models that share
its architecture up to a few config fields (Llama 3.x, Mistral, Qwen2 / Qwen2.5, CodeLlama).

The architecture is Touvron et al. 2023, "Llama 2" (arXiv 2307.09288), section 2.2: pre-norm RMSNorm, rotary
position embeddings (RoPE, Su et al. 2021), SwiGLU feed-forward, grouped-query attention. Inside the model the
names are Meta's (`layers.0.attention.wq.weight`) and RoPE rotates adjacent pairs (dims 2i, 2i+1), as Meta's
reference does. The family differs by config fields, each a knob of ModelArgs with one branch in the code:
rope_theta and rope_scaling ("llama3" for Llama 3.1+, "linear", "yarn": rope_frequencies), sliding_window (Mistral
v0.1: attention_mask), bias (Qwen2's q/k/v), tie_embeddings (Llama 3.2 1B/3B, small Qwen2.5). A field this code
does not implement is refused by name before any weight is read (read_args).

The layouts on disk:
- Meta: `params.json` (vocab_size -1 means "the tokenizer's") and `consolidated.NN.pth`, one tensor-parallel shard
  per file (each weight split along its own dimension, META_SHARD_DIM), with `tokenizer.model` one folder up.
- Hugging Face: `config.json` (model_type, hidden_size, ...), safetensors or `pytorch_model*.bin` files (sharded
  with an index); names as in HF_TO_META. HF's rotary embedding pairs dim i with i + head_dim/2 ("rotate_half"),
  so its q and k weights (and biases) hold Meta's rows permuted within each head: permute_hf_to_meta undoes it on
  load, permute_meta_to_hf redoes it for an export. Get it wrong and the model still runs, but its text turns to
  gibberish after a few tokens: tests compare logits across the layouts and with transformers.
The tokenizers: tokenizer.py.
"""

import glob
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from files import CheckpointError, Progress, read_json, torch_load, what_file

IGNORE_INDEX = -100  # label value that does not count in the loss
# the seven projections of a block, which fine-tuning targets (all of them by default, as the paper does);
# embeddings, norms and the output head stay frozen
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


# -----------------------------------------------------------------------------
# config


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # the ffn hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # explicit ffn hidden size (HF's intermediate_size); else Meta's rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "linear" | "llama3" | "yarn", its fields}: rope_frequencies
    max_seq_len: int = 4096
    sliding_window: Optional[int] = None  # each token attends to this many positions: itself and those before
    bias: tuple = ()  # the projections with a bias: ("wq", "wk", "wv") for Qwen2
    tie_embeddings: bool = False  # the output head is the embedding matrix

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.bias = tuple(self.bias)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"inconsistent model shape: dim {self.dim}, n_heads {self.n_heads}, "
                             f"n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        h = int(2 * 4 * self.dim / 3)  # Meta's rule: 2/3 of 4 dim, optionally scaled, rounded up
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


PRESETS = {
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    "Llama-3.1-8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                              rope_theta=500000.0, max_seq_len=131072, rope_scaling={
                                  "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "Qwen2.5-7B": ModelArgs(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=152064, hidden_dim=18944,
                            norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, bias=("wq", "wk", "wv")),
    # tiny shapes for tests (grouped-query attention on purpose)
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=256),
}


# -----------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in fp32, then back to the input dtype (as Meta's reference does)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> tuple:
    """-> (the rotation frequency of each pair of dims (head_dim / 2,) fp32, the factor on cos and sin): RoPE's
    theta^(-2i/d), or scaled (the config's names). linear: all divided by factor; llama3: wavelengths below
    original_max / high_freq_factor kept, above original_max / low_freq_factor divided by factor, a blend between;
    yarn (arXiv 2309.00071): a linear ramp over dims (beta_fast, beta_slow), cos and sin times attention_factor."""
    d, s = args.head_dim, args.rope_scaling or {}
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2).float() / d))  # (d/2,)
    kind, factor = s.get("rope_type", "default"), s.get("factor")
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        old, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)  # 0 at wavelength old / low, 1 at old / high
        blend = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(wavelen < old / high, inv, torch.where(wavelen > old / low, inv / factor, blend)), 1.0
    if kind == "yarn":
        old = s["original_max_position_embeddings"]
        factor = factor or args.max_seq_len / old

        def mscale(m=1.0):
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        attn = s.get("attention_factor") or (mscale(s["mscale"]) / mscale(s["mscale_all_dim"])
                                             if s.get("mscale") and s.get("mscale_all_dim") else mscale())

        def dim_of(rotations):  # the dim whose wavelength fits `rotations` times into old positions
            return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(args.rope_theta))

        lo, hi = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        ramp = ((torch.arange(d // 2).float() - lo) / ((hi - lo) or 0.001)).clamp(0, 1)  # 0: kept, 1: / factor
        return inv / factor * ramp + inv * (1 - ramp), attn
    return inv, 1.0


def rope_cache(args: ModelArgs, device=None):
    """cos and sin of the rotation angles, each (max_seq_len, head_dim // 2), fp32."""
    freqs, scale = rope_frequencies(args)
    angles = torch.outer(torch.arange(args.max_seq_len, device=device).float(), freqs.to(device))
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x, cos, sin):
    """rotate adjacent pairs (2i, 2i+1) of x (B, T, H, D) by the angles of their positions; cos, sin (T, D/2), or
    (B, T, D/2) when each row has positions of its own (packed examples)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., T, 1, D/2): broadcast over the heads
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def attention_mask(rows, window: Optional[int], segments=None, keys: Optional[int] = None):
    """which keys each query sees (None where SDPA's causal attention is exact): key j <= query i, i - j < window,
    and in a packed row, the same example. rows (T,): the queries' places; keys: how many keys when they are not the
    queries (generation: the cache so far); segments (B, T): each position's example. -> (T, keys) or (B, 1, T, T)"""
    T = rows.numel()
    if keys is None and segments is None and not (window and T > window):
        return None
    k = torch.arange(keys or T, device=rows.device)
    mask = k <= rows[:, None]  # (T, keys)
    if window:
        mask &= rows[:, None] - k < window
    if segments is not None:
        mask = (mask & (segments[:, :, None] == segments[:, None, :]))[:, None]  # (B, 1, T, T)
    return mask


def example_positions(segments):
    """(B, T) the example of each position (runs of one id) -> (B, T) each position's place in its example."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(-1).values


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        b = set(args.bias)
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias="wq" in b)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias="wk" in b)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias="wv" in b)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias="wo" in b)
        self.cache_k = self.cache_v = None  # (B, max_len, n_kv_heads, head_dim) during generation

    def forward(self, x, cos, sin, mask=None, start_pos: Optional[int] = None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if start_pos is not None:  # generation: write this chunk into the cache, attend to all of it so far
            self.cache_k[:B, start_pos:start_pos + T], self.cache_v[:B, start_pos:start_pos + T] = k, v
            k, v = self.cache_k[:B, :start_pos + T], self.cache_v[:B, :start_pos + T]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention, self.feed_forward = Attention(args), FeedForward(args)
        self.attention_norm, self.ffn_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask=None, start_pos=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# the loss's logits, this many at a time (256 MB fp32): 2,048 tokens x 128K vocab would take 3 GB with their gradients
LOSS_CHUNK = 2**26


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one matrix, two uses
        self.grad_checkpoint = False  # recompute each block in backward (less activation memory)
        self.reset_rope()

    def reset_rope(self, device=None):
        """the real-valued rope tables, not in the state dict (recomputed after building on the meta device)."""
        cos, sin = rope_cache(self.args, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, targets=None, start_pos: Optional[int] = None, reduction="mean", segments=None):
        """tokens (B, T) -> (logits (B, T, vocab) fp32, None), or with targets (B, T): (None, the next-token loss).
        targets[:, t] is the token after tokens[:, t] or IGNORE_INDEX; reduction "sum" lets a caller normalise by
        the target tokens of a whole step. segments (B, T): rows that pack several examples, the example of each
        position: positions restart at each example and no example attends to another (data.pack). start_pos
        (generation only) uses the KV cache, and gives the logits of the last position only (B, 1, vocab)."""
        B, T = tokens.shape
        p0 = start_pos or 0
        if p0 + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {p0 + T} tokens exceeds max_seq_len {self.args.max_seq_len}")
        rows = torch.arange(p0, p0 + T, device=tokens.device)  # (T,) each query's place in its row
        pos = slice(p0, p0 + T) if segments is None else example_positions(segments)  # or (B, T): each its own
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, D/2) or (B, T, D/2)
        mask = attention_mask(rows, self.args.sliding_window, segments, None if start_pos is None else p0 + T)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # non-reentrant: works with a frozen base and trainable deltas deep inside the block
                h = checkpoint(layer, h, cos, sin, mask, start_pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, start_pos)
        h = self.norm(h)
        if targets is None:
            return self.output(h if start_pos is None else h[:, -1:]).float(), None
        return None, self.loss(h, targets, reduction)

    def loss(self, h, targets, reduction: str = "mean"):
        """cross-entropy of the next tokens from the final hidden states h (B, T, dim): the output head runs only
        where there is a label, LOSS_CHUNK logits at a time, each chunk recomputed in backward instead of kept."""
        keep = targets.flatten() != IGNORE_INDEX
        h, y = h.flatten(0, 1)[keep], targets.flatten()[keep]  # (N, dim), (N,): the labelled positions
        n = max(1, LOSS_CHUNK // self.args.vocab_size)
        if len(y) <= n:
            total = chunk_loss(self.output, h, y)
        else:
            total = sum(checkpoint(chunk_loss, self.output, h[i:i + n], y[i:i + n], use_reentrant=False)
                        for i in range(0, len(y), n))
        return total if reduction == "sum" else total / len(y)

    def setup_cache(self, batch_size: int, max_len: int):
        """allocate the KV cache for generation (freed by free_cache)."""
        p = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            a.cache_k, a.cache_v = (torch.zeros(batch_size, max_len, a.n_kv_heads, a.head_dim, dtype=p.dtype,
                                                device=p.device) for _ in range(2))

    def free_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None


def chunk_loss(output, h, y):
    return F.cross_entropy(output(h).float(), y, reduction="sum")  # (N, vocab) fp32 logits, then their loss


# -----------------------------------------------------------------------------
# checkpoint loading: both layouts become Meta names in Meta's RoPE order

HF_TO_META = {  # hf key pattern -> meta key ({} is the layer number)
    "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
HF_TO_META |= {k.replace("weight", "bias"): v.replace("weight", "bias") for k, v in HF_TO_META.items() if "attn" in k}
# tensor-parallel shards of Meta's checkpoints: the dim each weight is split along (norms are replicated)
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def rename(key: str, table: dict) -> Optional[str]:
    """a key through a {pattern: template} table ({} stands for the layer number); None if no pattern fits."""
    layer = re.search(r"\.(\d+)\.", key)
    pattern = key.replace(f".{layer[1]}.", ".{}.", 1) if layer else key
    return table[pattern].format(layer[1] if layer else "") if pattern in table else None


def permute_hf_to_meta(w, n_heads):
    """q or k rows (out, in), or a bias (out,), in HF's order -> Meta's: within each head, HF rows [0, d/2) and
    [d/2, d) interleave."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_meta_to_hf(w, n_heads):
    """the inverse: q or k rows (or a bias) in Meta's order -> HF's (for an export in the HF layout)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_checkpoint(path: str) -> str:
    """the layout of a checkpoint folder ("meta" or "hf") once its config and weight files are there: the one check
    train.py, generate.py and merge.py run before anything slow (then read_args, and tokenizer.load)."""
    if os.path.isfile(path):
        raise CheckpointError(f"{path}: a checkpoint folder is expected, and this is {what_file(path)}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint folder not found")
    layout = "meta" if os.path.isfile(os.path.join(path, "params.json")) else \
        "hf" if os.path.isfile(os.path.join(path, "config.json")) else None
    if layout is None:
        raise CheckpointError(f"{path}: neither a Meta checkpoint (params.json) nor a Hugging Face one (config.json)")
    weights = ["consolidated.*.pth"] if layout == "meta" else ["model*.safetensors", "pytorch_model*.bin"]
    if not any(glob.glob(os.path.join(path, w)) for w in weights):
        raise CheckpointError(f"{path}: {'params' if layout == 'meta' else 'config'}.json found but no "
                              f"{' or '.join(weights)}")
    return layout


# -----------------------------------------------------------------------------
# the config: every field that changes the math is read, or the checkpoint is refused naming it

# params.json fields (Meta's layout: LLaMA 2, CodeLlama); Meta's Llama 3 layout is refused (use its HF layout)
META_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta")
# config.json's model_type: the architectures that are LLaMA up to the fields below, and transformers' value
# (LlamaConfig, MistralConfig, Qwen2Config) for a field that a config leaves out
HF_DEFAULTS = {"llama": {"max_position_embeddings": 2048},
               "mistral": {"max_position_embeddings": 131072, "sliding_window": 4096, "num_key_value_heads": 8},
               "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32}}
# the rope scalings rope_frequencies implements: the fields each must have, and those it may have
ROPE_FIELDS = {"default": ((), ()), "linear": (("factor",), ()),
               "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
               "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast",
                                      "beta_slow", "mscale", "mscale_all_dim", "truncate"))}


def read_args(path: str, layout: str) -> ModelArgs:
    """ModelArgs from params.json (Meta; vocab_size -1 is resolved from the embedding later) or config.json
    (Hugging Face). A field this model does not implement is a CheckpointError naming it and its value."""
    cfg_path = os.path.join(path, "params.json" if layout == "meta" else "config.json")
    c = read_json(cfg_path)
    try:
        return meta_args(c) if layout == "meta" else hf_args(c)
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def meta_args(c: dict) -> ModelArgs:
    if c.get("use_scaled_rope"):
        raise ValueError("use_scaled_rope true: Meta's Llama 3.1+ layout is not supported; use the model's Hugging "
                         "Face layout (the folder with config.json, tokenizer.json and model*.safetensors)")
    for k in [k for k in c if k not in META_FIELDS and k != "use_scaled_rope"]:
        raise ValueError(f"field {k} ({json.dumps(c[k])}) is not implemented (known: {', '.join(META_FIELDS)})")
    return ModelArgs(**{k: v for k, v in c.items() if k in META_FIELDS})


def hf_args(c: dict) -> ModelArgs:
    kind = c.get("model_type")
    if kind not in HF_DEFAULTS:
        raise ValueError(f"model_type {json.dumps(kind)} is not implemented (only {', '.join(HF_DEFAULTS)})")
    default, dim, heads, full = HF_DEFAULTS[kind], c["hidden_size"], c["num_attention_heads"], ["full_attention"]
    for field, ok, why in (("hidden_act", ("silu",), "only SwiGLU with silu is implemented"),
                           ("attention_dropout", (0,), "attention dropout is not implemented"),
                           ("mlp_bias", (None, False), "a bias in the MLP is not implemented"),
                           ("quantization_config", (), "a pre-quantized checkpoint is not supported; pass the "
                                                       "full-precision one (--quantize int8|nf4 quantizes it here)"),
                           ("use_sliding_window", (None, False), "Qwen2's per-layer window is not implemented"),
                           ("layer_types", (None, full * c["num_hidden_layers"]), "only full attention is "
                                                                                     "implemented"),
                           ("head_dim", (None, dim // heads), f"only hidden_size / num_attention_heads "
                                                              f"({dim // heads}) is implemented")):
        if field in c and c[field] not in ok:
            raise ValueError(f"{field} {json.dumps(c[field])}: {why}")
    max_pos = c.get("max_position_embeddings", default["max_position_embeddings"])
    theta, scaling = hf_rope(c, max_pos)
    # Qwen2 has a bias on q, k and v (its modeling code, not its config, says so); Llama's attention_bias: on all four
    bias = ("wq", "wk", "wv") if kind == "qwen2" else ("wq", "wk", "wv", "wo") if c.get("attention_bias") else ()
    return ModelArgs(dim=dim, n_layers=c["num_hidden_layers"], n_heads=heads, vocab_size=c["vocab_size"],
                     n_kv_heads=c.get("num_key_value_heads", default.get("num_key_value_heads")),
                     hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                     rope_theta=theta, rope_scaling=scaling, max_seq_len=max_pos, bias=bias,
                     sliding_window=c.get("sliding_window", default["sliding_window"]) if kind == "mistral" else None,
                     tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def hf_rope(c: dict, max_pos: int) -> tuple:
    """(rope_theta, rope_scaling or None) from either config style: transformers 4's top-level rope_theta and
    rope_scaling ("type" or "rope_type"), or transformers 5's rope_parameters (which holds rope_theta too)."""
    where = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    s = dict(c.get(where) or {})
    theta = s.pop("rope_theta", c.get("rope_theta", 10000.0))
    kind = s.pop("rope_type", s.get("type", "default"))
    s.pop("type", None)
    partial = s.pop("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1:
        raise ValueError(f"partial_rotary_factor {partial}: only rotary embeddings over the whole head are implemented")
    if kind not in ROPE_FIELDS:
        raise ValueError(f"{where}: rope_type {json.dumps(kind)} is not implemented (only {', '.join(ROPE_FIELDS)})")
    need, may = ROPE_FIELDS[kind]
    for field in [f for f in s if f not in need + may] + [f for f in need if f not in s]:
        why = "missing" if field in need else "not implemented"
        raise ValueError(f"{where}: {field} is {why} for rope_type {kind}")
    if kind in ("llama3", "yarn"):  # (a top-level original_max_position_embeddings wins, as in transformers)
        s["original_max_position_embeddings"] = c.get("original_max_position_embeddings") or \
            s.get("original_max_position_embeddings") or max_pos
    return theta, {"rope_type": kind, **s} if kind != "default" else None


def read_shapes(path: str) -> ModelArgs:
    """the shapes of a checkpoint (either layout) from its config, without loading a weight (Meta's vocab_size -1:
    the embedding's rows, read from the mmap'ed file)."""
    args = read_args(path, check_checkpoint(path))
    if args.vocab_size == -1:
        args.vocab_size = meta_shards(path)[1][0]["tok_embeddings.weight"].shape[0]
    return args


def check_vocab(path: str, tok):
    """the embedding needs a row for every token. More rows than tokens is a padded vocabulary (32,001 for an added
    pad token, Qwen2.5's 151,936 for 151,665): it trains as it is; sampling never picks a row beyond (generate.py)."""
    rows = read_shapes(path).vocab_size
    if rows < tok.n_words:
        raise CheckpointError(f"{path}: its embedding has {rows:,} rows but {tok.path} has {tok.n_words:,} tokens: "
                              f"this tokenizer is not the model's")


def meta_shards(path: str) -> tuple:
    """the file names and mmap'ed tensors (nothing read into memory yet) of a Meta checkpoint's shards."""
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    shards = [torch_load(f) for f in files]
    for f, s in zip(files, shards):
        if not isinstance(s, dict) or not all(isinstance(v, torch.Tensor) for v in s.values()):
            raise CheckpointError(f"{f}: expected a dict of tensors")
        if s.keys() != shards[0].keys():
            raise CheckpointError(f"{f}: keys differ from {files[0]}; shards of different checkpoints?")
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointError(f"{files[0]}: missing key tok_embeddings.weight")
    return files, shards


def meta_tensors(files: list, shards: list):
    """yield (key, tensor, file); tensor-parallel shards are joined key by key."""
    for key in shards[0]:
        if key == "rope.freqs":
            continue  # recomputed by the model
        parts, dim = [s[key] for s in shards], META_SHARD_DIM.get(key.split(".")[-2])
        try:
            t = parts[0] if len(parts) == 1 or dim is None or parts[0].dim() == 1 else torch.cat(parts, dim)
        except RuntimeError:
            raise CheckpointError(f"{files[0]}: shards of {key} do not fit together "
                                  f"({[tuple(p.shape) for p in parts]})") from None
        yield key, t, files[0]


def hf_tensors(path: str, args: ModelArgs):
    """yield (meta key, tensor, file) from safetensors or pytorch_model*.bin, one tensor at a time, q/k rows (and
    biases) put back in Meta's order."""
    from safetensors import safe_open

    index = next((os.path.join(path, n) for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if os.path.isfile(os.path.join(path, n))), None)
    if index:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, n))][:1]
    for file in (os.path.join(path, n) for n in files):
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: listed in the index but missing")
        try:
            f = safe_open(file, framework="pt") if file.endswith(".safetensors") else torch_load(file)
            keys = list(f.keys())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
        for hf_key in keys:
            if hf_key.endswith("rotary_emb.inv_freq"):
                continue  # recomputed by the model
            key = rename(hf_key, HF_TO_META)
            if key is None:
                raise CheckpointError(f"{file}: unexpected key {hf_key}")
            try:
                t = f.get_tensor(hf_key) if hasattr(f, "get_tensor") else f[hf_key]
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {hf_key} ({e})") from None
            if ".attention.wq." in key or ".attention.wk." in key:  # (weights and biases)
                t = permute_hf_to_meta(t, args.n_heads if ".wq." in key else args.n_kv_heads)
            yield key, t, file


def load_model(path: str, device="cpu", dtype: Optional[torch.dtype] = torch.bfloat16, quantize: Optional[str] = None,
               verbose: bool = True) -> Transformer:
    """Load a checkpoint of the family in either layout. The model is built on the meta device and each tensor is
    assigned as it is read (mmap'ed, weights_only=True), so host memory stays near one copy of the weights;
    dtype None keeps each tensor's stored dtype; with quantize="int8"|"nf4" the seven projections are quantized
    tensor by tensor while loading. Every missing, unexpected, duplicate or misshapen key is an error naming
    the file and the key. verbose: report progress (a bar, or a line every 10 s in a log)."""
    layout = check_checkpoint(path)
    args = read_args(path, layout)
    if layout == "meta":
        files, shards = meta_shards(path)
        if args.vocab_size == -1:  # params.json leaves it to the tokenizer; the embedding says the same
            args.vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
        tensors = meta_tensors(files, shards)
    else:
        tensors = hf_tensors(path, args)
    with torch.device("meta"):
        model = Transformer(args)
    if quantize:
        import quantize as q
        q.quantize_model(model, quantize, PROJECTIONS)
    modules = dict(model.named_modules())
    # every key the checkpoint must hold, with its shape (a quantized linear still wants its full weight; a tied
    # output head is the embedding, so the file has no weight of its own for it)
    quantized = {n: m for n, m in modules.items() if hasattr(m, "load_weight")}
    want = {k: tuple(t.shape) for k, t in model.state_dict().items() if k.rpartition(".")[0] not in quantized}
    want |= {n + ".weight": tuple(m.weight_shape) for n, m in quantized.items()}
    want |= {n + ".bias": tuple(m.bias.shape) for n, m in quantized.items() if m.bias is not None}
    if args.tie_embeddings:
        del want["output.weight"]
    seen = set()
    files = glob.glob(os.path.join(path, "consolidated.*.pth" if layout == "meta" else "*.safetensors")) or \
        glob.glob(os.path.join(path, "pytorch_model*.bin"))
    progress = Progress(f"loading {path}" + (f" (quantizing to {quantize})" if quantize else ""),
                        sum(os.path.getsize(f) for f in files), quiet=not verbose)
    for key, t, src in tensors:
        if key not in want or key in seen:
            why = " (tie_word_embeddings is true: the output head is the embedding)" if key == "output.weight" else ""
            raise CheckpointError(f"{src}: {'duplicate' if key in seen else 'unexpected'} key {key}{why}")
        if tuple(t.shape) != want[key]:
            raise CheckpointError(f"{src}: {key} has shape {tuple(t.shape)}, the model expects {want[key]} "
                                  f"(from the config and the number of shards)")
        seen.add(key)
        module_name, _, leaf = key.rpartition(".")
        read, module, t = t.numel() * t.element_size(), modules[module_name], t.to(device=device, dtype=dtype)
        if leaf == "weight" and hasattr(module, "load_weight"):
            module.load_weight(t)  # quantized now; the full-precision tensor is dropped right after
        else:
            setattr(module, leaf, nn.Parameter(t, requires_grad=False))
        progress.update(read)
    progress.close()
    missing = sorted(want.keys() - seen)
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope(device)
    return model.eval()


# -----------------------------------------------------------------------------
# the model's linears that fine-tuning targets


def matrix_shape(m) -> tuple:
    """(out, in) of a linear layer, full precision or quantized."""
    return tuple(m.weight_shape) if hasattr(m, "weight_shape") else tuple(m.weight.shape)


def target_linears(model: nn.Module, targets) -> dict:
    """name -> plain linear (full precision or quantized) whose attribute name is one of `targets`, in model order."""
    return {name: m for name, m in model.named_modules()
            if name.rpartition(".")[2] in targets and (isinstance(m, nn.Linear) or hasattr(m, "dequantize"))}


def swap_module(model: nn.Module, name: str, new: nn.Module):
    """put `new` where the submodule `name` is."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
