"""
The adapter folders other tools exchange, read into this repo's form and written from it: a Hugging Face PEFT
LoRA folder (PEFT, vLLM and TGI serve it unmerged on the HF layout of the base) and the SpIEL authors' SFT folder
(their PEFT fork's `sft` tuner; SpIEL, arXiv 2401.16405). finetune.read takes either wherever this repo takes a
fine-tune; convert.py writes them.

The folders (module names are LlamaForCausalLM's: model.layers.{i}.self_attn.{q,k,v,o}_proj and
model.layers.{i}.mlp.{gate,up,down}_proj; PREFIX before each tensor key):
- PEFT LoRA: adapter_config.json (peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, use_rslora,
  base_model_name_or_path, ...) and adapter_model.safetensors with <module>.lora_A.weight (r, in) and
  <module>.lora_B.weight (out, r); the update is W + (lora_alpha / r) B A (with use_rslora: / sqrt(r)).
- SFT: adapter_config.json (peft_type "SFT", target_modules, num_deltas: full module name -> its k,
  selection_algorithm "rigl" for SpIEL-AG or "sm3" for SpIEL-MA, ...) and adapter_model.bin (the authors'
  default: a pickle of plain tensors, read with weights_only=True) or adapter_model.safetensors, with
  <module>.sft_delta.indices (int32 when out * in < 2**31, else int64) and <module>.sft_delta.values (fp32),
  the indices sorted flat row-major positions into the HF-layout weight.

The layout trap: this repo keeps wq/wk rows in Meta's order, the HF layout permutes them within each head
(llama.py). A LoRA B (out, r) moves its rows with them, A (r, in) does not; a delta's flat position
row * in + col moves to perm(row) * in + col (and is sorted again). The permutation needs the head counts, so
reading a folder for a base takes that base's ModelArgs, and nothing else of it.

What a folder cannot say, it does not: our exports carry the base's fingerprint, the fine-tunes merged into it
and the fine-tune's id in the weights file's safetensors metadata (spiel_* keys; PEFT and vLLM read tensors
only, while extra adapter_config.json fields make PEFT warn), so importing them back keeps every refusal. A
foreign folder has none of these: only its shapes can be checked against the base; its id is its weights'
hash, so the same folder is still never merged twice.
"""

import dataclasses
import json
import math
import os

import torch

from files import CheckpointError, read_json, sha256, torch_load, write_folder
from llama import HF_TO_META, PROJECTIONS, ModelArgs, Transformer, matrix_shape, permute_hf_to_meta, \
    permute_meta_to_hf, rename, target_linears

PREFIX = "base_model.model."  # PEFT's saved keys: PREFIX + the module's name in LlamaForCausalLM + suffix
LORA_KEYS, SFT_KEYS = (".lora_A.weight", ".lora_B.weight"), (".sft_delta.indices", ".sft_delta.values")
# the HF short names of the seven projections this repo fine-tunes (q_proj, ..., down_proj)
HF_PROJECTIONS = sorted(k.split(".")[-2] for k, v in HF_TO_META.items() if v.split(".")[-2] in PROJECTIONS)
META_TO_HF = {v: k for k, v in HF_TO_META.items()}
CARRIED = ("base_fingerprint", "base_merged", "finetune_id")  # our metadata, as spiel_<key> in the folder
ALGORITHMS = {"spiel-ag": "rigl", "spiel-ma": "sm3"}  # our method -> the authors' selection_algorithm
# PEFT LoRA options this repo's LoRALinear has no counterpart for: each must be absent or hold this value
LORA_PLAIN = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "rank_pattern": {},
              "alpha_pattern": {}, "modules_to_save": None, "layer_replication": None,
              "trainable_token_indices": None, "target_parameters": None}


# -----------------------------------------------------------------------------
# names, shapes and the q/k row order


def hf_module(name: str) -> str:
    """ours -> LlamaForCausalLM's module name: layers.0.attention.wq -> model.layers.0.self_attn.q_proj"""
    return rename(name + ".weight", META_TO_HF).removesuffix(".weight")


def our_module(hf_name: str):
    """LlamaForCausalLM's module name -> ours, None unless it is one of the seven projections we fine-tune."""
    name = rename(hf_name + ".weight", HF_TO_META)
    return name.removesuffix(".weight") if name and name.split(".")[-2] in PROJECTIONS else None


def base_shapes(args: ModelArgs) -> dict:
    """name -> (out, in) of every targeted linear of a model with these args (built on the meta device: free)."""
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(args, vocab_size=1))  # (the vocabulary is not targeted)
    return {n: matrix_shape(m) for n, m in target_linears(model, PROJECTIONS).items()}


def q_k_heads(name: str, args: ModelArgs):
    """the head count that permutes this matrix's rows between the layouts; None for v, o and the MLP."""
    return args.n_heads if name.endswith(".wq") else args.n_kv_heads if name.endswith(".wk") else None


def move_positions(idx, shape: tuple, n_heads: int, to_hf: bool) -> torch.Tensor:
    """flat positions row * in + col (k,) in one layout -> the same entries' positions in the other (int64)."""
    out_f, in_f = shape
    rows = torch.arange(out_f)[:, None]  # (out, 1): the row numbers, permuted like a weight
    # permute_hf_to_meta puts HF row m[r] at Meta row r: so Meta row r is HF row m[r] (and the other way round)
    dest = (permute_hf_to_meta if to_hf else permute_meta_to_hf)(rows, n_heads)[:, 0]  # (out,)
    idx = idx.long()
    return dest[idx // in_f] * in_f + idx % in_f


def position_dtype(shape: tuple) -> torch.dtype:
    return torch.int32 if math.prod(shape) < 2**31 else torch.int64  # as spiel.py and the authors store them


def sorted_delta(idx, values, shape):
    """indices ascending (both formats keep them so), in the dtype their matrix needs; values along."""
    order = idx.argsort()
    return idx[order].to(position_dtype(shape)), values[order].float()


# -----------------------------------------------------------------------------
# reading a folder into this repo's form: (format, tensors, metadata, shapes), as finetune.read gives them


def read_weights(path: str) -> tuple:
    """(tensors, safetensors metadata, file) of adapter_model.safetensors, or of adapter_model.bin (the
    authors' default: a pickle of plain tensors, read with weights_only=True)."""
    from safetensors import safe_open

    file = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(file):
        try:
            with safe_open(file, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}, file
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
    file = os.path.join(path, "adapter_model.bin")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    tensors = torch_load(file)
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors")
    return tensors, {}, file


def by_module(file: str, tensors: dict, suffixes: tuple, shapes) -> dict:
    """our module name -> (its two tensors, in the order of `suffixes`); every key must be one of ours, and
    with the base's shapes known, a module of that base."""
    found = {}
    for key, t in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        name = our_module(key[len(PREFIX):-len(suffix)]) if suffix and key.startswith(PREFIX) else None
        if name is None:
            raise CheckpointError(f"{file}: unexpected key {key} (this repo applies {' and '.join(suffixes)} "
                                  f"to the seven projections of each block only)")
        if shapes is not None and name not in shapes:
            raise CheckpointError(f"{file}: {hf_module(name)}: no such module in this base (another model?)")
        found.setdefault(name, {})[suffix] = t
    for name, pair in found.items():
        if len(pair) != 2:
            raise CheckpointError(f"{file}: {hf_module(name)} has {next(iter(pair))} but no "
                                  f"{next(s for s in suffixes if s not in pair)}")
    if not found:
        raise CheckpointError(f"{file}: no {suffixes[0]} tensors")
    order = [n for n in shapes if n in found] if shapes is not None else found  # model order, as our files have it
    return {name: tuple(found[name][s] for s in suffixes) for name in order}


def check_targets(cfg_path: str, cfg: dict):
    targets = cfg.get("target_modules")  # a list of (short or full) names, or a regex string (the keys decide)
    if isinstance(targets, list):
        other = [t for t in targets if str(t).rpartition(".")[2] not in HF_PROJECTIONS]
        if other:
            raise CheckpointError(f"{cfg_path}: target_modules lists {other[0]}, which this repo does not fine-tune "
                                  f"(only {', '.join(HF_PROJECTIONS)})")


def carried(file_meta: dict, file: str) -> dict:
    """our metadata from an export of ours; a foreign folder's id is its weights' hash (never merged twice)."""
    meta = {k: file_meta["spiel_" + k] for k in CARRIED if "spiel_" + k in file_meta}
    return meta if "finetune_id" in meta else {"finetune_id": sha256(file), **meta}


def read_peft(path: str, cfg: dict, args, shapes) -> tuple:
    cfg_path = os.path.join(path, "adapter_config.json")
    for key, plain in LORA_PLAIN.items():
        if cfg.get(key) not in (None, False, {}, [], plain):
            raise CheckpointError(f"{cfg_path}: {key} {json.dumps(cfg[key])} is not supported (this repo's LoRA is "
                                  f"W + scaling B A on the seven projections only; needs {key} {json.dumps(plain)})")
    check_targets(cfg_path, cfg)
    try:
        r, alpha, dropout = int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout") or 0.0)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: missing or bad field {e}") from None
    if cfg.get("use_rslora"):  # scaling alpha / sqrt(r); ours is alpha / r: the same with alpha * sqrt(r)
        alpha *= math.sqrt(r)
    weights, file_meta, file = read_weights(path)
    tensors, found = {}, {}
    for name, (A, B) in by_module(file, weights, LORA_KEYS, shapes).items():
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise CheckpointError(f"{file}: {hf_module(name)}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                  f"are not (r, in) and (out, r) with adapter_config.json's r = {r}")
        found[name] = (B.shape[0], A.shape[1])
        if shapes is not None:
            if found[name] != shapes[name]:
                raise CheckpointError(f"{file}: {hf_module(name)} is {found[name][0]}x{found[name][1]} in the adapter "
                                      f"but {shapes[name][0]}x{shapes[name][1]} in this base (another model?)")
            heads = q_k_heads(name, args)
            B = permute_hf_to_meta(B, heads) if heads else B
        tensors[name + ".A"], tensors[name + ".B"] = A.float(), B.float()
    meta = {"format": "spiel-lora", "rank": str(r), "alpha": str(alpha), "dropout": str(dropout),
            "row_order": "meta" if shapes is not None else "hf", **carried(file_meta, file)}
    return "spiel-lora", tensors, meta, found


def read_sft(path: str, cfg: dict, args, shapes) -> tuple:
    cfg_path = os.path.join(path, "adapter_config.json")
    check_targets(cfg_path, cfg)
    num_deltas = cfg.get("num_deltas") or {}
    weights, file_meta, file = read_weights(path)
    modules = by_module(file, weights, SFT_KEYS, shapes)
    unlisted = sorted(set(num_deltas) - {hf_module(n) for n in modules}) if isinstance(num_deltas, dict) else []
    if not isinstance(num_deltas, dict) or unlisted:
        raise CheckpointError(f"{cfg_path}: num_deltas must map the weights file's modules to their number of "
                              f"deltas" + (f" ({unlisted[0]} is not in {file})" if unlisted else ""))
    tensors, found = {}, {}
    for name, (idx, values) in modules.items():
        hf = hf_module(name)
        if idx.dim() != 1 or idx.shape != values.shape or idx.is_floating_point() or not values.is_floating_point():
            raise CheckpointError(f"{file}: {hf}: indices (integers) and values (floats) must be 1-D of one length")
        if hf in num_deltas and num_deltas[hf] != idx.numel():
            raise CheckpointError(f"{cfg_path}: num_deltas gives {hf} {num_deltas[hf]} deltas, {file} holds "
                                  f"{idx.numel()}")
        found[name] = shapes[name] if shapes is not None else None  # (an SFT folder does not say its shapes)
        if shapes is not None:
            (o, i), heads = shapes[name], q_k_heads(name, args)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= o * i):
                raise CheckpointError(f"{file}: {hf} has indices outside its {o}x{i} matrix in this base "
                                      f"(another model?)")
            idx = move_positions(idx, (o, i), heads, to_hf=False) if heads else idx
            idx, values = sorted_delta(idx, values, (o, i))
        tensors[name + ".indices"], tensors[name + ".values"] = idx, values.float()
    total = sum(t.numel() for n, t in tensors.items() if n.endswith(".values"))
    meta = {"format": "spiel-delta", "num_deltas": str(total), "row_order": "meta" if shapes is not None else "hf",
            **carried(file_meta, file)}
    if shapes is not None:
        meta["density"] = f"{total / sum(math.prod(found[n]) for n in found):.6g}"
    method = {alg: m for m, alg in ALGORITHMS.items()}.get(str(cfg.get("selection_algorithm")).lower())
    return "spiel-delta", tensors, meta | ({"method": method} if method else {}), found


def read_folder(path: str, args=None) -> tuple:
    """(format, tensors, metadata, shapes) of a PEFT LoRA or SFT folder, as finetune.read gives them for our
    files: our module names, q/k rows in Meta's order, checked against the shapes of a base with `args`.
    Without args only the folder itself is checked: q/k rows stay in HF order (metadata row_order "hf") and an
    SFT folder's shapes are unknown (None)."""
    cfg_path = os.path.join(path, "adapter_config.json")
    cfg = read_json(cfg_path, "not a PEFT LoRA or SFT adapter folder")
    shapes = base_shapes(args) if args is not None else None
    peft_type = str(cfg.get("peft_type")).upper()
    if peft_type == "LORA":
        return read_peft(path, cfg, args, shapes)
    if peft_type == "SFT":
        return read_sft(path, cfg, args, shapes)
    raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; this repo reads \"LORA\" (PEFT) and "
                          f"\"SFT\" (the authors' SpIEL) folders")


# -----------------------------------------------------------------------------
# writing: a PEFT LoRA folder, or an SFT folder


def write_adapter(out_dir: str, config: dict, weights: dict, meta: dict):
    """adapter_config.json and adapter_model.safetensors (with our metadata), written beside out_dir (absent or
    empty: convert checks) and renamed into place."""
    from safetensors.torch import save_file

    extra = {"spiel_" + k: str(meta[k]) for k in CARRIED if k in meta}

    def write(tmp):
        save_file({k: t.contiguous() for k, t in weights.items()}, os.path.join(tmp, "adapter_model.safetensors"),
                  metadata={"format": "pt", **extra})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    write_folder(out_dir, write)


def target_modules(names, args: ModelArgs) -> list:
    """PEFT's target_modules: short names when every layer has them (the usual case), else full names."""
    hf = {hf_module(n) for n in names}
    short = {h.rpartition(".")[2] for h in hf}
    every = {hf_module(n) for n in base_shapes(args) if hf_module(n).rpartition(".")[2] in short}
    return sorted(short) if hf == every else sorted(hf)


def write_peft(out_dir: str, tensors: dict, meta: dict, shapes: dict, args: ModelArgs, base_name: str):
    weights = {}
    for name in shapes:
        B, heads = tensors[name + ".B"], q_k_heads(name, args)
        weights[PREFIX + hf_module(name) + ".lora_A.weight"] = tensors[name + ".A"].float()
        weights[PREFIX + hf_module(name) + ".lora_B.weight"] = (permute_meta_to_hf(B, heads) if heads else B).float()
    alpha = float(meta["alpha"])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "r": int(meta["rank"]), "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
              "lora_dropout": float(meta.get("dropout", 0.0)), "target_modules": target_modules(shapes, args),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    write_adapter(out_dir, config, weights, meta)


def write_sft(out_dir: str, tensors: dict, meta: dict, shapes: dict, args: ModelArgs, base_name: str):
    weights, num_deltas = {}, {}
    for name, shape in shapes.items():
        idx, heads, hf = tensors[name + ".indices"], q_k_heads(name, args), hf_module(name)
        idx = move_positions(idx, shape, heads, to_hf=True) if heads else idx
        weights[PREFIX + hf + ".sft_delta.indices"], weights[PREFIX + hf + ".sft_delta.values"] = \
            sorted_delta(idx, tensors[name + ".values"], shape)
        num_deltas[hf] = idx.numel()
    config = {"peft_type": "SFT", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "target_modules": target_modules(shapes, args), "num_tunable_weights": sum(num_deltas.values()),
              "num_deltas": num_deltas, "dtype": "float32", "inference_mode": True}
    if meta.get("method") in ALGORITHMS:
        config["selection_algorithm"] = ALGORITHMS[meta["method"]]
    write_adapter(out_dir, config, weights, meta)
