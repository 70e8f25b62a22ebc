"""
LLaMA 2 from scratch: the model, the tokenizer, and loading a checkpoint in either layout (Meta's or Hugging Face's).

The architecture is Touvron et al. 2023, "Llama 2" (arXiv 2307.09288), section 2.2: pre-norm RMSNorm,
rotary position embeddings (RoPE, Su et al. 2021), SwiGLU feed-forward, grouped-query attention (70B).
Inside the model the parameter names are Meta's (`layers.0.attention.wq.weight`) and RoPE rotates adjacent
pairs (dims 2i, 2i+1), exactly as Meta's reference does.

The two layouts on disk:
- Meta: `params.json` (dim, n_layers, n_heads, optionally n_kv_heads, ffn_dim_multiplier, multiple_of;
  vocab_size -1 means "the tokenizer's") and `consolidated.NN.pth`, one tensor-parallel shard per file (each
  weight split along its own dimension, META_SHARD_DIM), with `tokenizer.model` one folder up.
- Hugging Face: `config.json` (hidden_size, intermediate_size, num_attention_heads, ...), safetensors or
  `pytorch_model*.bin` files (sharded with an index), `tokenizer.model` beside them; names as in HF_TO_META.
  HF's rotary embedding pairs dim i with i + head_dim/2 ("rotate_half") instead of 2i with 2i+1, so its q and k
  weights hold the same rows as Meta's, permuted within each head: permute_hf_to_meta undoes it on load,
  permute_meta_to_hf redoes it for an export. Get it wrong and the model still runs, but its text turns to
  gibberish after a few tokens, which is why tests compare logits across the layouts.
"""

import glob
import os
import re
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    max_seq_len: int = 4096

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
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


def rope_cache(args: ModelArgs, device=None):
    """cos and sin of the rotation angles, each (max_seq_len, head_dim // 2), fp32."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim))
    angles = torch.outer(torch.arange(args.max_seq_len, device=device).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """rotate adjacent pairs (2i, 2i+1) of x (B, T, H, D) by the angles of their positions; cos, sin (T, D/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2): broadcast over batch and heads
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


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
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        mask = None
        if start_pos is not None:  # generation: write this chunk into the cache, attend to all of it so far
            self.cache_k[:B, start_pos:start_pos + T], self.cache_v[:B, start_pos:start_pos + T] = k, v
            k, v = self.cache_k[:B, :start_pos + T], self.cache_v[:B, :start_pos + T]
            # query i (at position start_pos + i) sees key j iff j <= start_pos + i: (T, start_pos + T)
            mask = torch.arange(start_pos + T, device=x.device) <= start_pos + torch.arange(T, device=x.device)[:, None]
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
        self.grad_checkpoint = False  # recompute each block in backward (less activation memory)
        self.reset_rope()

    def reset_rope(self, device=None):
        """the real-valued rope tables, not in the state dict (recomputed after building on the meta device)."""
        cos, sin = rope_cache(self.args, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, targets=None, start_pos: Optional[int] = None, reduction: str = "mean"):
        """tokens (B, T) -> logits (B, T, vocab) fp32, and the next-token loss if targets (B, T) are given.
        targets[:, t] is the token after tokens[:, t] or IGNORE_INDEX; reduction "sum" lets a caller
        normalise by the target tokens of a whole step. start_pos (generation only) uses the KV cache."""
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
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction=reduction)

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


# -----------------------------------------------------------------------------
# tokenizer


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
        self.path, self.n_words = path, self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        return [self.bos_id] * bos + self.sp.EncodeAsIds(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


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
# tensor-parallel shards of Meta's checkpoints: the dim each weight is split along (norms are replicated)
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def rename(key: str, table: dict) -> Optional[str]:
    """a key through a {pattern: template} table ({} stands for the layer number); None if no pattern fits."""
    layer = re.search(r"\.(\d+)\.", key)
    pattern = key.replace(f".{layer[1]}.", ".{}.", 1) if layer else key
    return table[pattern].format(layer[1] if layer else "") if pattern in table else None


def permute_hf_to_meta(w, n_heads):
    """q or k rows (out, in) in HF's order -> Meta's: within each head, HF rows [0, d/2) and [d/2, d) interleave."""
    return w.view(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def permute_meta_to_hf(w, n_heads):
    """the inverse: q or k rows in Meta's order -> HF's (for an export in the HF layout)."""
    return w.view(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def check_checkpoint(path: str, tokenizer: bool = True) -> str:
    """the layout of a checkpoint folder ("meta" or "hf") once its config, weight files and (tokenizer=True)
    tokenizer are there: the one check train.py, generate.py and merge.py run before anything slow."""
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
    if tokenizer:
        find_tokenizer(path)
    return layout


def find_tokenizer(ckpt_dir: str) -> str:
    """tokenizer.model in the checkpoint folder, or one level up (Meta's download keeps it there)."""
    for cand in (os.path.join(ckpt_dir, "tokenizer.model"), os.path.join(ckpt_dir, "..", "tokenizer.model")):
        if os.path.isfile(cand):
            return os.path.normpath(cand)
    raise CheckpointError(f"{ckpt_dir}: no tokenizer.model in this folder or its parent")


def read_args(path: str, layout: str) -> ModelArgs:
    """ModelArgs from params.json (Meta; vocab_size -1 is resolved from the embedding later) or config.json."""
    cfg_path = os.path.join(path, "params.json" if layout == "meta" else "config.json")
    c = read_json(cfg_path)
    try:
        if layout == "meta":
            known = {f.name for f in fields(ModelArgs)}
            return ModelArgs(**{k: v for k, v in c.items() if k in known})
        if c.get("tie_word_embeddings", False):
            raise ValueError("tied input/output embeddings are not LLaMA 2 (tie_word_embeddings is true)")
        return ModelArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                         n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                         hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
                         rope_theta=c.get("rope_theta", 10000.0), max_seq_len=c.get("max_position_embeddings", 4096))
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def read_shapes(path: str) -> ModelArgs:
    """the shapes of a checkpoint (either layout) from its config, without loading a weight (Meta's vocab_size -1:
    the embedding's rows, read from the mmap'ed file)."""
    args = read_args(path, check_checkpoint(path, tokenizer=False))
    if args.vocab_size == -1:
        args.vocab_size = meta_shards(path)[1][0]["tok_embeddings.weight"].shape[0]
    return args


def check_vocab(path: str, tok: Tokenizer):
    """the embedding needs a row for every piece of the tokenizer. More rows than pieces is a padded vocabulary
    (e.g. 32,001 rows for an added pad token): it trains as it is, and sampling never picks a row the tokenizer
    cannot decode (generate.py)."""
    rows = read_shapes(path).vocab_size
    if rows < tok.n_words:
        raise CheckpointError(f"{path}: its embedding has {rows:,} rows but {tok.path} has {tok.n_words:,} pieces: "
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
    """yield (meta key, tensor, file) from safetensors or pytorch_model*.bin, one tensor at a time, q/k rows
    put back in Meta's order."""
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
            if key.endswith(("attention.wq.weight", "attention.wk.weight")):
                t = permute_hf_to_meta(t, args.n_heads if ".wq." in key else args.n_kv_heads)
            yield key, t, file


def load_model(path: str, device="cpu", dtype: Optional[torch.dtype] = torch.bfloat16, quantize: Optional[str] = None,
               verbose: bool = True) -> Transformer:
    """Load a LLaMA 2 checkpoint in either layout. The model is built on the meta device and each tensor is
    assigned as it is read (mmap'ed, weights_only=True), so host memory stays near one copy of the weights;
    dtype None keeps each tensor's stored dtype; with quantize="int8"|"nf4" the seven projections are quantized
    tensor by tensor while loading. Every missing, unexpected, duplicate or misshapen key is an error naming
    the file and the key. verbose: report progress (a bar, or a line every 10 s in a log)."""
    layout = check_checkpoint(path, tokenizer=False)
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
    # every key the checkpoint must hold, with its shape (a quantized linear still wants its full weight)
    want = {k: tuple(t.shape) for k, t in model.state_dict().items() if not hasattr(modules[k.rpartition(".")[0]],
                                                                                   "load_weight")}
    want |= {n + ".weight": tuple(m.weight_shape) for n, m in modules.items() if hasattr(m, "load_weight")}
    seen = set()
    files = glob.glob(os.path.join(path, "consolidated.*.pth" if layout == "meta" else "*.safetensors")) or \
        glob.glob(os.path.join(path, "pytorch_model*.bin"))
    progress = Progress(f"loading {path}" + (f" (quantizing to {quantize})" if quantize else ""),
                        sum(os.path.getsize(f) for f in files), quiet=not verbose)
    for key, t, src in tensors:
        if key not in want or key in seen:
            raise CheckpointError(f"{src}: {'duplicate' if key in seen else 'unexpected'} key {key}")
        if tuple(t.shape) != want[key]:
            raise CheckpointError(f"{src}: {key} has shape {tuple(t.shape)}, the model expects {want[key]} "
                                  f"(from the config and the number of shards)")
        seen.add(key)
        module_name, _, leaf = key.rpartition(".")
        read, module, t = t.numel() * t.element_size(), modules[module_name], t.to(device=device, dtype=dtype)
        if hasattr(module, "load_weight"):
            module.load_weight(t)  # quantized now; the full-precision tensor is dropped right after
        else:
            setattr(module, leaf, nn.Parameter(t, requires_grad=False))
        progress.update(read)
    progress.close()
    missing = sorted(want.keys() - seen)
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))
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
