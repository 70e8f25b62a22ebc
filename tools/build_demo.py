"""
Builds the embedded demo that `python train.py` (no arguments) fine-tunes: a tiny LLaMA-architecture model
pre-trained here on one family of string tasks, and instruction data for another family, with answers
that can be checked exactly. Everything is generated from fixed seeds; nothing is downloaded.

    python tools/build_demo.py             # rewrites demo/ (a few minutes on 2 CPU cores)
    python tools/build_demo.py --transfer  # rewrites demo/transfer/, the second quality fixture (below)

- pre-training family (the base learns the chat template and to copy and reverse strings):
    "copy: q w e r" -> "q w e r",  "reverse: q w e r" -> "r e w q"
- fine-tuning family (new to the base, held-out exact match measures it):
    "shift: q w e r" -> "r x f s"  (each letter moves one place on in the alphabet, z wraps to a)

The transfer fixture (demo/transfer/) measures both what fine-tuning learns and what the base forgets, with
a tokenizer nobody tuned to: sentencepiece BPE with its default normalisation (nmt_nfkc, extra whitespace
removed, so newlines become spaces and the template's markers are split into several pieces), no byte
fallback, no user-defined symbols.
- family A, pre-trained into base/ (retain.jsonl, held out, measures forgetting):
    "add one: 3 8 1" -> "4 9 2" (mod 10), "sort: 3 1 2" -> "1 2 3", "count: a b c d" -> "4", "first: q w e" -> "q"
- family B, new to the base (train.jsonl, and val.jsonl held out, measure learning):
    "double: 1 2 4" -> "2 4 8" (mod 10), "last: q w e" -> "e", "max: 3 9 2" -> "9", "swap pairs: a b c d" -> "b a d c"
"""

import io
import json
import os
import random
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
from llama import ModelArgs, Transformer  # noqa: E402
from tokenizer import SentencePiece  # noqa: E402
import train  # noqa: E402
from merge import save_hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = 128  # asked of sentencepiece; the model takes the size it actually gives
ARGS = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=128)
TASKS = {"copy": lambda s: s, "reverse": lambda s: s[::-1],
         "shift": lambda s: [LETTERS[(LETTERS.index(c) + 1) % 26] for c in s]}


def record(task: str, rng: random.Random) -> dict:
    s = [rng.choice(LETTERS) for _ in range(rng.randint(3, 8))]
    return {"instruction": f"{task}: {' '.join(s)}", "output": " ".join(TASKS[task](s))}


def demo_retain(n=200) -> list:
    """held-out copy/reverse records (what the demo base was pre-trained on, none seen in pre-training): what
    fine-tuning on shift makes the base forget (tools/quality.py)."""
    rng = random.Random(1)  # the pre-training records, as main() draws them
    seen = {record(rng.choice(["copy", "reverse"]), rng)["instruction"] for _ in range(20000)}
    rng, out = random.Random(4), []
    while len(out) < n:
        r = record(("copy", "reverse")[len(out) % 2], rng)
        if r["instruction"] not in seen:
            seen.add(r["instruction"])
            out.append(r)
    return out


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def chat_line(r: dict) -> str:
    return f"<|user|>\n{r['instruction']}\n<|assistant|>\n{r['output']}"


def write_sentencepiece(path, lines, **options):
    """train a sentencepiece model on lines (one thread, quiet) and write it to path."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, num_threads=1,
                                   minloglevel=2, **options)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def train_tokenizer(path):
    """a small sentencepiece model: every letter its own piece, the template's markers as single pieces."""
    rng = random.Random(0)
    lines = [chat_line(record(rng.choice(list(TASKS)), rng)) for _ in range(5000)]
    write_sentencepiece(
        path, lines, vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, byte_fallback=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["<|user|>", "<|assistant|>", "<|system|>", "\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False)


def init_model(tok_path, out_dir):
    """a randomly initialised model (fixed seed) with the tokenizer's vocabulary, saved in the HF layout."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS, vocab_size=SentencePiece(tok_path).n_words))
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else torch.nn.init.ones_(p)
    save_hf(model, None, out_dir)
    shutil.copyfile(tok_path, os.path.join(out_dir, "tokenizer.model"))


def pretrain(init_dir, data_path, max_steps, out_dir, base_dir):
    """pre-train with full fine-tuning (the same train.py), then copy its exported model to base_dir."""
    code = train.main(["--ckpt", init_dir, "--data", data_path,
                       "--method", "full", "--lr", "3e-3", "--weight-decay", "0", "--warmup", "100", "--grad-clip", "1",
                       "--seq-len", "96", "--batch-size", "32", "--grad-accum", "1", "--max-steps", str(max_steps),
                       "--eval-every", "400", "--exact-match", "100", "--save-every", "100000",
                       "--device", "cpu", "--dtype", "float32", "--out", out_dir])
    if code:
        sys.exit(code)
    shutil.rmtree(base_dir, ignore_errors=True)
    shutil.copytree(os.path.join(out_dir, "model"), base_dir)


def fresh_dir(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def main():
    tmp = fresh_dir(os.path.join(ROOT, "runs", "demo-build"))
    # 1. tokenizer and a randomly initialised model in the Hugging Face layout
    tok_path = os.path.join(tmp, "tokenizer.model")
    train_tokenizer(tok_path)
    init_model(tok_path, os.path.join(tmp, "init"))
    # 2. data: pre-training on copy/reverse; fine-tuning (train + held-out) on shift
    rng = random.Random(1)
    pretrain = [record(rng.choice(["copy", "reverse"]), rng) for _ in range(20000)]
    write_jsonl(os.path.join(tmp, "pretrain.jsonl"), pretrain)
    os.makedirs(DEMO, exist_ok=True)
    write_jsonl(os.path.join(DEMO, "train.jsonl"), [record("shift", rng) for _ in range(3000)])
    write_jsonl(os.path.join(DEMO, "val.jsonl"), [record("shift", rng) for _ in range(200)])
    write_jsonl(os.path.join(DEMO, "retain.jsonl"), demo_retain())
    # 3. pre-train the base with full fine-tuning (the same train.py), then keep its exported model
    pretrain(os.path.join(tmp, "init"), os.path.join(tmp, "pretrain.jsonl"), 800,
             os.path.join(tmp, "pretrain"), os.path.join(DEMO, "base"))
    print(f"wrote {DEMO}: base/, train.jsonl, val.jsonl, retain.jsonl")


# -----------------------------------------------------------------------------
# the transfer fixture: demo/transfer/

TRANSFER = os.path.join(DEMO, "transfer")
TRANSFER_VOCAB = 200  # asked of sentencepiece; BPE stops earlier when it runs out of merges (170 here)
TRANSFER_STEPS = 1500  # pre-training steps of the base on family A
DIGITS = "0123456789"
# task -> (items: digits, letters, or letters in pairs; answer from the list of items)
TRANSFER_TASKS = {
    "add one": ("digits", lambda s: [str((int(c) + 1) % 10) for c in s]),
    "sort": ("digits", sorted),
    "count": ("letters", lambda s: [str(len(s))]),
    "first": ("letters", lambda s: s[:1]),
    "double": ("digits", lambda s: [str(2 * int(c) % 10) for c in s]),
    "last": ("letters", lambda s: s[-1:]),
    "max": ("digits", lambda s: [max(s)]),
    "swap pairs": ("pairs", lambda s: [s[i ^ 1] for i in range(len(s))]),
}
FAMILY_A = ["add one", "sort", "count", "first"]  # pre-training: what the base knows
FAMILY_B = ["double", "last", "max", "swap pairs"]  # fine-tuning: new to the base


def transfer_record(task: str, rng: random.Random) -> dict:
    kind, answer = TRANSFER_TASKS[task]
    if kind == "pairs":
        s = [rng.choice(LETTERS) for _ in range(2 * rng.randint(1, 3))]  # 2, 4 or 6 letters
    else:
        s = [rng.choice(DIGITS if kind == "digits" else LETTERS) for _ in range(rng.randint(3, 8))]
    return {"instruction": f"{task}: {' '.join(s)}", "output": " ".join(answer(s))}


def held_out(tasks, n, rng, seen) -> list:
    """n records, the tasks in turn (n / len(tasks) each), none with an instruction in seen or repeated."""
    out = []
    while len(out) < n:
        r = transfer_record(tasks[len(out) % len(tasks)], rng)
        if r["instruction"] not in seen:
            seen.add(r["instruction"])
            out.append(r)
    return out


def train_transfer_tokenizer(path):
    """sentencepiece BPE with its defaults: nmt_nfkc, extra whitespace removed (newlines become spaces, trailing
    ones go), no byte fallback, no user-defined symbols (so <|assistant|> is several pieces); both families."""
    rng = random.Random(2)
    lines = [chat_line(transfer_record(rng.choice(FAMILY_A + FAMILY_B), rng)) for _ in range(5000)]
    write_sentencepiece(
        path, lines, vocab_size=TRANSFER_VOCAB, model_type="bpe", character_coverage=1.0, byte_fallback=False,
        normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False)


def main_transfer():
    tmp = fresh_dir(os.path.join(ROOT, "runs", "transfer-build"))
    tok_path = os.path.join(tmp, "tokenizer.model")
    train_transfer_tokenizer(tok_path)
    init_model(tok_path, os.path.join(tmp, "init"))
    rng = random.Random(3)
    pre = [transfer_record(rng.choice(FAMILY_A), rng) for _ in range(20000)]
    ft = [transfer_record(rng.choice(FAMILY_B), rng) for _ in range(3000)]
    write_jsonl(os.path.join(tmp, "pretrain.jsonl"), pre)
    os.makedirs(TRANSFER, exist_ok=True)
    write_jsonl(os.path.join(TRANSFER, "train.jsonl"), ft)
    write_jsonl(os.path.join(TRANSFER, "val.jsonl"), held_out(FAMILY_B, 200, rng, {r["instruction"] for r in ft}))
    write_jsonl(os.path.join(TRANSFER, "retain.jsonl"), held_out(FAMILY_A, 200, rng, {r["instruction"] for r in pre}))
    pretrain(os.path.join(tmp, "init"), os.path.join(tmp, "pretrain.jsonl"), TRANSFER_STEPS,
             os.path.join(tmp, "pretrain"), os.path.join(TRANSFER, "base"))
    print(f"wrote {TRANSFER}: base/, train.jsonl, val.jsonl, retain.jsonl")


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--transfer"]):
        sys.exit("usage: python tools/build_demo.py [--transfer]")
    main_transfer() if sys.argv[1:] == ["--transfer"] else main()
