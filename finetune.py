"""
A fine-tune on disk, and the one way in. This repo writes a sparse delta (SpIEL) or a LoRA adapter as one
safetensors file; `read` takes that file, a PEFT LoRA folder or the SpIEL authors' SFT folder (adapters.py),
`check` says whether it fits a base, and `load` / `merge` read it once, check it and attach or merge it.

The file: per matrix `<module>.indices` (int32, or int64 for a matrix of 2**31 entries or more) and
`<module>.values` (fp32) for a delta, or `<module>.A` (r, in) and `<module>.B` (out, r), fp32, for LoRA; module
names are this repo's (layers.0.attention.wq). Its safetensors metadata, all strings:
  format            "spiel-delta" or "spiel-lora"
  shapes            JSON: module -> [out, in]
  row_order         "meta": q/k rows, and a delta's positions in them, in Meta's order (llama.py)
  base_fingerprint  fingerprint(base): a hash of weights fine-tuning never changes
  base_merged       JSON list: the fine-tunes that were merged into that base before (merge.py)
  finetune_id       the run's id, so a fine-tune is never merged twice into one model
  targets           the projections it holds, e.g. "wq,wk,wv,wo" for an attention-only fine-tune
  and num_deltas, density (a delta) or rank, alpha, dropout (LoRA), with the run's method and step.
Fine-tunes trained apart on one base add up (sparse fine-tunes compose: SpIEL, arXiv 2401.16405, section 3), so
a base may hold merged ones: a fine-tune fits a base with its base's fingerprint that holds every fine-tune
that had been merged into its base.
"""

import dataclasses
import glob
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

import adapters
import lora
import spiel
from files import CheckpointError, read_json, torch_load, write_whole
from llama import HF_TO_META, META_SHARD_DIM, PROJECTIONS, ModelArgs, Transformer, matrix_shape, meta_shards, rename, \
    target_linears

FORMATS = ("spiel-delta", "spiel-lora")


def fingerprinted(name: str) -> bool:
    return name.endswith("norm.weight") or name == "tok_embeddings.weight"


def fingerprint(model) -> str:
    """a short hash of weights fine-tuning never touches (norms, a slice of the embedding), rounded to bf16 so
    that the same base loaded in another dtype or quantized gives the same answer. A fine-tune records the
    fingerprint of its base; computed before --fsdp shards the model (one process alone holds a shard)."""
    return digest((name, t) for name, t in model.state_dict().items() if fingerprinted(name))


def digest(named) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(t[:64].detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_at(ckpt: str, args: ModelArgs) -> str:
    """fingerprint(the base in the folder `ckpt`, whose config gave `args`) without loading it: only the first 64
    rows of the norms and the embedding are read (safetensors slices, mmap'ed .pth / .bin files)."""
    with torch.device("meta"):  # (the names, in the model's order: free)
        names = [n for n in Transformer(dataclasses.replace(args, vocab_size=1)).state_dict() if fingerprinted(n)]
    found = {}
    if os.path.isfile(os.path.join(ckpt, "params.json")):  # Meta's layout (llama.check_checkpoint's test)
        _, shards = meta_shards(ckpt)
        for name in (n for n in names if n in shards[0]):  # tensor-parallel: the embedding is split by columns
            parts = [s[name][:64] for s in shards]
            found[name] = torch.cat(parts, META_SHARD_DIM["tok_embeddings"]) if len(parts) > 1 and \
                parts[0].dim() == 2 else parts[0]
    else:
        from safetensors import safe_open
        for file in sorted(glob.glob(os.path.join(ckpt, "*.safetensors")) or
                           glob.glob(os.path.join(ckpt, "pytorch_model*.bin"))):
            try:
                f = safe_open(file, framework="pt") if file.endswith(".safetensors") else torch_load(file)
                found |= {rename(k, HF_TO_META): (f.get_slice(k)[:64] if hasattr(f, "get_slice") else f[k][:64])
                          for k in f.keys() if fingerprinted(rename(k, HF_TO_META) or "")}
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read ({e})") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise CheckpointError(f"{ckpt}: missing key {missing[0]}")
    return digest((n, found[n]) for n in names)


@dataclass
class Base:
    """what a fine-tune must have been trained on: the base's fingerprint, and the fine-tunes merged into it
    so far, in order (an export of merge.py lists them in its config.json; merging here adds to them)."""
    fingerprint: str
    merged: list = field(default_factory=list)


def base_of(model, ckpt: str) -> Base:
    """the Base of a model just loaded from the checkpoint folder `ckpt` (before any sharding)."""
    return Base(fingerprint(model), merged_into(ckpt))


def base_at(ckpt: str, args: ModelArgs) -> Base:
    """the Base of the checkpoint folder `ckpt`, read without loading it (fingerprint_at)."""
    return Base(fingerprint_at(ckpt, args), merged_into(ckpt))


def merged_into(ckpt: str) -> list:
    """the fine-tunes merge.py merged into the base in `ckpt` (its config.json lists them)."""
    if not os.path.isfile(os.path.join(ckpt, "params.json")) and os.path.isfile(os.path.join(ckpt, "config.json")):
        return list(read_json(os.path.join(ckpt, "config.json")).get("spiel_merged", []))
    return []


@dataclass
class FineTune:
    """a fine-tune as read from disk, before it touches a model."""
    path: str
    kind: str  # "spiel-delta" or "spiel-lora"
    tensors: dict  # "<module>.indices" / ".values", or "<module>.A" / ".B"
    meta: dict  # the metadata above (a folder's, converted)
    shapes: dict  # module -> (out, in); None for each module of an SFT folder read without a base

    @property
    def id(self) -> str:
        return self.meta.get("finetune_id", os.path.abspath(self.path))


# -----------------------------------------------------------------------------
# writing


def write_file(path: str, kind: str, tensors: dict, meta: dict, shapes: dict):
    """the safetensors file, written whole (a temporary name, renamed): tensors and metadata as above."""
    from safetensors.torch import save_file

    meta = {**{k: str(v) for k, v in meta.items()}, "format": kind, "row_order": "meta",
            "shapes": json.dumps({n: list(s) for n, s in shapes.items()})}
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    write_whole(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def save(model, path: str, base: Base, meta: Optional[dict] = None):
    """the model's sparse deltas or LoRA adapters, with the base they were trained on and `meta`."""
    deltas, (adapters_, hyper) = spiel.delta_tensors(model), lora.lora_tensors(model)
    layers = spiel.delta_layers(model) or lora.lora_layers(model)
    if not layers:
        raise ValueError("the model has no sparse deltas or LoRA adapters to save")
    shapes = {n: m.weight_shape for n, m in layers.items()}
    targets = ",".join(p for p in PROJECTIONS if p in {n.rpartition(".")[2] for n in shapes})
    meta = {"base_fingerprint": base.fingerprint, "base_merged": json.dumps(base.merged), "targets": targets,
            **(meta or {})}
    if deltas:
        k = sum(idx.numel() for idx, _ in deltas.values())
        meta |= {"num_deltas": k, "density": f"{k / sum(math.prod(s) for s in shapes.values()):.6g}"}
        tensors = {f"{n}.{part}": t for n, pair in deltas.items() for part, t in zip(("indices", "values"), pair)}
        write_file(path, "spiel-delta", tensors, meta, shapes)
    else:
        tensors = {f"{n}.{part}": t for n, pair in adapters_.items() for part, t in zip("AB", pair)}
        write_file(path, "spiel-lora", tensors, {**hyper, **meta}, shapes)


# -----------------------------------------------------------------------------
# reading and checking


def read(path: str, args: Optional[ModelArgs] = None) -> FineTune:
    """a fine-tune from our file or an adapter folder (adapters.read_folder: with the base's `args`, q/k rows are
    put in Meta's order and the shapes checked against that base). Only the file itself is checked here."""
    if os.path.isdir(path):
        kind, tensors, meta, shapes = adapters.read_folder(path, args)
    elif not os.path.isfile(path):
        raise CheckpointError(f"{path}: fine-tune file not found")
    else:
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
            kind, shapes = meta.get("format"), {n: tuple(s) for n, s in json.loads(meta.get("shapes", "{}")).items()}
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
    if kind not in FORMATS:
        raise CheckpointError(f"{path}: neither a spiel delta nor a LoRA adapter (format {kind!r})")
    if not shapes or len(tensors) != 2 * len(shapes):
        raise CheckpointError(f"{path}: tensors and metadata disagree")
    return FineTune(path, kind, tensors, meta, shapes)


def check(ft: FineTune, model, base: Base):
    """that `ft` fits this model and base: every matrix is a plain linear of its shape, the base is the one it was
    trained on, and it is not merged into it already. Errors name the file."""
    linears = target_linears(model, {n.rpartition(".")[2] for n in ft.shapes})
    for name, (o, i) in ft.shapes.items():
        if name not in linears:
            raise CheckpointError(f"{ft.path}: a fine-tune for {name}, which this model does not have as a plain "
                                  f"linear (another model, or a fine-tune already added?)")
        if matrix_shape(linears[name]) != (o, i):
            got = matrix_shape(linears[name])
            raise CheckpointError(f"{ft.path}: {name} is {o}x{i} in the file but {got[0]}x{got[1]} in this model "
                                  f"(another model?)")
    check_base(ft, base)


def check_base(ft: FineTune, base: Base):
    """that `ft` was trained on `base` (its fingerprint, and the fine-tunes merged into it then) and is not merged
    into it already; convert.py checks this alone, on a base it does not load (base_at)."""
    if ft.id in base.merged:
        raise CheckpointError(f"{ft.path}: already merged into this model (its config.json lists {ft.id}); applying "
                              f"it again would add it twice")
    # the base it was trained on: the same weights, with every fine-tune that was merged into them then merged
    # here too (others merged since are fine: sparse fine-tunes add up)
    if ft.meta.get("base_fingerprint", base.fingerprint) != base.fingerprint:
        raise CheckpointError(f"{ft.path}: this fine-tune was trained on another base model (it expects the base whose "
                              f"fingerprint is {ft.meta['base_fingerprint']}; this base's is {base.fingerprint}); "
                              f"pass the --ckpt it was trained on")
    missing = [i for i in json.loads(ft.meta.get("base_merged", "[]")) if i not in base.merged]
    if missing:
        raise CheckpointError(f"{ft.path}: this fine-tune was trained on another base model: this one with fine-tune"
                              f"{'s' * (len(missing) > 1)} {', '.join(missing)} merged into it (by merge.py); "
                              f"pass that merged model as --ckpt")


def apply(model, ft: FineTune) -> dict:
    """attach `ft` (checked against this model) as sparse deltas or LoRA adapters; its tensors are checked first,
    so a bad file leaves the model untouched. -> name -> layer"""
    if ft.kind == "spiel-delta":
        deltas = {}
        for name, (o, i) in ft.shapes.items():
            idx, val = ft.tensors.get(name + ".indices"), ft.tensors.get(name + ".values")
            if idx is None or val is None or idx.shape != val.shape or idx.dim() != 1:
                raise CheckpointError(f"{ft.path}: {name} needs 1-D .indices and .values of equal length")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= o * i):
                raise CheckpointError(f"{ft.path}: {name} has indices outside its {o}x{i} matrix")
            if torch.unique(idx).numel() != idx.numel():
                raise CheckpointError(f"{ft.path}: {name} has repeated indices")
            deltas[name] = (idx, val)
        return spiel.attach_deltas(model, deltas)
    try:
        rank, alpha, dropout = int(ft.meta["rank"]), float(ft.meta["alpha"]), float(ft.meta.get("dropout", 0.0))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ft.path}: bad metadata ({e})") from None
    pairs = {}
    for name, (o, i) in ft.shapes.items():
        A, B = ft.tensors.get(name + ".A"), ft.tensors.get(name + ".B")
        if A is None or B is None or A.shape != (rank, i) or B.shape != (o, rank):
            raise CheckpointError(f"{ft.path}: {name} needs .A ({rank}, {i}) and .B ({o}, {rank})")
        pairs[name] = (A, B)
    return lora.attach_lora(model, pairs, rank, alpha, dropout)


def load(model, path: str, base: Base) -> FineTune:
    """read the fine-tune at `path` (our file or a folder), check that it fits, attach it. -> what was read"""
    ft = read(path, model.args)
    check(ft, model, base)
    apply(model, ft)
    return ft


def merge(model, ft: FineTune, base: Base):
    """W0 += the fine-tune `ft` (checked here), in a full-precision base; its plain linears are back afterwards,
    ready for the next one, and `base` now lists it as merged."""
    check(ft, model, base)
    apply(model, ft)
    spiel.merge_deltas(model)
    lora.merge_lora(model)
    base.merged.append(ft.id)
