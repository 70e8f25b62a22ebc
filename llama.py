"""
LLaMA 2 from scratch: the model, checkpoint loading (Meta and Hugging Face layouts), the tokenizer,
export to the Hugging Face layout, and sampling with a KV cache.

The architecture is Touvron et al. 2023, "Llama 2" (arXiv 2307.09288), section 2.2: pre-norm RMSNorm,
rotary position embeddings (RoPE, Su et al. 2021), SwiGLU feed-forward, grouped-query attention (70B).
Inside the model RoPE rotates adjacent pairs (dims 2i, 2i+1), exactly as Meta's reference does, and
parameter names are Meta's (`layers.0.attention.wq.weight`). A Hugging Face checkpoint is converted at
the load boundary (key names and the q/k row permutation), and back again by `save_hf`.
See ../shared/notes/llama-formats.md for both layouts.
"""

import glob
import json
import os
import re
import shutil
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that does not count in the loss
# the seven projections of a block (Meta names; HF: q/k/v/o_proj, gate/down/up_proj): what SpIEL, LoRA and
# quantization target by default. Embeddings, norms and the output head stay as they are.
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class CheckpointError(Exception):
    """A checkpoint, tokenizer or delta file that cannot be used; the message names the file."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU that has it (compute capability >= 8.0); fp32 otherwise. fp16 is not used for training:
    it needs loss scaling, which would also scale SpIEL-AG's accumulated gradients, and it overflows."""
    if str(device).startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        print("warning: this GPU has no bf16 (compute capability < 8.0); computing in fp32 "
              "(--quantize int8 or nf4 keeps the stored base small)")
    return torch.float32  # on the CPU bf16 matmuls are slow


# -----------------------------------------------------------------------------
# config


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None means n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # the ffn hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # explicit ffn hidden size (HF's intermediate_size); else derived
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"inconsistent model shape: dim {self.dim}, n_heads {self.n_heads}, "
                             f"n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        # exactly Meta's rule: 2/3 of 4*dim, optionally scaled, rounded up to multiple_of
        if self.hidden_dim is not None:
            return self.hidden_dim
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


PRESETS = {
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    # tiny shapes for tests and the CPU demo (grouped-query attention on purpose)
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
        # normalise in fp32, then back to the input dtype (as Meta's reference does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cache(args: ModelArgs, device=None):
    """cos and sin of the rotation angles, each (max_seq_len, head_dim // 2), fp32."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim))
    angles = torch.outer(torch.arange(args.max_seq_len, device=device).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """rotate adjacent pairs (2i, 2i+1) of x (B, T, H, D) by the angles of its positions; cos, sin (T, D/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2), broadcast over batch and heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # (B, max_len, n_kv_heads, head_dim) during generation

    def forward(self, x, cos, sin, start_pos: Optional[int] = None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if start_pos is None:  # training / plain forward: causal attention over the T tokens
            mask, causal = None, True
        else:  # generation: write this chunk into the cache, attend to everything cached so far
            self.cache_k[:B, start_pos:start_pos + T] = k
            self.cache_v[:B, start_pos:start_pos + T] = v
            k, v = self.cache_k[:B, :start_pos + T], self.cache_v[:B, :start_pos + T]
            # query i (at position start_pos + i) may see key j iff j <= start_pos + i
            mask = torch.arange(start_pos + T, device=x.device)[None, :] <= \
                (start_pos + torch.arange(T, device=x.device))[:, None]  # (T, start_pos + T)
            causal = False
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
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
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.grad_checkpoint = False  # recompute each block in backward (saves activation memory)
        # real-valued rope tables, not part of the state dict (persistent=False)
        cos, sin = rope_cache(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_rope(self, device):
        """recompute the rope tables (needed after building on the meta device)."""
        self.rope_cos, self.rope_sin = rope_cache(self.args, device)

    def forward(self, tokens, targets=None, start_pos: Optional[int] = None, reduction: str = "mean"):
        """tokens (B, T) -> logits (B, T, vocab) fp32, and the next-token loss if targets (B, T) are given.

        targets are already aligned with the logits (targets[:, t] is the token after tokens[:, t]);
        positions equal to IGNORE_INDEX do not count. reduction "sum" lets a caller normalise by the
        number of target tokens across micro-batches. start_pos (generation only) uses the KV cache.
        """
        B, T = tokens.shape
        p0 = start_pos or 0
        if p0 + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {p0 + T} tokens exceeds max_seq_len {self.args.max_seq_len}")
        cos, sin = self.rope_cos[p0:p0 + T], self.rope_sin[p0:p0 + T]
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # non-reentrant: works with a frozen base and trainable deltas deep inside the block
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, start_pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, start_pos)
        logits = self.output(self.norm(h)).float()  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction=reduction)
        return logits, loss

    def setup_cache(self, batch_size: int, max_len: int):
        """allocate the KV cache for generation (freed again by `free_cache`)."""
        p = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            shape = (batch_size, max_len, a.n_kv_heads, a.head_dim)
            a.cache_k = torch.zeros(shape, dtype=p.dtype, device=p.device)
            a.cache_v = torch.zeros(shape, dtype=p.dtype, device=p.device)

    def free_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None


# -----------------------------------------------------------------------------
# tokenizer


def find_tokenizer(ckpt_dir: str) -> str:
    """tokenizer.model in the checkpoint folder, or one level up (Meta's download keeps it there)."""
    for cand in (os.path.join(ckpt_dir, "tokenizer.model"), os.path.join(ckpt_dir, "..", "tokenizer.model")):
        if os.path.isfile(cand):
            return os.path.normpath(cand)
    raise CheckpointError(f"{ckpt_dir}: no tokenizer.model in this folder or its parent")


class Tokenizer:
    """sentencepiece with LLaMA's conventions: BOS (id 1) prepended by default, EOS (id 2) on request."""

    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: tokenizer file not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from None
        self.path = path
        self.n_words = self.sp.GetPieceSize()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        return [self.bos_id] * bos + self.sp.EncodeAsIds(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


# -----------------------------------------------------------------------------
# checkpoint loading: both layouts end as a Meta-named state dict in the model's RoPE convention

HF_TO_META = [  # (hf regex, meta template)
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{}.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{}.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{}.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{}.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{}.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{}.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{}.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{}.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{}.ffn_norm.weight"),
]
HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
META_IGNORED = {"rope.freqs"}
# tensor-parallel shards of Meta's checkpoints: which dim each weight is split along (None: replicated)
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
                  "wo": 1, "w2": 1, "tok_embeddings": 1}


def hf_to_meta_key(key: str) -> Optional[str]:
    for pattern, template in HF_TO_META:
        m = re.fullmatch(pattern, key)
        if m:
            return template.format(*m.groups())
    return None


def meta_to_hf_key(key: str) -> str:
    for pattern, template in HF_TO_META:
        m = re.fullmatch(template.replace(".", r"\.").replace("{}", r"(\d+)"), key)
        if m:
            return pattern.replace(r"(\d+)", "{}").replace("\\", "").format(*m.groups())
    raise KeyError(key)


def permute_hf_to_meta(w, n_heads):
    """HF q/k rows pair dim i with i + head_dim/2 ("rotate_half"); Meta pairs 2i with 2i+1."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_meta_to_hf(w, n_heads):
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _read_json(path):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def _torch_load(path):
    """plain tensors only: weights_only=True refuses (never executes) any other pickled object."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
            raise CheckpointError(f"{path}: refusing to unpickle objects that are not plain tensors ({msg})") from None
        raise CheckpointError(f"{path}: cannot read (truncated or not a PyTorch file: {msg})") from None


def read_meta_args(ckpt_dir: str) -> ModelArgs:
    path = os.path.join(ckpt_dir, "params.json")
    p = _read_json(path)
    known = {f.name for f in fields(ModelArgs)}
    try:
        args = ModelArgs(**{k: v for k, v in p.items() if k in known and k != "vocab_size"})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    if p.get("vocab_size", -1) > 0:
        args.vocab_size = p["vocab_size"]
    else:
        args.vocab_size = -1  # resolved from the embedding's shape once the weights are open
    return args


def read_hf_args(ckpt_dir: str) -> ModelArgs:
    path = os.path.join(ckpt_dir, "config.json")
    c = _read_json(path)
    try:
        if c.get("tie_word_embeddings", False):
            raise ValueError("tied input/output embeddings are not LLaMA 2 (tie_word_embeddings is true)")
        return ModelArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                         n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                         hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
                         rope_theta=c.get("rope_theta", 10000.0), max_seq_len=c.get("max_position_embeddings", 4096))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def open_meta_shards(ckpt_dir: str):
    """the mmap'ed shards of a Meta checkpoint (nothing is read into memory yet), with their file names."""
    files = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    if not files:
        raise CheckpointError(f"{ckpt_dir}: params.json found but no consolidated.*.pth")
    shards = [_torch_load(f) for f in files]
    for f, s in zip(files, shards):
        if not isinstance(s, dict) or not all(isinstance(v, torch.Tensor) for v in s.values()):
            raise CheckpointError(f"{f}: expected a dict of tensors")
        if s.keys() != shards[0].keys():
            raise CheckpointError(f"{f}: keys differ from {files[0]}; shards of different checkpoints?")
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointError(f"{files[0]}: missing key tok_embeddings.weight")
    return files, shards


def iter_meta_tensors(files, shards):
    """yield (key, tensor, file); tensor-parallel shards are concatenated key by key."""
    for key in shards[0]:
        if key in META_IGNORED:
            continue
        parts = [s[key] for s in shards]
        dim = META_SHARD_DIM.get(key.split(".")[-2])
        if len(parts) == 1 or dim is None or parts[0].dim() == 1:
            yield key, parts[0], files[0]  # unsharded, or a replicated norm weight: take shard 0
        else:
            try:
                yield key, torch.cat(parts, dim=dim), files[0]
            except RuntimeError:
                raise CheckpointError(f"{files[0]}: shards of {key} do not fit together "
                                      f"({[tuple(p.shape) for p in parts]})") from None


def iter_hf_tensors(ckpt_dir: str, args: ModelArgs):
    """yield (meta_key, tensor, source file) from safetensors or pytorch_model*.bin, q/k rows un-permuted."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(ckpt_dir, index_name)
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(ckpt_dir, n))][:1]
        if not files:
            raise CheckpointError(f"{ckpt_dir}: config.json found but no model.safetensors or pytorch_model.bin")
    for name in files:
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: listed in the index but missing")
        for hf_key, t in _read_hf_file(path):
            if HF_IGNORED.fullmatch(hf_key):
                continue
            key = hf_to_meta_key(hf_key)
            if key is None:
                raise CheckpointError(f"{path}: unexpected key {hf_key}")
            if key.endswith("attention.wq.weight"):
                t = permute_hf_to_meta(t, args.n_heads)
            elif key.endswith("attention.wk.weight"):
                t = permute_hf_to_meta(t, args.n_kv_heads)
            yield key, t, path


def _read_hf_file(path):
    """yield (key, tensor) one tensor at a time, so at most one extra tensor is in memory."""
    if not path.endswith(".safetensors"):
        yield from _torch_load(path).items()
        return
    from safetensors import safe_open
    try:
        f = safe_open(path, framework="pt")
        keys = list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
    for k in keys:
        try:
            t = f.get_tensor(k)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {k} ({e})") from None
        yield k, t


def checkpoint_layout(path: str) -> str:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if os.path.isfile(os.path.join(path, "params.json")):
        return "meta"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise CheckpointError(f"{path}: neither a Meta checkpoint (params.json) nor a Hugging Face one (config.json)")


def load_model(path: str, device="cpu", dtype=torch.bfloat16, quantize: Optional[str] = None) -> Transformer:
    """Load a LLaMA 2 checkpoint in either layout into a Transformer (Meta naming and RoPE convention).

    The model is built on the meta device and every tensor is assigned as it is read (mmap'ed files,
    weights_only=True), so host memory stays near one copy of the weights. With quantize="int8"|"nf4"
    the seven projections of each block are quantized tensor by tensor while loading.
    """
    layout = checkpoint_layout(path)
    if layout == "meta":
        args = read_meta_args(path)
        files, shards = open_meta_shards(path)
        if args.vocab_size == -1:  # params.json leaves it to the tokenizer; the embedding says the same
            args.vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
        tensors = iter_meta_tensors(files, shards)
    else:
        args = read_hf_args(path)
        tensors = iter_hf_tensors(path, args)
    with torch.device("meta"):
        model = Transformer(args)
    if quantize:
        import quantize as q
        q.quantize_model(model, quantize)
    modules = dict(model.named_modules())
    # every key the checkpoint must hold, with its shape (a quantized linear still wants its full weight)
    want = {k: tuple(t.shape) for k, t in model.state_dict().items()
            if not hasattr(modules[k.rpartition(".")[0]], "load_weight")}
    want.update({n + ".weight": tuple(m.weight_shape) for n, m in modules.items() if hasattr(m, "load_weight")})
    seen = set()
    for key, t, src in tensors:
        if key not in want:
            raise CheckpointError(f"{src}: unexpected key {key}")
        if key in seen:
            raise CheckpointError(f"{src}: duplicate key {key}")
        if tuple(t.shape) != want[key]:
            raise CheckpointError(f"{src}: {key} has shape {tuple(t.shape)}, the model expects {want[key]} "
                                  f"(from the config and the number of shards)")
        seen.add(key)
        module_name, _, leaf = key.rpartition(".")
        module = modules[module_name]
        t = t.to(device=device, dtype=dtype)
        if hasattr(module, "load_weight"):
            module.load_weight(t)  # quantize now; the full-precision tensor is dropped right after
        else:
            setattr(module, leaf, nn.Parameter(t, requires_grad=False))
    missing = sorted(want.keys() - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing key {missing[0]}{more}")
    model.reset_rope(device)
    model.layout = layout  # the layout the weights came in; sparse deltas record it
    return model.eval()


# -----------------------------------------------------------------------------
# export to the Hugging Face layout


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers, "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "initializer_range": 0.02, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_hf(model: Transformer, tokenizer_path: Optional[str], out_dir: str, max_shard_bytes: int = 5 * 2**30):
    """Write config.json, safetensors shards (+ index when sharded) and tokenizer.model to out_dir.

    The folder is written beside out_dir and renamed into place, so a failed export leaves nothing
    half-written; an existing non-empty out_dir is never overwritten.
    """
    from safetensors.torch import save_file

    if any(hasattr(m, "dequantize") for m in model.modules()):
        raise ValueError("refusing to export a quantized model: load the base in full precision and merge there")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not empty; choose a new output folder")
    args = model.args
    shards, cur, size = [], {}, 0
    for key, t in model.state_dict().items():
        if key.endswith("attention.wq.weight"):
            t = permute_meta_to_hf(t, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = permute_meta_to_hf(t, args.n_kv_heads)
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[meta_to_hf_key(key)] = t.detach().contiguous().cpu()
        size += nbytes
    shards.append(cur)
    tmp = out_dir.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dtype = next(iter(shards[0].values())).dtype
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config(args, dtype), f, indent=2)
    if tokenizer_path:
        shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
    if os.path.exists(out_dir):
        os.rmdir(out_dir)  # empty, checked above
    os.replace(tmp, out_dir)


# -----------------------------------------------------------------------------
# sampling


def sample_top_p(probs, top_p: float, generator=None):
    """sample from the smallest set of tokens whose probability mass reaches top_p. probs (B, vocab)."""
    p_sorted, idx = probs.sort(dim=-1, descending=True)
    drop = p_sorted.cumsum(-1) - p_sorted > top_p  # tokens after the mass already reached top_p
    p_sorted = p_sorted.masked_fill(drop, 0.0)
    choice = torch.multinomial(p_sorted / p_sorted.sum(-1, keepdim=True), 1, generator=generator)
    return idx.gather(-1, choice)  # (B, 1)


@torch.no_grad()
def generate(model: Transformer, prompt: list, max_new_tokens: int, temperature: float = 0.8, top_p: float = 0.95,
             eos_id: Optional[int] = None, generator=None) -> list:
    """Continue one prompt (token ids) with the KV cache; temperature 0 is greedy. Returns new ids only."""
    device = model.tok_embeddings.weight.device
    total = min(len(prompt) + max_new_tokens, model.args.max_seq_len)
    if len(prompt) >= total:
        return []
    was_training = model.training
    model.eval()
    model.setup_cache(1, total)
    try:
        tokens = torch.tensor([prompt], device=device)  # (1, T): the whole prompt first, then one token at a time
        out, pos = [], 0
        for _ in range(total - len(prompt)):
            logits, _ = model(tokens, start_pos=pos)
            pos += tokens.shape[1]
            last = logits[:, -1]  # (1, vocab)
            if temperature <= 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                nxt = sample_top_p(torch.softmax(last / temperature, dim=-1), top_p, generator)
            out.append(nxt.item())
            if nxt.item() == eos_id:
                break
            tokens = nxt
        return out
    finally:
        model.free_cache()
        model.train(was_training)
