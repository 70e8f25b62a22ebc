"""data.py: training and generation see the same prompt ids, for tokenizers that treat the whitespace at
the prompt/answer boundary differently."""

import io
import json
import os
import random

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
