"""
Instruction data for fine-tuning: the record formats people bring, loss masking, and batching with packing.

Files: .jsonl (one JSON object per line), .json (one array of objects), .parquet (pyarrow), or a Hugging Face
`datasets` save_to_disk folder (datasets). Records, in any of them:
  Alpaca:     {"instruction": "...", "input": "... (optional)", "output": "..."}   (or "prompt"/"completion")
  messages:   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (OpenAI / Tulu, multi-turn;
              content a string or a list of text parts [{"type": "text", "text": "..."}])
  ShareGPT:   {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}
An assistant turn with "weight": 0 is context, not trained on. Tool calls, images and any other field value
this code does not implement are refused with file:line and the field.

The chat template (chat.py) turns a conversation into pieces of text, each a label or not; `encode` tokenizes them
so that each piece's tokens are what it adds to the tokenization of the text before it (a piece the tokenizer
writes across the boundary, e.g. a newline as a leading-space piece, belongs to the answer: the model must
produce it). Only the assistant turns count in the loss (label -100 elsewhere), summed over the answer tokens of
the whole step.

Batching packs (section "packing"): a step's examples, the same ones drawn in the same order as without packing,
go into as few rows of --seq-len tokens as hold them; inside a row each example attends only to itself, with
positions from 0 (llama.attention_mask, example_positions), so a packed step's loss and gradient are the unpacked
step's, up to float rounding, with almost no padding.
"""

import heapq
import json
import math
import os

import torch

from files import CheckpointError, sha256
from llama import IGNORE_INDEX


class DataError(Exception):
    """a data file that cannot be used; the message starts with file:line."""


# -----------------------------------------------------------------------------
# reading records: (where, record) from each kind of file


def read_records(path: str) -> list:
    """[(line or record number, record)] from .jsonl, a .json array, .parquet, or a datasets save_to_disk folder."""
    if os.path.isdir(path):
        return table_records(path, "datasets")
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    if path.endswith(".parquet"):
        return table_records(path, "pyarrow")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); data files are .jsonl, .json, "
                        f".parquet or a datasets folder") from None
    if text.lstrip().startswith("{") and len(text.strip().splitlines()) > 1:  # one object over several lines?
        try:
            json.loads(text)
            raise DataError(f"{path}: one JSON object, not a list of records: give one object per line (.jsonl) "
                            f"or a JSON array of objects (.json)")
        except json.JSONDecodeError:
            pass  # lines, as expected
    records = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        records = [(f"record {i + 1}", r) for i, r in enumerate(items)]  # (an array's numbers are no lines)
    else:
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


def table_records(path: str, reader: str) -> list:
    """the rows of a parquet file (pyarrow) or a datasets save_to_disk folder (datasets; a DatasetDict: its
    "train" split) as records numbered from 1; pyarrow and datasets are optional: one line says what to install."""
    if reader == "datasets" and not any(os.path.isfile(os.path.join(path, f))
                                        for f in ("dataset_info.json", "dataset_dict.json")):
        raise DataError(f"{path}: a folder, and not a datasets save_to_disk folder (no dataset_info.json)")
    try:
        if reader == "pyarrow":
            import pyarrow.parquet as pq
            rows = pq.read_table(path).to_pylist()
        else:
            import datasets
    except ImportError:
        raise DataError(f"{path}: reading {'parquet' if reader == 'pyarrow' else 'a datasets folder'} needs "
                        f"{reader}: pip install {reader}") from None
    if reader == "datasets":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (it has {', '.join(ds)})")
            ds = ds["train"]
        rows = ds.to_list()
    if not rows:
        raise DataError(f"{path}: no records")
    return [(f"record {i}", r) for i, r in enumerate(rows, 1)]


# -----------------------------------------------------------------------------
# a record -> a conversation: (system or None, [(user, answer, trained), ...])

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TOOLS = ("tool_calls", "function_call", "tools", "tool", "function", "ipython", "observation")
# record fields that would change what is trained on, beside a format's own: refused, not ignored (other fields, such
# as an id or a source, are metadata)
REFUSED_FIELDS = ("system", "tools", "images", "history", "chosen", "rejected")


def text_of(content, where: str) -> str:
    """a message's content: a string, or a list of text parts (OpenAI's), joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        other = next((p.get("type") for p in content if p.get("type") != "text" or not isinstance(p.get("text"), str)),
                     None)
        if other is None:
            return "".join(p["text"] for p in content)
        raise ValueError(f"{where}: a content part of type {json.dumps(other)}; only text parts are implemented")
    raise ValueError(f"{where}: 'content' must be a string or a list of text parts")


def to_turns(record) -> tuple:
    """a record in any format -> (system text or None, [(user, assistant, trained), ...]); ValueError if malformed,
    naming the field."""
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    for key in (k for k in REFUSED_FIELDS if k in record):
        raise ValueError(f"field {key!r} is not implemented" + ("; tool calls are not supported" if key == "tools"
                                                                 else ""))
    if "conversations" in record and "messages" not in record:  # ShareGPT: from/value
        conv = record["conversations"]
        if not isinstance(conv, list) or not conv:
            raise ValueError("'conversations' must be a non-empty list")
        msgs = []
        for i, m in enumerate(conv):
            where = f"conversations[{i}]"
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise ValueError(f"{where}: each turn needs 'from' and 'value'")
            if m["from"] in TOOLS or m["from"] not in SHAREGPT_ROLES:
                raise ValueError(f"{where}.from: {json.dumps(m['from'])} is not implemented (human, gpt, system)"
                                 + ("; tool calls are not supported" if m["from"] in TOOLS else ""))
            msgs.append({**{k: v for k, v in m.items() if k not in ("from", "value")},
                         "role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
        return conversation(msgs, "conversations")
    if "messages" in record:
        return conversation(record["messages"], "messages")
    if "instruction" in record:
        ins, inp, out = record["instruction"], record.get("input") or "", record.get("output")
        if not isinstance(ins, str) or not isinstance(inp, str) or not isinstance(out, str):
            raise ValueError("Alpaca records need string 'instruction' and 'output' (and optional string 'input')")
        return None, [(ins + ("\n\n" + inp if inp else ""), out, True)]
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record.get("completion"), str):
            raise ValueError("prompt/completion records need two strings")
        return None, [(record["prompt"], record["completion"], True)]
    raise ValueError("expected 'messages', 'conversations', 'instruction'/'output' or 'prompt'/'completion'")


def conversation(msgs, field: str) -> tuple:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"'{field}' must be a non-empty list")
    turns, system, pending = [], None, None
    for i, m in enumerate(msgs):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: each message must be an object")
        tool = next((k for k in TOOLS if k in m and m[k]), None)
        if tool or m.get("role") in TOOLS:
            raise ValueError(f"{where}.{tool or 'role'}: tool calls are not supported")
        for key in (k for k in m if k not in ("role", "content", "weight") and not (k in TOOLS and not m[k])):
            raise ValueError(f"{where}.{key}: a message field that is not implemented (role, content, weight)")
        role, text = m.get("role"), text_of(m.get("content"), f"{where}.content")
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise ValueError(f"{where}.weight: {json.dumps(weight)}; only 0 (not trained on) or 1 is implemented")
        if role == "system" and i == 0:
            system = text
        elif role == "user" and pending is None:
            pending = text
        elif role == "assistant" and pending is not None:
            turns.append((pending, text, weight == 1))
            pending = None
        else:
            raise ValueError(f"{where}.role: {json.dumps(role)} out of place; messages must alternate user, assistant "
                             f"(after an optional system) and end with assistant")
        if weight == 0 and role != "assistant":
            raise ValueError(f"{where}.weight: 0 on a {role} turn; only assistant turns carry a weight")
    if pending is not None or not turns:
        raise ValueError(f"'{field}' must end with an assistant message")
    return system, turns


# -----------------------------------------------------------------------------
# tokenizing a conversation through its template, and the labels


def encode_pieces(tok, pieces) -> tuple:
    """[(text or token ids, is_label)] -> (ids, is_label per id). Text is tokenized as it extends the text since the
    last explicit ids (so a prompt is tokenized exactly as generation tokenizes it alone); where a piece's text
    cannot extend the tokens before it, it is tokenized on its own."""
    ids, labels, text, start = [], [], "", 0  # text: what ids[start:] are the tokenization of
    for piece, label in pieces:
        if isinstance(piece, list):
            new, text, start = piece, "", len(ids) + len(piece)
        else:
            full = tok.encode(text + piece, bos=False)
            done = ids[start:]
            if full[:len(done)] == done:
                new, text = full[len(done):], text + piece
            else:
                new = tok.encode(piece, bos=False)
                text, start = "", len(ids) + len(new)
        ids += new
        labels += [label] * len(new)
    return ids, labels


def encode_example(tok, template, system, turns, seq_len: int) -> tuple:
    """-> (inputs (T,), targets (T,)) with targets[t] the token after inputs[t] or IGNORE_INDEX, T <= seq_len."""
    ids, is_label = encode_pieces(tok, template.pieces(system, turns))
    ids, is_label = ids[:seq_len + 1], is_label[:seq_len + 1]  # truncation
    inputs = torch.tensor(ids[:-1])
    targets = torch.tensor([t if lab else IGNORE_INDEX for t, lab in zip(ids[1:], is_label[1:])])
    return inputs, targets


def prompt_ids(tok, template, user: str, system=None) -> list:
    """what generation starts from: the template up to the assistant's answer, as training tokenized it."""
    return encode_pieces(tok, template.prompt(system, user))[0]


def load_examples(path: str, tok, template, seq_len: int) -> tuple:
    """tokenized examples [(inputs, targets, conversation)] and the number dropped with no answer token to train on
    (every answer weight 0, or truncated away)."""
    examples, dropped = [], 0
    for lineno, rec in read_records(path):
        try:
            system, turns = to_turns(rec)
            inputs, targets = encode_example(tok, template, system, turns, seq_len)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if (targets != IGNORE_INDEX).any():
            examples.append((inputs, targets, (system, turns)))
        else:
            dropped += 1
    if not examples:
        raise DataError(f"{path}: no example keeps an answer token to train on (truncation to {seq_len} tokens, or "
                        f"every answer weight 0)")
    return examples, dropped


def unknown_warning(tok, examples, share: float = 0.01):
    """one warning line when more than `share` of the answer tokens are <unk> (text the tokenizer cannot write,
    so the model cannot learn it), with the counts and the characters of the first such answer; else None."""
    unk = tok.unk_id
    if unk is None:  # (a byte-level tokenizer writes any text)
        return None
    n_label = n_unk = n_prompt = n_prompt_unk = 0
    first = None  # the first answer with an <unk>
    for x, y, (_, turns) in examples:
        is_label = y != IGNORE_INDEX  # (T,) the answers and their EOS: y[t] is token t + 1
        in_prompt = torch.cat([torch.tensor([True]), ~is_label[:-1]])  # (T,) x[t] is a prompt token
        n_label, n_unk = n_label + int(is_label.sum()), n_unk + int((y[is_label] == unk).sum())
        n_prompt, n_prompt_unk = n_prompt + int(in_prompt.sum()), n_prompt_unk + int((x[in_prompt] == unk).sum())
        if first is None and (y[is_label] == unk).any():
            first = next((a for _, a, _ in turns if unk in tok.encode(a, bos=False)), None)
    if n_unk <= share * n_label:
        return None
    chars = sorted({c for c in first or "" if unk in tok.encode(c, bos=False)})  # what it cannot write
    example = f"cannot write {' '.join(map(repr, chars))} (e.g. in {first[:60]!r})" if chars else "cannot write some"
    return (f"warning: {n_unk:,} of {n_label:,} answer tokens ({n_unk / n_label:.1%}) are <unk> (and {n_prompt_unk:,} "
            f"of {n_prompt:,} prompt tokens): the tokenizer {example}; the model cannot learn what it cannot write")


# -----------------------------------------------------------------------------
# batching: one example per row, or packed rows


def collate(examples, pad_id: int) -> tuple:
    """right-pad to the longest example: inputs (B, T), targets (B, T). One example per row and causal
    attention mean no token attends to another example or to padding; padding has no label."""
    T = max(len(x) for x, _, _ in examples)
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y, _) in enumerate(examples):
        inputs[i, :len(x)], targets[i, :len(y)] = x, y
    return inputs, targets


def pack(examples, seq_len: int, min_rows: int = 1) -> list:
    """examples -> rows (lists of examples) of at most seq_len tokens each: no more rows than first-fit decreasing
    needs (at least min_rows), and of even lengths where that many rows allow it (longest example first, each into
    the row with the fewest tokens), so that rows batched together carry little padding."""
    order = sorted(examples, key=lambda e: -len(e[0]))  # longest first (a stable sort: ties keep the draw order)
    ffd = []  # first fit decreasing: [tokens, examples] per row
    for e in order:
        row = next((r for r in ffd if r[0] + len(e[0]) <= seq_len), None)
        if row is None:
            ffd.append(row := [0, []])
        row[0] += len(e[0])
        row[1].append(e)
    least = math.ceil(sum(len(x) for x, _, _ in examples) / seq_len)
    for n in range(max(min_rows, least), max(min_rows, len(ffd)) + 1):
        rows, heap = [[] for _ in range(n)], [(0, i) for i in range(n)]  # (tokens in the row, row)
        for e in order:
            used, i = heapq.heappop(heap)
            if used + len(e[0]) > seq_len:  # the emptiest row is full: n rows are too few
                break
            rows[i].append(e)
            heapq.heappush(heap, (used + len(e[0]), i))
        else:
            return [r for r in rows if r]
    return [r for _, r in ffd]


def collate_packed(rows, pad_id: int) -> tuple:
    """rows of packed examples -> inputs (R, T), targets (R, T) and segments (R, T): each position's example in its
    row (0, 1, ...), -1 for padding (which attends only to padding and has no label)."""
    T = max(sum(len(x) for x, _, _ in row) for row in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for j, (x, y, _) in enumerate(row):
            inputs[r, t:t + len(x)], targets[r, t:t + len(y)], segments[r, t:t + len(x)] = x, y, j
            t += len(x)
    return inputs, targets, segments


# a packed row joins a micro-batch only if padding it to the micro-batch's longest row costs at most this share
MAX_PAD = 0.05


def step_batches(draws, batch_size: int, seq_len: int, pad_id: int, packing: bool = True, first_apart=False,
                 world: int = 1) -> list:
    """one optimizer step's draws (Batches.next, each batch_size examples) -> its micro-batches [(inputs, targets,
    segments or None)], at least `world` of them (process r takes [r::world]). Without packing: a draw a
    micro-batch, one example a row. With packing: the step's examples in rows of at most seq_len tokens (pack),
    up to batch_size rows a micro-batch, each row at least 1 - MAX_PAD as long as its micro-batch's longest.
    first_apart (SpIEL-AG's window opens this step): the first draw alone makes the first micro-batch, whose dense
    gradient picks the window's candidates: the same examples as without packing (docs/method.md)."""
    if not packing:
        return [(*collate(d, pad_id), None) for d in draws]
    head, rest = (draws[0], draws[1:]) if first_apart else ([], draws)
    others = max(1, world - bool(head))  # the micro-batches the rest must make, at least
    rows = sorted(pack([e for d in rest for e in d], seq_len, others), key=lambda r: -sum(len(x) for x, _, _ in r))
    per, groups, longest = max(1, min(batch_size, len(rows) // others)), [pack(head, seq_len)] * bool(head), 0
    for row in rows:  # longest first: a row joins the last micro-batch if padding it there costs little
        n = sum(len(x) for x, _, _ in row)
        if len(groups) > bool(head) and len(groups[-1]) < per and n >= (1 - MAX_PAD) * longest:
            groups[-1].append(row)
        else:
            groups.append([row])
            longest = n
    return [collate_packed(g, pad_id) for g in groups]


def load_run(args, tok, template, world: int, max_seq_len: int, say) -> tuple:
    """a train.py run's data: (training examples, validation examples, the number of optimizer steps), reported."""
    if args.seq_len > max_seq_len:  # (--seq-len's default 2048 on a model with fewer positions)
        say(f"note: --seq-len {args.seq_len} is more than this model's {max_seq_len} positions: using {max_seq_len}")
        args.seq_len = max_seq_len
    if args.resume and args.data_sha256 and sha256(args.data) != args.data_sha256:
        raise CheckpointError(f"{args.data}: not the data this run trained on (its hash differs)")
    train_set, val_set, dropped = load_splits(args.data, args.val_data, args.val_frac, tok, template, args.seq_len,
                                              args.seed)
    if dropped:
        say(f"data: dropped {dropped} examples with no answer token to train on (every answer weight 0, or "
            f"truncated away at --seq-len {args.seq_len})")
    warning = unknown_warning(tok, train_set)  # text the tokenizer can only write as <unk>
    if warning:
        say(warning)
    per_step = args.batch_size * args.grad_accum * world
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(train_set) / per_step))
    n_label = sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in train_set)
    rows = "one a row" if args.no_packing else f"packed into rows of {args.seq_len} tokens"
    say(f"data: {len(train_set)} training / {len(val_set)} validation examples, "
        f"{n_label / len(train_set):.1f} answer tokens per example; {per_step} examples per step "
        f"({world} process{'es' * (world > 1)}), {rows}, {total_steps} steps; chat template: {template.name}")
    return train_set, val_set, total_steps


def epoch_order(n: int, seed: int, epoch: int) -> list:
    """the example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def load_splits(path: str, val_path, val_frac: float, tok, template, seq_len: int, seed: int) -> tuple:
    """(training examples, validation examples, how many were dropped): val_path's, or val_frac of path's."""
    train, dropped = load_examples(path, tok, template, seq_len)
    if not val_path:
        return (*split_train_val(train, val_frac, seed), dropped)
    val, dropped_val = load_examples(val_path, tok, template, seq_len)
    return train, val, dropped + dropped_val


def split_train_val(examples: list, val_frac: float, seed: int) -> tuple:
    if not val_frac:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(examples) * val_frac)) if len(examples) > 1 else 0
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


class Batches:
    """draws of batch_size examples in a fixed per-epoch order (seed, epoch), with a position (epoch, index) that
    the resume state keeps, so a resumed run sees exactly the same data. Every process walks the same stream."""

    def __init__(self, examples: list, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.index, self.order = 0, 0, None

    def next(self) -> list:
        """the next batch_size examples (an epoch's last draw may be shorter)."""
        if self.order is None or self.order[0] != self.epoch:  # one permutation per epoch
            self.order = (self.epoch, epoch_order(len(self.examples), self.seed, self.epoch))
        take = self.order[1][self.index:self.index + self.batch_size]
        self.index += len(take)
        if self.index >= len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
        return [self.examples[i] for i in take]
