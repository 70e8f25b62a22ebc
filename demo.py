"""
Builds the embedded demo that `python train.py` (no arguments) fine-tunes: a tiny LLaMA-architecture model
pre-trained here on one family of string tasks, and instruction data for another family, with answers
that can be checked exactly. Everything is generated from fixed seeds; nothing is downloaded.

    python demo.py          # rewrites demo/ (a few minutes on 2 CPU cores)

- pre-training family (the base learns the chat template and to copy and reverse strings):
    "copy: q w e r" -> "q w e r",  "reverse: q w e r" -> "r e w q"
- fine-tuning family (new to the base, held-out exact match measures it):
    "shift: q w e r" -> "r x f s"  (each letter moves one place on in the alphabet, z wraps to a)
"""

import io
import json
import os
import random
import shutil
import sys

import torch

from llama import ModelArgs, Tokenizer, Transformer, save_hf

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = 128  # asked of sentencepiece; the model takes the size it actually gives
ARGS = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=128)
TASKS = {"copy": lambda s: s, "reverse": lambda s: s[::-1],
         "shift": lambda s: [LETTERS[(LETTERS.index(c) + 1) % 26] for c in s]}


def record(task: str, rng: random.Random) -> dict:
    s = [rng.choice(LETTERS) for _ in range(rng.randint(3, 8))]
    return {"instruction": f"{task}: {' '.join(s)}", "output": " ".join(TASKS[task](s))}


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def train_tokenizer(path):
    """a small sentencepiece model: every letter its own piece, the template's markers as single pieces."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [f"<|user|>\n{r['instruction']}\n<|assistant|>\n{r['output']}"
             for r in (record(rng.choice(list(TASKS)), rng) for _ in range(5000))]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, byte_fallback=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["<|user|>", "<|assistant|>", "<|system|>", "\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def main():
    import train

    tmp = os.path.join(HERE, "runs", "demo-build")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # 1. tokenizer and a randomly initialised model in the Hugging Face layout
    tok_path = os.path.join(tmp, "tokenizer.model")
    train_tokenizer(tok_path)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS, vocab_size=Tokenizer(tok_path).n_words))
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else torch.nn.init.ones_(p)
    save_hf(model, tok_path, os.path.join(tmp, "init"))
    # 2. data: pre-training on copy/reverse; fine-tuning (train + held-out) on shift
    rng = random.Random(1)
    write_jsonl(os.path.join(tmp, "pretrain.jsonl"), [record(rng.choice(["copy", "reverse"]), rng) for _ in range(20000)])
    os.makedirs(DEMO, exist_ok=True)
    write_jsonl(os.path.join(DEMO, "train.jsonl"), [record("shift", rng) for _ in range(3000)])
    write_jsonl(os.path.join(DEMO, "val.jsonl"), [record("shift", rng) for _ in range(200)])
    # 3. pre-train the base with full fine-tuning (the same train.py), then keep its exported model
    code = train.main(["--ckpt", os.path.join(tmp, "init"), "--data", os.path.join(tmp, "pretrain.jsonl"),
                       "--method", "full", "--lr", "3e-3", "--weight-decay", "0", "--warmup", "100",
                       "--seq-len", "96", "--batch-size", "32", "--grad-accum", "1", "--max-steps", "800",
                       "--eval-every", "400", "--exact-match", "100", "--save-every", "100000",
                       "--device", "cpu", "--dtype", "float32", "--out", os.path.join(tmp, "pretrain")])
    if code:
        sys.exit(code)
    shutil.rmtree(os.path.join(DEMO, "base"), ignore_errors=True)
    shutil.copytree(os.path.join(tmp, "pretrain", "model"), os.path.join(DEMO, "base"))
    print(f"wrote {DEMO}: base/, train.jsonl, val.jsonl")


if __name__ == "__main__":
    main()
