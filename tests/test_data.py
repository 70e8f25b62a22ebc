"""data.py: training and generation see the same prompt ids, for tokenizers that treat the whitespace at
the prompt/answer boundary differently."""

import io
import json
import os
import random
import sys

import pytest

import chat
import data
from llama import IGNORE_INDEX
from tokenizer import SentencePiece as Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def lines(n=2000, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 7)))
        # capitals only inside words: a capital after a space has no merged piece, so the space is its own
        out.append(f"<|user|>\nshift: {s}\n<|assistant|>\n{s} {rng.randint(0, 999)} q{rng.choice('ABC')}")
    return out


def sentencepiece(path, **kw):
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines()), model_writer=buf, vocab_size=kw.pop("vocab_size", 120),
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False, **kw)
    path.write_bytes(buf.getvalue())
    return Tokenizer(str(path))


@pytest.fixture(scope="module", params=["demo", "drops-trailing-whitespace", "llama-2-like-byte-fallback"])
def tok(request, tmp_path_factory):
    if request.param == "demo":
        return Tokenizer(os.path.join(ROOT, "demo", "base", "tokenizer.model"))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    if request.param == "drops-trailing-whitespace":  # sentencepiece's defaults: nmt_nfkc, extra whitespace removed
        return sentencepiece(path)
    return sentencepiece(path, vocab_size=400, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                         remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)


def test_generation_starts_from_exactly_the_ids_the_loss_conditioned_on(tok):
    rng = random.Random(1)
    for _ in range(50):
        user = "shift: " + " ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 6)))
        words = [rng.choice(LETTERS + "ABC") + rng.choice(["", "b", "7"]) for _ in range(rng.randint(1, 6))]
        answer = rng.choice(["", " ", "\n"]) + " ".join(words)
        system = rng.choice([None, "be brief"])
        inputs, targets = data.encode_example(tok, chat.Tulu(tok), system, [(user, answer, True)], seq_len=500)
        prompt = data.prompt_ids(tok, chat.Tulu(tok), user, system)
        # the prompt generation starts from is the exact prefix of the training sequence ...
        assert inputs[:len(prompt)].tolist() == prompt
        # ... no label before it, and the token right after it is the first label
        assert (targets[:len(prompt) - 1] == IGNORE_INDEX).all()
        assert (targets[len(prompt) - 1:] != IGNORE_INDEX).all()
        # the labels are the answer (as this tokenizer writes it after the prompt) and EOS
        labels = targets[len(prompt) - 1:].tolist()
        assert labels[-1] == tok.eos_id
        if tok.unk_id not in labels:  # (the demo's tokenizer has no capitals)
            assert tok.decode(labels[:-1]).strip() == answer.strip()


def test_second_turn_prompt_is_the_conversation_so_far(tok):
    turns = [("shift: a b", "b c", True), ("shift: c d", "d e", True)]
    inputs, targets = data.encode_example(tok, chat.Tulu(tok), None, turns, seq_len=500)
    first = data.prompt_ids(tok, chat.Tulu(tok), turns[0][0])
    p1 = tok.encode(chat.user_text(turns[0][0]), bos=False)
    a1 = tok.encode(chat.user_text(turns[0][0]) + turns[0][1], bos=False)[len(p1):]
    p2 = tok.encode(chat.user_text(turns[1][0]), bos=False)  # each turn's prompt tokenized alone, after the EOS
    history = first + a1 + [tok.eos_id] + p2
    assert p1 == first[1:] and inputs[:len(history)].tolist() == history
    assert targets[len(history) - 1] != IGNORE_INDEX and targets[len(history) - 2] == IGNORE_INDEX


def test_answers_the_tokenizer_cannot_write_are_warned_about(tmp_path):
    """the demo's tokenizer has no capital letters: "Stone" is <unk> + "tone". More than 1% of the answer tokens
    as <unk> gives one warning line with the counts and the characters; train.py prints it with the data."""
    import config
    tok = Tokenizer(os.path.join(ROOT, "demo", "base", "tokenizer.model"))
    assert tok.unk_id in tok.encode("Stone", bos=False)
    path = tmp_path / "caps.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"name rock {LETTERS[i % 26]}", "output": "Stone Age"}) + "\n"
                            for i in range(40)))
    examples, _ = data.load_examples(str(path), tok, chat.Tulu(tok), 96)
    n_label = sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in examples)
    warning = data.unknown_warning(tok, examples)
    assert warning.startswith(f"warning: 80 of {n_label} answer tokens ({80 / n_label:.1%}) are <unk> (and 0 of ")
    assert "cannot write 'A' 'S' (e.g. in 'Stone Age')" in warning and "\n" not in warning
    (tmp_path / "digit.jsonl").write_text(json.dumps({"prompt": "rock 7", "completion": "r"}) + "\n")
    digit, _ = data.load_examples(str(tmp_path / "digit.jsonl"), tok, chat.Tulu(tok), 96)  # no digits: counted apart
    assert "are <unk> (and 1 of " in data.unknown_warning(tok, examples + digit)
    demo = data.load_examples(os.path.join(ROOT, "demo", "train.jsonl"), tok, chat.Tulu(tok), 96)[0]
    assert data.unknown_warning(tok, demo) is None
    lines = []
    args = config.get_parser().parse_args(["--ckpt", ".", "--data", str(path), "--seq-len", "96", "--max-steps", "1"])
    data.load_run(args, tok, chat.Tulu(tok), 1, 4096, lines.append)  # (a model of 4096 positions: LLaMA 2's)
    warned = [line for line in lines if line.startswith("warning:")]
    assert len(warned) == 1 and "answer tokens (20.0%) are <unk>" in warned[0] and "'Stone Age'" in warned[0], lines


# -----------------------------------------------------------------------------
# the data shapes people bring

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy the cat"},
        {"role": "assistant", "content": "the cat"}, {"role": "user", "content": "copy a dog"},
        {"role": "assistant", "content": "a dog"}]


def shapes_of(conv):
    """one conversation in each record shape: OpenAI messages, text parts, ShareGPT."""
    parts = [dict(m, content=[{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}])
             for m in conv]
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"messages": {"messages": conv}, "parts": {"messages": parts},
            "sharegpt": {"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in conv]}}


def test_every_record_shape_and_file_kind_gives_the_same_examples(tmp_path):
    tok = Tokenizer(os.path.join(ROOT, "demo", "base", "tokenizer.model"))
    template = chat.Tulu(tok)
    want = data.encode_example(tok, template, *data.to_turns({"messages": CONV}), 96)
    records = [shapes_of(CONV)[k] for k in ("messages", "parts", "sharegpt")]
    files = {"jsonl": tmp_path / "a.jsonl", "json": tmp_path / "a.json"}
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    files["json"].write_text(json.dumps(records))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([shapes_of(CONV)["sharegpt"]] * 3), tmp_path / "a.parquet")
        files["parquet"] = tmp_path / "a.parquet"
        import datasets
        datasets.Dataset.from_list([shapes_of(CONV)["messages"]] * 3).save_to_disk(str(tmp_path / "saved"))
        files["datasets"] = tmp_path / "saved"
    except ImportError:
        pass  # (optional readers: tested where installed)
    for kind, path in files.items():
        examples, dropped = data.load_examples(str(path), tok, template, 96)
        assert len(examples) == 3 and dropped == 0, kind
        for x, y, _ in examples:
            assert x.tolist() == want[0].tolist() and y.tolist() == want[1].tolist(), kind
    # "weight": 0 on an assistant turn: context, not trained on
    weighted = [dict(m, weight=0) if m["content"] == "the cat" else m for m in CONV]
    x, y = data.encode_example(tok, template, *data.to_turns({"messages": weighted}), 96)
    assert x.tolist() == want[0].tolist() and 0 < int((y != IGNORE_INDEX).sum()) < int((want[1] != IGNORE_INDEX).sum())
    (tmp_path / "none.jsonl").write_text(json.dumps({"messages": [dict(m, weight=0) if m["role"] == "assistant" else m
                                                                  for m in CONV]}) + "\n")
    with pytest.raises(data.DataError, match="none.jsonl: no example keeps an answer token .*every answer weight 0"):
        data.load_examples(str(tmp_path / "none.jsonl"), tok, template, 96)


@pytest.mark.parametrize("kind", ["sharegpt.jsonl", "sharegpt.json", "parts.jsonl", "weight.jsonl", "a.parquet",
                                  "saved"])
def test_each_data_shape_trains(kind, tiny, tmp_path):
    from conftest import train_run
    convs = [[{"role": "user", "content": f"copy the {w}"}, {"role": "assistant", "content": f"the {w}"}]
             for w in ("cat", "dog", "mat", "red", "blue", "one", "two", "six")]
    key = kind.split(".")[0]
    if key == "weight":
        records = [{"messages": [convs[i][0], dict(convs[i][1], weight=i % 2), *convs[i + 1]]} for i in range(7)]
    else:
        records = [shapes_of(c)["sharegpt" if key in ("sharegpt", "a") else key if key == "parts" else "messages"]
                   for c in convs]
    path = tmp_path / kind
    if kind.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind.endswith(".json"):
        path.write_text(json.dumps(records))
    elif kind.endswith(".parquet"):
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        pytest.importorskip("datasets").Dataset.from_list(records).save_to_disk(str(path))
    assert train_run(tiny, (str(path), str(path)), tmp_path / "run", "--max-steps", "2", "--val-frac", "0") == 0


REFUSED = {  # a record -> the end of its one-line error (after file:line)
    "tool call": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "",
                                                                    "tool_calls": [{"id": "1"}]}]},
                  "messages[1].tool_calls: tool calls are not supported"),
    "tool role": ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
                  "messages[1].role: tool calls are not supported"),
    "sharegpt tool": ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "f"}]},
                      'conversations[1].from: "function_call" is not implemented (human, gpt, system); tool calls'),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                                 {"role": "assistant", "content": "a cat"}]},
                   'messages[0].content: a content part of type "image_url"; only text parts are implemented'),
    "weight 0.5": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho",
                                                                     "weight": 0.5}]},
                   "messages[1].weight: 0.5; only 0 (not trained on) or 1 is implemented"),
    "weight on user": ({"messages": [{"role": "user", "content": "hi", "weight": 0},
                                     {"role": "assistant", "content": "ho"}]},
                       "messages[0].weight: 0 on a user turn; only assistant turns carry a weight"),
    "unknown field": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho",
                                                                        "loss": False}]},
                      "messages[1].loss: a message field that is not implemented (role, content, weight)"),
    "record system": ({"system": "be brief", "conversations": [{"from": "human", "value": "hi"},
                                                               {"from": "gpt", "value": "ho"}]},
                      "field 'system' is not implemented"),
    "order": ({"messages": [{"role": "assistant", "content": "ho"}]}, 'messages[0].role: "assistant" out of place'),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_field_the_code_does_not_implement_is_refused_with_file_line_and_field(case, tmp_path):
    tok = Tokenizer(os.path.join(ROOT, "demo", "base", "tokenizer.model"))
    record, message = REFUSED[case]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(data.DataError) as e:
        data.load_examples(str(path), tok, chat.Tulu(tok), 96)
    assert str(e.value) == f"{path}:3: {message}" or str(e.value).startswith(f"{path}:3: {message}"), str(e.value)


def test_optional_readers_and_binary_files_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1\x00\x01")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    (tmp_path / "b.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(data.DataError, match=r"a.parquet: reading parquet needs pyarrow: pip install pyarrow$"):
        data.read_records(str(tmp_path / "a.parquet"))
    with pytest.raises(data.DataError, match=r"saved: reading a datasets folder needs datasets: pip install datasets$"):
        data.read_records(str(tmp_path / "saved"))
    with pytest.raises(data.DataError, match=r"b.jsonl: not UTF-8 text .*; data files are .jsonl, .json, .parquet"):
        data.read_records(str(tmp_path / "b.jsonl"))
    monkeypatch.undo()
    with pytest.raises(data.DataError, match=r"a folder, and not a datasets save_to_disk folder"):
        data.read_records(str(tmp_path))
