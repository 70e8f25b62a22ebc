"""
Sample from a LLaMA 2 checkpoint (Meta or Hugging Face layout), optionally with sparse deltas (or LoRA)
applied on the fly, without writing a merged copy.

    python generate.py --ckpt llama-2-7b --prompt "The capital of France is" --temperature 0
    python generate.py --ckpt llama-2-7b --delta runs/x/delta.safetensors --chat --prompt "Write a haiku"
"""

import argparse
import sys

import torch

import data
from llama import CheckpointError, Tokenizer, default_device, default_dtype, find_tokenizer, generate, load_model
from merge import apply_finetune


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (Meta or Hugging Face layout)")
    ap.add_argument("--prompt", required=True, help="text to continue (BOS is added)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--delta", action="append", default=[], help="sparse delta or LoRA file to apply (repeatable)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template used for training")
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "nf4"], help="store the base quantized")
    args = ap.parse_args(argv)

    model = load_model(args.ckpt, device=args.device, dtype=default_dtype(args.device),
                       quantize=None if args.quantize == "none" else args.quantize)
    tok = Tokenizer(find_tokenizer(args.ckpt))
    for path in args.delta:  # applied on the fly, nothing merged or written
        apply_finetune(model, path)
    ids = data.prompt_ids(tok, args.prompt) if args.chat else tok.encode(args.prompt)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    new = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p, eos_id=tok.eos_id, generator=g)
    print(args.prompt + ("\n" if args.chat else "") + tok.decode(new))


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
