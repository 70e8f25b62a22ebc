"""
Sample from a LLaMA 2 checkpoint (Meta or Hugging Face layout), optionally with sparse deltas (or LoRA)
applied on the fly, without writing a merged copy. Greedy at temperature 0, else top-p (nucleus)
sampling; stops at EOS. The KV cache lives in llama.py's Attention. Also how train.py scores a model on
held-out examples: greedy exact match, and the validation loss.

    python generate.py --ckpt llama-2-7b --prompt "The capital of France is" --temperature 0
    python generate.py --ckpt llama-2-7b --delta runs/x/delta.safetensors --chat --prompt "Write a haiku"
"""

import sys
from typing import Optional

import torch

import chat
import data
import finetune
import hub
import tokenizer
from config import COUNT, FRACTION, NONNEG, NONNEG_INT, Parser, device
from files import CheckpointError
from llama import IGNORE_INDEX, Transformer, check_checkpoint, check_vocab, load_model, read_shapes
from system import default_device, default_dtype


def sample_top_p(probs, top_p: float, generator=None):
    """sample from the smallest set of tokens whose probability mass reaches top_p. probs (B, vocab) -> (B, 1)"""
    p_sorted, idx = probs.sort(dim=-1, descending=True)
    p_sorted = p_sorted.masked_fill(p_sorted.cumsum(-1) - p_sorted > top_p, 0.0)  # past the mass: out
    return idx.gather(-1, torch.multinomial(p_sorted / p_sorted.sum(-1, keepdim=True), 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt: list, max_new_tokens: int, temperature: float = 0.8, top_p: float = 0.95,
             stop_ids=(), generator=None, n_words: Optional[int] = None) -> list:
    """continue one prompt (token ids) with the KV cache: the whole prompt first, then one token at a time, until
    one of stop_ids (the tokenizer's: its EOS and the checkpoint's eos_token_id) or max_new_tokens.
    n_words: the ids the tokenizer can decode; a padded embedding's extra rows are never picked. -> the new ids"""
    total = min(len(prompt) + max_new_tokens, model.args.max_seq_len)
    if len(prompt) >= total:
        return []
    was_training = model.training
    model.eval()
    model.setup_cache(1, total)
    try:
        tokens, out, pos = torch.tensor([prompt], device=model.tok_embeddings.weight.device), [], 0  # (1, T)
        for _ in range(total - len(prompt)):
            logits, _ = model(tokens, start_pos=pos)
            pos += tokens.shape[1]
            last = logits[:, -1, :n_words]  # (1, vocab): only ids the tokenizer has
            nxt = last.argmax(-1, keepdim=True) if temperature <= 0 else \
                sample_top_p(torch.softmax(last / temperature, dim=-1), top_p, generator)
            out.append(nxt.item())
            if nxt.item() in stop_ids:
                break
            tokens = nxt
        return out
    finally:
        model.free_cache()
        model.train(was_training)


def answer(model, template, system, user, max_new) -> str:
    """the greedy answer to one chat turn (the prompt exactly as training tokenized it: data.prompt_ids)."""
    tok = template.tok
    return tok.decode(generate(model, data.prompt_ids(tok, template, user, system), max_new, temperature=0,
                               stop_ids=tok.stop_ids, n_words=tok.n_words))


def exact_match(model, template, examples, n) -> float:
    """the fraction of the first n examples (data.load_examples') whose greedy answer equals the reference,
    stripped (the first turn of each)."""
    hits = 0
    for _, _, (system, turns) in examples[:n]:
        ref, length = turns[0][1], len(template.tok.encode(turns[0][1], bos=False)) + 8
        hits += answer(model, template, system, turns[0][0], length).strip() == ref.strip()
    return hits / min(n, len(examples))


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device) -> float:
    """mean loss per answer token over (up to 500) validation examples."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, min(len(examples), 500), batch_size):
        x, y = data.collate(examples[i:i + batch_size], pad_id)
        total += model(x.to(device), y.to(device), reduction="sum")[1].item()
        n += int((y != IGNORE_INDEX).sum())
    model.train()
    return total / max(n, 1)


def main(argv=None):
    ap = Parser(prog="generate.py", description=__doc__)
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (Meta or Hugging Face layout), or a Hub id "
                                                  "ORG/NAME")
    ap.add_argument("--prompt", required=True, help="text to continue (BOS is added)")
    ap.add_argument("--max-new-tokens", type=COUNT, default=128, help="stop after this many new tokens (or at EOS, "
                                                                      "or at the model's max_seq_len)")
    ap.add_argument("--temperature", type=NONNEG, default=0.8, help="softmax temperature; 0 means greedy")
    ap.add_argument("--top-p", type=FRACTION, default=0.95, help="nucleus sampling: the smallest set of tokens "
                                                                "holding this much probability (1: all)")
    ap.add_argument("--seed", type=NONNEG_INT, default=0, help="the sampling's random seed")
    ap.add_argument("--device", type=device, default=default_device(), help="cpu, cuda or cuda:N (default: cuda "
                                                                           "where torch sees a GPU)")
    ap.add_argument("--delta", action="append", default=[],
                    help="sparse delta or LoRA file, or PEFT LoRA / SFT folder, to apply (repeatable)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template used for training")
    ap.add_argument("--template", choices=["model", "tulu"], help="with --chat: the checkpoint's own chat template "
                    "(model) or the paper's (tulu); default: model where the checkpoint has one, else tulu")
    ap.add_argument("--system", help="with --chat: the system prompt (as chat training data's system message)")
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "nf4"], help="store the base quantized")
    args = ap.parse_args(argv)
    if (args.system is not None or args.template) and not args.chat:
        ap.error("--system and --template need --chat (they are part of the chat template)")

    args.ckpt = hub.resolve(args.ckpt)
    check_checkpoint(args.ckpt)  # everything that can be checked before the (slow) load of the base
    shapes = read_shapes(args.ckpt) if args.delta else None
    fts = [finetune.read(path, shapes) for path in args.delta]  # each fine-tune is read once
    if len(set(args.delta)) != len(args.delta):
        raise ValueError("the same fine-tune is given twice (--delta)")
    if len(args.delta) > 1 and args.quantize != "none":
        raise ValueError("several fine-tunes at once need an unquantized base (--quantize none), or merge "
                         "them first with merge.py")
    tok = tokenizer.load(args.ckpt)
    check_vocab(args.ckpt, tok)
    template = chat.template(tok, args.template) if args.chat else None
    model = load_model(args.ckpt, device=args.device, dtype=default_dtype(args.device),
                       quantize=None if args.quantize == "none" else args.quantize)
    base = finetune.base_of(model, args.ckpt)
    if len(fts) == 1:  # applied on the fly (on a quantized base too), nothing written
        finetune.check(fts[0], model, base)
        finetune.apply(model, fts[0])
    else:  # several add up: merged one after the other into this in-memory copy
        for ft in fts:
            finetune.merge(model, ft, base)
    ids = data.prompt_ids(tok, template, args.prompt, args.system) if args.chat else tok.encode(args.prompt)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    new = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p, stop_ids=tok.stop_ids, generator=g,
                   n_words=tok.n_words)
    print(args.prompt + ("\n" if args.chat else "") + tok.decode(new))


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
