"""
Sample from a LLaMA 2 checkpoint (Meta or Hugging Face layout), optionally with sparse deltas on top.

    python generate.py --ckpt llama-2-7b --prompt "The capital of France is" --temperature 0
"""

import argparse
import sys

import torch

from llama import CheckpointError, Tokenizer, default_device, default_dtype, find_tokenizer, generate, load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (Meta or Hugging Face layout)")
    ap.add_argument("--prompt", required=True, help="text to continue (BOS is added)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=default_device())
    args = ap.parse_args(argv)

    model = load_model(args.ckpt, device=args.device, dtype=default_dtype(args.device))
    tok = Tokenizer(find_tokenizer(args.ckpt))
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    new = generate(model, tok.encode(args.prompt), args.max_new_tokens, args.temperature, args.top_p,
                   eos_id=tok.eos_id, generator=g)
    print(args.prompt + tok.decode(new))


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
