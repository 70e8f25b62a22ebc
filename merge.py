"""
Merge fine-tunes into a full model in the Hugging Face layout (loadable by `load_model`, and by
transformers' `from_pretrained`). Several deltas add up: sparse fine-tunes are composable (SpIEL,
arXiv 2401.16405, section 3: W = W0 + sum of scattered deltas).

    python merge.py --ckpt llama-2-7b --delta runs/x/delta.safetensors --out llama-2-7b-merged

Merging always happens in a full-precision copy of the base (never into int8/NF4 weights), one matrix
at a time in fp32 and rounded once to --dtype.
"""

import argparse
import sys

import torch

from llama import CheckpointError, find_tokenizer, load_model, save_hf


def finetune_format(path: str) -> str:
    """"spiel-delta" or "spiel-lora", from the file's metadata."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: fine-tune file not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
    if fmt not in ("spiel-delta", "spiel-lora"):
        raise CheckpointError(f"{path}: neither a spiel delta nor a LoRA adapter (format {fmt!r})")
    return fmt


def apply_finetune(model, path: str):
    """wrap the model's linears with the sparse delta or LoRA adapter in `path` (checked against the base)."""
    if finetune_format(path) == "spiel-delta":
        import spiel
        return spiel.load_delta(model, path)
    import lora
    return lora.load_lora(model, path)


def merge_into(model, path: str):
    """W0 += the fine-tune of `path`, then drop the wrappers so the next fine-tune sees plain linears."""
    import lora
    import spiel

    apply_finetune(model, path)
    spiel.merge_deltas(model)
    spiel.remove_deltas(model)
    lora.merge_lora(model)
    lora.remove_lora(model)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="the base checkpoint the fine-tunes were trained on")
    ap.add_argument("--delta", action="append", required=True, help="delta or LoRA file (repeat to add several)")
    ap.add_argument("--out", required=True, help="new folder for the merged model (never overwritten)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)

    for path in args.delta:  # check every file before the (slow) load of the base
        finetune_format(path)
    model = load_model(args.ckpt, dtype=getattr(torch, args.dtype))
    for path in args.delta:
        merge_into(model, path)
        print(f"merged {path}")
    save_hf(model, find_tokenizer(args.ckpt), args.out)
    print(f"wrote {args.out} (Hugging Face layout, {args.dtype})")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
