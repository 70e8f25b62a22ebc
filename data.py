"""
Instruction data for fine-tuning: the two record formats, the chat template, loss masking and batching.

Formats (one JSON object per line in .jsonl, or one JSON array in .json):
  Alpaca:  {"instruction": "...", "input": "... (optional)", "output": "..."}   (or "prompt"/"completion")
  chat:    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (multi-turn)

Template: the Tulu format the SpIEL paper fine-tunes with (arXiv 2401.16405, section 4.1):
  <s><|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{answer}</s><|user|>\n{user}\n<|assistant|>\n{answer}</s>
Only the assistant answers and the EOS after each answer count in the loss (label -100 elsewhere).
The prompt of each turn is tokenized alone, exactly as generation tokenizes it, and the answer's ids are
what follows it in the tokenization of prompt + answer: the ids generation starts from are exactly the
ids the loss conditioned on, whatever the tokenizer does with the whitespace at the boundary.
"""

import json
import os

import torch

from llama import IGNORE_INDEX


class DataError(Exception):
    """a data file that cannot be used; the message starts with file:line."""


# -----------------------------------------------------------------------------
# reading records


def read_records(path: str) -> list:
    """[(where, record dict)] from a .jsonl file (where: the line number) or a .json array ("record N")."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected .jsonl or .json") from None
    if text.lstrip().startswith("{") and len(text.strip().splitlines()) > 1:  # one object over several lines?
        try:
            json.loads(text)
            raise DataError(f"{path}: one JSON object, not a list of records: give one object per line (.jsonl) "
                            f"or a JSON array of objects (.json)")
        except json.JSONDecodeError:
            pass  # lines, as expected
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        records = [(f"record {i + 1}", r) for i, r in enumerate(items)]  # (an array's numbers are no lines)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not records:
        raise DataError(f"{path}: no records")
    return records


def to_turns(record) -> tuple:
    """a record in either format -> (system text or None, [(user, assistant), ...]); ValueError if malformed."""
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                    m.get("role") not in ("system", "user", "assistant"):
                raise ValueError("each message needs a 'role' (system, user or assistant) and a string 'content'")
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        rest = msgs[1:] if system is not None else msgs
        roles = [m["role"] for m in rest]
        if len(rest) % 2 or roles != ["user", "assistant"] * (len(rest) // 2):
            raise ValueError("messages must alternate user, assistant (after an optional system) "
                             "and end with assistant")
        return system, [(rest[i]["content"], rest[i + 1]["content"]) for i in range(0, len(rest), 2)]
    if "instruction" in record:
        ins, inp, out = record["instruction"], record.get("input", ""), record.get("output")
        if not isinstance(ins, str) or not isinstance(inp, str) or not isinstance(out, str):
            raise ValueError("Alpaca records need string 'instruction' and 'output' (and optional string 'input')")
        return None, [(ins + ("\n\n" + inp if inp else ""), out)]
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record.get("completion"), str):
            raise ValueError("prompt/completion records need two strings")
        return None, [(record["prompt"], record["completion"])]
    raise ValueError("expected 'messages', 'instruction'/'output' or 'prompt'/'completion'")


# -----------------------------------------------------------------------------
# the chat template and loss masking


def user_text(user: str, system=None) -> str:
    head = f"<|system|>\n{system}\n" if system is not None else ""
    return f"{head}<|user|>\n{user}\n<|assistant|>\n"


def encode_turn(tok, prompt: str, answer: str) -> tuple:
    """(prompt ids, answer ids). The prompt is tokenized alone, exactly as generation will see it, and the
    answer is what follows it in the tokenization of prompt + answer (a piece the tokenizer writes for the
    boundary, e.g. the newline as a leading-space piece, is the answer's first token: the model must
    produce it). If a piece straddles the boundary, the answer is tokenized on its own instead."""
    p = tok.encode(prompt, bos=False)
    full = tok.encode(prompt + answer, bos=False)
    a = full[len(p):] if full[:len(p)] == p else tok.encode(answer, bos=False)
    return p, a


def encode_example(tok, system, turns, seq_len: int) -> tuple:
    """-> (inputs (T,), targets (T,)) with targets[t] the token after inputs[t] or IGNORE_INDEX, T <= seq_len.
    Turn by turn: prompt ids (no label), answer ids and EOS (labels). So the ids before each answer are
    exactly `prompt_ids` of that conversation so far: training and generation see the same prefix."""
    ids, is_label = [tok.bos_id], [False]
    for i, (user, answer) in enumerate(turns):
        p, a = encode_turn(tok, user_text(user, system if i == 0 else None), answer)
        ids += p + a + [tok.eos_id]  # the EOS is a label: the model must learn to stop
        is_label += [False] * len(p) + [True] * (len(a) + 1)
    ids, is_label = ids[:seq_len + 1], is_label[:seq_len + 1]  # truncation
    inputs = torch.tensor(ids[:-1])
    targets = torch.tensor([t if lab else IGNORE_INDEX for t, lab in zip(ids[1:], is_label[1:])])
    return inputs, targets


def prompt_ids(tok, user: str, system=None) -> list:
    """what generation starts from: BOS and the template up to the assistant's answer, tokenized alone."""
    return [tok.bos_id] + tok.encode(user_text(user, system), bos=False)


def load_examples(path: str, tok, seq_len: int) -> tuple:
    """tokenized examples [(inputs, targets, record)] and the number dropped because truncation left no label."""
    examples, dropped = [], 0
    for lineno, rec in read_records(path):
        try:
            system, turns = to_turns(rec)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        inputs, targets = encode_example(tok, system, turns, seq_len)
        if (targets != IGNORE_INDEX).any():
            examples.append((inputs, targets, (system, turns)))
        else:
            dropped += 1
    if not examples:
        raise DataError(f"{path}: no example keeps a label after truncation to {seq_len} tokens")
    return examples, dropped


def unknown_warning(tok, examples, share: float = 0.01):
    """one warning line when more than `share` of the answer tokens are <unk> (text the tokenizer cannot write,
    so the model cannot learn it), with the counts and the characters of the first such answer; else None."""
    unk = tok.sp.unk_id()
    n_label = n_unk = n_prompt = n_prompt_unk = 0
    first = None  # the first answer with an <unk>
    for x, y, (_, turns) in examples:
        is_label = y != IGNORE_INDEX  # (T,) the answers and their EOS: y[t] is token t + 1
        in_prompt = torch.cat([torch.tensor([True]), ~is_label[:-1]])  # (T,) x[t] is a prompt token
        n_label, n_unk = n_label + int(is_label.sum()), n_unk + int((y[is_label] == unk).sum())
        n_prompt, n_prompt_unk = n_prompt + int(in_prompt.sum()), n_prompt_unk + int((x[in_prompt] == unk).sum())
        if first is None and (y[is_label] == unk).any():
            first = next((a for _, a in turns if unk in tok.encode(a, bos=False)), None)
    if n_unk <= share * n_label:
        return None
    chars = sorted({c for c in first or "" if unk in tok.encode(c, bos=False)})  # what it cannot write
    example = f"cannot write {' '.join(map(repr, chars))} (e.g. in {first[:60]!r})" if chars else "cannot write some"
    return (f"warning: {n_unk:,} of {n_label:,} answer tokens ({n_unk / n_label:.1%}) are <unk> (and {n_prompt_unk:,} "
            f"of {n_prompt:,} prompt tokens): the tokenizer {example}; the model cannot learn what it cannot write")


# -----------------------------------------------------------------------------
# batching


def collate(examples, pad_id: int) -> tuple:
    """right-pad to the longest example: inputs (B, T), targets (B, T). One example per row and causal
    attention mean no token attends to another example or to padding; padding has no label."""
    T = max(len(x) for x, _, _ in examples)
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y, _) in enumerate(examples):
        inputs[i, :len(x)], targets[i, :len(y)] = x, y
    return inputs, targets


def epoch_order(n: int, seed: int, epoch: int) -> list:
    """the example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def load_splits(path: str, val_path, val_frac: float, tok, seq_len: int, seed: int) -> tuple:
    """(training examples, validation examples, how many were dropped): val_path's, or val_frac of path's."""
    train, dropped = load_examples(path, tok, seq_len)
    if not val_path:
        return (*split_train_val(train, val_frac, seed), dropped)
    val, dropped_val = load_examples(val_path, tok, seq_len)
    return train, val, dropped + dropped_val


def split_train_val(examples: list, val_frac: float, seed: int) -> tuple:
    if not val_frac:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(examples) * val_frac)) if len(examples) > 1 else 0
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


class Batches:
    """micro-batches of examples in a fixed per-epoch order (seed, epoch), with a position (epoch, index) that
    the resume state keeps, so a resumed run sees exactly the same data. Every process walks the same stream
    and trains on its own share of each step's micro-batches."""

    def __init__(self, examples: list, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.index, self.order = 0, 0, None

    def next(self) -> list:
        if self.order is None or self.order[0] != self.epoch:  # one permutation per epoch
            self.order = (self.epoch, epoch_order(len(self.examples), self.seed, self.epoch))
        take = self.order[1][self.index:self.index + self.batch_size]
        self.index += len(take)
        if self.index >= len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
        return [self.examples[i] for i in take]
