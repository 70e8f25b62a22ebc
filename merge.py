"""
Merge fine-tunes into a full model and export it in the Hugging Face layout (loadable by `load_model`
and by transformers' `from_pretrained`). Several fine-tunes add up: sparse fine-tunes compose (SpIEL,
arXiv 2401.16405, section 3: W = W0 + the sum of the scattered deltas).

    python merge.py --ckpt llama-2-7b --delta runs/x/delta.safetensors --out llama-2-7b-merged
    python merge.py --ckpt llama-2-7b --out llama-2-7b-hf   # no fine-tune: the base in the HF layout

Merging happens in a full-precision copy of the base (never into int8/NF4 weights), one matrix at a time
in fp32, rounded once to --dtype: by default the base's own (bf16 for Meta's weights, whatever an HF
checkpoint holds), so an fp32 base merges in fp32. The export's config.json lists what was merged into it
("spiel_merged"), so the same fine-tune is never applied to it twice.
"""

import json
import os
import shutil
import sys

import torch

import finetune
import hub
import lora
import spiel
import tokenizer
from config import Parser
from files import CheckpointError, Progress, check_new_folder, check_writable, read_json, write_folder
from llama import HF_TO_META, ModelArgs, Transformer, check_checkpoint, check_vocab, load_model, permute_meta_to_hf, \
    read_args, read_shapes, rename


def hf_config(args: ModelArgs, ckpt, dtype: torch.dtype, merged: list) -> dict:
    """the export's config.json: the source checkpoint's own (its model_type, rope scaling, biases, tie, special
    token ids: all of it stays) with the export's dtype and the fine-tunes merged into it; for Meta's layout (LLaMA
    2 and CodeLlama: Meta's Llama 3 layout is refused on load) or no source, a config of its ModelArgs: Qwen2's
    for q/k/v biases, Mistral's for a sliding window, else Llama's (with its rope scaling, bias and tie)."""
    if ckpt and os.path.isfile(os.path.join(ckpt, "config.json")) and \
            not os.path.isfile(os.path.join(ckpt, "params.json")):
        if read_args(ckpt, "hf") != args:
            raise ValueError(f"{ckpt}: its config.json does not describe this model (another shape): no export")
        cfg = read_json(os.path.join(ckpt, "config.json"))
    else:
        kind = "qwen2" if set(args.bias) == {"wq", "wk", "wv"} else "mistral" if args.sliding_window else "llama"
        cfg = {"architectures": [{"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind] + "ForCausalLM"],
               "model_type": kind, "hidden_act": "silu",
               "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_attention_heads": args.n_heads,
               "num_hidden_layers": args.n_layers, "num_key_value_heads": args.n_kv_heads,
               "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
               "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
               "attention_bias": "wo" in args.bias, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
               "initializer_range": 0.02}
        cfg |= {k: v for k, v in (("rope_scaling", args.rope_scaling), ("sliding_window", args.sliding_window)) if v}
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(dtype).removeprefix("torch.")
    return cfg | {"spiel_merged": merged}


MAX_SHARD_BYTES = 5 * 2**30  # as transformers' save_pretrained


def save_hf(model: Transformer, ckpt, out_dir: str, merged=(), state_dict=None, replace: bool = False,
            verbose: bool = True):
    """config.json (hf_config of the source checkpoint `ckpt`, listing the fine-tunes `merged` into these
    weights), safetensors shards (+ index when sharded) and the source's tokenizer files (tokenizer.files; none when
    ckpt is None), written beside out_dir and renamed into place (a failed export leaves nothing
    half-written); a non-empty out_dir is never touched, unless `replace` (train.py's own model/ when a finished
    run is extended: swapped once the new one is whole). state_dict: the model's weights when they are not all in
    `model` (a sharded model gathered by its caller)."""
    from safetensors.torch import save_file

    if any(hasattr(m, "dequantize") for m in model.modules()):
        raise ValueError("refusing to export a quantized model: load the base in full precision and merge there")
    if spiel.delta_layers(model) or lora.lora_layers(model):
        raise ValueError("the model still has sparse deltas or LoRA adapters attached: merge them first "
                         "(finetune.merge) or save them on their own (finetune.save)")
    if not replace:
        check_new_folder(out_dir)
    meta_to_hf = {v: k for k, v in HF_TO_META.items()}
    shards, size = [{}], 0
    for key, t in (state_dict or model.state_dict()).items():
        if key == "output.weight" and model.args.tie_embeddings:
            continue  # (the embedding's: a tied checkpoint has no lm_head.weight)
        if ".attention.wq." in key or ".attention.wk." in key:
            t = permute_meta_to_hf(t, model.args.n_heads if ".wq." in key else model.args.n_kv_heads)
        if shards[-1] and size + t.nbytes > MAX_SHARD_BYTES:
            shards, size = shards + [{}], 0
        shards[-1][rename(key, meta_to_hf)] = t.detach().contiguous().cpu()
        size += t.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(t.nbytes for s in shards for t in s.values())

    def write(tmp):
        progress = Progress(f"writing {out_dir}", total, quiet=not verbose)
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            progress.update(sum(t.nbytes for t in shard.values()))
        progress.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: name for name, s in zip(names, shards) for k in s}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(model.args, ckpt, next(iter(shards[0].values())).dtype, list(merged)), f, indent=2)
        for name, path in (tokenizer.files(ckpt) if ckpt else {}).items():
            shutil.copyfile(path, os.path.join(tmp, name))
    write_folder(out_dir, write, replace)  # (beside out_dir, renamed when whole: a failure leaves nothing)


def main(argv=None):
    ap = Parser(prog="merge.py", description=__doc__)
    ap.add_argument("--ckpt", required=True, help="the base checkpoint the fine-tunes were trained on (a folder, or a "
                                                  "Hub id ORG/NAME)")
    ap.add_argument("--delta", action="append", default=[], help="delta or LoRA file, or PEFT LoRA / SFT folder "
                    "(repeat to add several; none: the base alone, e.g. a Meta-layout base in the HF layout)")
    ap.add_argument("--out", required=True, help="new folder for the merged model (never overwritten)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="the export's dtype (auto: the base's own)")
    args = ap.parse_args(argv)

    check_new_folder(args.out)  # everything that can be checked before the (slow) load of the base
    check_writable(args.out, "--out")
    args.ckpt = hub.resolve(args.ckpt)
    check_checkpoint(args.ckpt)
    check_vocab(args.ckpt, tokenizer.load(args.ckpt))  # (the export carries this tokenizer)
    shapes = read_shapes(args.ckpt) if args.delta else None
    fts = [finetune.read(path, shapes) for path in args.delta]  # each fine-tune is read once
    model = load_model(args.ckpt, dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    base = finetune.base_of(model, args.ckpt)
    for ft in fts:
        finetune.merge(model, ft, base)
        print(f"merged {ft.path}")
    save_hf(model, args.ckpt, args.out, base.merged)
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    print(f"wrote {args.out} (Hugging Face layout, {dtype})")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
