"""train.py, merge.py, generate.py end to end on a tiny model: every method learns, exact resume, loss
masking and normalisation, merging, and bad input (one line each, checked in this process through train.cli,
merge.main and generate.main; one test runs the scripts as a shell does, for their __main__ paths)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import chat
import config
import data
import finetune
import train
from conftest import communicate, popen, random_state_dict, train_run, write_hf
from files import CheckpointError
from finetune import fingerprint
from llama import IGNORE_INDEX, PROJECTIONS, load_model
from tokenizer import SentencePiece as Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def other_base(tiny, tmp_path_factory):
    """another tiny base of the same shapes (other random weights), in the Hugging Face layout."""
    return write_hf(random_state_dict(tiny.args, seed=1), tiny.args, str(tmp_path_factory.mktemp("other") / "hf"),
                    tokenizer=tiny.tokenizer)


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def run(tiny, task, out, *extra):
    argv = ["--ckpt", tiny.hf, "--data", task[0], "--val-data", task[1], "--seq-len", "48", "--batch-size", "4",
            "--grad-accum", "2", "--device", "cpu", "--dtype", "float32", "--out", str(out), "--lr", "1e-2",
            "--weight-decay", "0", "--warmup", "2", "--density", "0.1", "--first-reselect", "2",
            "--reselect-every", "5", "--eval-every", "0", "--save-every", "1000", *extra]
    return train.main(argv)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("method", ["spiel-ag", "spiel-ma", "lora", "full"])
def test_each_method_lowers_validation_loss(tiny, task, tmp_path, method):
    assert train_run(tiny, task, tmp_path / method, "--max-steps", "24", "--eval-every", "24", method=method) == 0
    evals = [r["val_loss"] for r in read_log(tmp_path / method) if r.get("event") == "eval"]
    assert len(evals) == 2 and evals[1] < 0.9 * evals[0], evals
    artifact = {"lora": "lora.safetensors", "full": "model/config.json"}.get(method, "delta.safetensors")
    assert os.path.exists(tmp_path / method / artifact)
    if method.startswith("spiel"):
        assert any(r.get("event") == "reselect" for r in read_log(tmp_path / method))


@pytest.mark.parametrize("method", ["spiel-ag", "spiel-ma", "lora"])
def test_resume_is_bit_identical(tiny, task, tmp_path, trained, method):
    """8 steps in one run (the shared one) == 6 steps, stop (inside an open AG window: steps 5..7), resume for 2
    more."""
    whole = trained(method)
    assert train_run(tiny, task, tmp_path / "split", "--max-steps", "8", "--stop-at-step", "6", method=method) == 0
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert state["step"] == 6
    if method == "spiel-ag":
        assert state["selector"] and all(w["steps"] == 2 for w in state["selector"].values())  # steps 5 and 6
    assert train.main(["--out", str(tmp_path / "split"), "--resume"]) == 0
    name = "lora.safetensors" if method == "lora" else "delta.safetensors"
    a, b = load_file(os.path.join(whole, name)), load_file(tmp_path / "split" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda out: [r["loss"] for r in read_log(out) if "loss" in r]  # noqa: E731
    assert losses(whole) == losses(tmp_path / "split")


def test_loss_does_not_depend_on_the_micro_batch_split(tiny, task, tmp_path):
    """one step as 1 x 8 examples or as 8 x 1: the same per-token loss and gradient norm."""
    for name, bs, acc in (("a", "8", "1"), ("b", "1", "8")):
        assert run(tiny, task, tmp_path / name, "--max-steps", "1", "--batch-size", bs, "--grad-accum", acc) == 0
    a, b = (read_log(tmp_path / n)[-2] for n in "ab")  # the step record (the last one is the end summary)
    assert a["step"] == b["step"] == 1
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_only_answer_tokens_and_eos_are_labels(tiny):
    tok = Tokenizer(tiny.tokenizer)
    system, turns = data.to_turns({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "copy the cat"},
        {"role": "assistant", "content": "the cat"}, {"role": "user", "content": "copy a dog"},
        {"role": "assistant", "content": "a dog"}]})
    inputs, targets = data.encode_example(tok, chat.Tulu(tok), system, turns, seq_len=200)
    labels = targets[targets != IGNORE_INDEX].tolist()
    # the labels are exactly each answer's tokens followed by EOS, in order
    want = tok.encode("the cat", bos=False) + [tok.eos_id] + tok.encode("a dog", bos=False) + [tok.eos_id]
    assert labels == want
    # and each label sits right after its prompt: the text before the first label ends with the template
    first = int((targets != IGNORE_INDEX).nonzero()[0])
    assert tok.decode(inputs[:first + 1].tolist()).endswith("<|assistant|>\n") or \
        tok.decode(inputs[:first + 1].tolist()).rstrip().endswith("<|assistant|>")
    # truncation that cuts every answer away leaves no label (such examples are dropped by load_examples)
    _, t = data.encode_example(tok, chat.Tulu(tok), system, turns, seq_len=5)
    assert (t == IGNORE_INDEX).all()


def test_merge_gives_the_same_logits_as_the_unmerged_delta(tiny, trained, tmp_path):
    import merge
    delta = os.path.join(trained("spiel-ag"), "delta.safetensors")
    merge.main(["--ckpt", tiny.hf, "--delta", delta, "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    merged = load_model(str(tmp_path / "merged"), dtype=torch.float32)
    live = load_model(tiny.hf, dtype=torch.float32)
    finetune.load(live, delta, finetune.base_of(live, tiny.hf))
    x = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(merged(x)[0], live(x)[0], atol=1e-5, rtol=1e-5)
    assert not torch.equal(merged(x)[0], load_model(tiny.hf, dtype=torch.float32)(x)[0])  # the delta did something


def run_cli(*argv, capsys=None):
    """train.cli in this process (no interpreter start-up): -> (exit code, the line it ends with: the message it
    exits with, or, for a usage error (exit 2) when capsys is given, what argparse printed to stderr)."""
    if capsys is not None:
        capsys.readouterr()  # (only what this call prints)
    with pytest.raises(SystemExit) as e:
        train.cli(list(argv))
    code = e.value.code
    return code, capsys.readouterr().err.strip() if capsys is not None and code == 2 else str(code)


def one_line(argv, needle, capsys=None):
    """train.cli(argv) exits non-zero with one line that holds `needle` (no traceback: an uncaught exception
    would not be a SystemExit)."""
    code, message = run_cli(*argv, capsys=capsys)
    assert code not in (0, None) and needle in message and "\n" not in message.strip(), message


def one_line_raise(exc, needle, main, argv):
    """merge.main / generate.main raise; their __main__ prints `error: <message>`: one line holding `needle`."""
    with pytest.raises(exc, match=needle) as e:
        main(argv)
    assert "\n" not in str(e.value), str(e.value)


def one_line_error(p, needle):
    """a finished subprocess failed with one line on stderr, no traceback."""
    assert p.returncode != 0, p.stdout
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in p.stderr and needle in err[0], p.stderr


def test_bad_input_gives_one_line_errors(tiny, task, tmp_path, capsys):
    base = ["--ckpt", tiny.hf, "--device", "cpu", "--max-steps", "1", "--out", str(tmp_path / "o")]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    one_line([*base, "--data", str(broken)], f"{broken}:2: invalid JSON")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    one_line([*base, "--data", str(empty)], f"{empty}: no records")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"instruction": "a"}\n')
    one_line([*base, "--data", str(missing)], f"{missing}:1: Alpaca records need")
    code, message = run_cli(*base, "--data", task[0], "--method", "spiel-xx", capsys=capsys)
    assert code == 2 and "invalid choice" in message, message
    one_line([*base, "--data", task[0], "--ckpt", str(tmp_path / "nowhere")], "checkpoint folder not found")


def test_a_delta_for_another_model_is_refused(tiny, trained, other_base, tmp_path, capsys):
    import generate
    import merge
    delta = os.path.join(trained("spiel-ag"), "delta.safetensors")
    one_line_raise(CheckpointError, "another base", merge.main,
                   ["--ckpt", other_base, "--delta", delta, "--out", str(tmp_path / "m")])
    one_line_raise(CheckpointError, "another base", generate.main,
                   ["--ckpt", other_base, "--delta", delta, "--prompt", "x"])
    assert not os.path.exists(tmp_path / "m")
    generate.main(["--ckpt", tiny.hf, "--delta", delta, "--chat", "--prompt", "copy the cat", "--max-new-tokens",
                   "4", "--temperature", "0"])  # (no exception: exit 0)
    assert capsys.readouterr().out.startswith("copy the cat\n")


@pytest.mark.slow  # (scripts in a shell, or a tool's own run: the slow tier)
def test_the_scripts_end_bad_input_with_one_line_in_a_shell(tiny, task, trained, other_base, tmp_path):
    """the scripts as a shell runs them (their __main__ paths; the processes run side by side): one line on
    stderr, no traceback, a non-zero exit code. train.py's usage error is exactly argparse's line; train.py and
    generate.py say the same about a broken checkpoint folder (one checker); merge.py refuses a fine-tune of
    another base."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    data_file = tmp_path / "d.jsonl"
    data_file.write_text('{"prompt": "a", "completion": "b"}\n')
    delta = os.path.join(trained("spiel-ag"), "delta.safetensors")
    commands = {"train": ["train.py", "--ckpt", str(tmp_path / "c"), "--data", str(data_file), "--out",
                          str(tmp_path / "o")],
                "generate": ["generate.py", "--ckpt", str(tmp_path / "c"), "--prompt", "x"],
                "usage": ["train.py", "--ckpt", tiny.hf, "--data", task[0], "--lr", "-1"],
                "merge": ["merge.py", "--ckpt", other_base, "--delta", delta, "--out", str(tmp_path / "m")]}
    started = {k: popen([sys.executable, *argv], cwd=ROOT) for k, argv in commands.items()}
    p = {}
    for k, proc in started.items():
        stdout, stderr = communicate(proc)
        p[k] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    one_line_error(p["train"], "config.json found but no")
    assert p["train"].stderr == p["generate"].stderr
    assert not (tmp_path / "o").exists()
    usage = p["usage"]
    assert usage.returncode == 2 and usage.stderr.strip() == "train.py: error: argument --lr: -1 is not > 0", usage.stderr
    one_line_error(p["merge"], "another base")
    assert not (tmp_path / "m").exists()


def test_two_fine_tunes_of_one_base_generate_and_merge(tiny, tmp_path, capsys):
    """two deltas trained apart on one base: generate.py applies both (merged in memory), merge.py merges both
    (one after the other), and both give the same greedy text; on a quantized base generate.py says why not."""
    import generate
    import merge
    import spiel
    files = []
    for seed in (1, 2):
        model = load_model(tiny.hf, dtype=torch.float32)
        base = finetune.Base(fingerprint(model))
        for layer in spiel.add_sparse_deltas(model, PROJECTIONS, density=0.05, seed=seed).values():
            layer.values.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        files += ["--delta", str(tmp_path / f"d{seed}.safetensors")]
        finetune.save(model, files[-1], base, meta={"finetune_id": f"d{seed}"})
    gen = ["--prompt", "copy the cat", "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"]

    def generated(*argv):  # generate.py's main in this process (no interpreter start-up): what it prints
        generate.main([*argv, *gen])
        return capsys.readouterr().out

    both = generated("--ckpt", tiny.hf, *files)
    merge.main(["--ckpt", tiny.hf, *files, "--out", str(tmp_path / "m"), "--dtype", "float32"])
    capsys.readouterr()
    assert generated("--ckpt", str(tmp_path / "m")) == both
    alone = [generated("--ckpt", tiny.hf, *extra) for extra in ([], files[:2], files[2:])]
    assert len({both, *alone}) == 4, alone  # each delta changes the text: none was left out
    one_line_raise(ValueError, "unquantized", generate.main, ["--ckpt", tiny.hf, *files, *gen, "--quantize", "int8"])


def test_an_existing_run_is_never_overwritten_and_nan_stops(tiny, task, trained, tmp_path):
    shutil.copytree(trained("spiel-ag"), tmp_path / "r")  # a finished run
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        run(tiny, task, tmp_path / "r", "--max-steps", "2")
    before = (tmp_path / "r" / "delta.safetensors").read_bytes()
    assert run(tiny, task, tmp_path / "nan", "--max-steps", "4", "--lr", "1e30", "--save-every", "1",
               "--grad-clip", "0") == 1  # diverges: stops with a message, exit 1
    assert (tmp_path / "r" / "delta.safetensors").read_bytes() == before
    state = torch.load(tmp_path / "nan" / "state.pt", weights_only=True)  # the last good checkpoint is intact
    assert all(torch.isfinite(t).all() for k, t in state["trainable"].items() if k.endswith(".values"))


def test_weight_decay_rule_and_authors_defaults(tiny):
    """the defaults are the authors' (no clipping; SM3 eps 1e-8; lr by method); SpIEL-AG's weight decay keeps the
    authors' per-step shrink lr x wd = 1e-5 x 30 at any --lr unless --weight-decay is given; others: 0."""
    import sm3
    from llama import PRESETS, Transformer

    def decay(*argv):
        a = config.get_parser().parse_args(["--density", "0.1", *argv])
        _, opt, _ = train.add_trainable(Transformer(PRESETS["tiny"]), a)
        return opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"], opt

    lr, wd, _ = decay("--method", "spiel-ag")
    assert lr == 1e-5 and wd == pytest.approx(30.0)
    lr, wd, _ = decay("--method", "spiel-ag", "--lr", "3e-3")
    assert wd == pytest.approx(0.1) and lr * wd == pytest.approx(1e-5 * 30)
    assert decay("--method", "spiel-ag", "--lr", "3e-3", "--weight-decay", "0")[1] == 0
    for method, want_lr in (("spiel-ma", 1e-3), ("lora", 1e-4), ("full", 2e-5)):
        lr, wd, opt = decay("--method", method)
        assert (lr, wd) == (want_lr, 0.0)
    assert isinstance(decay("--method", "spiel-ma")[2], sm3.SM3) and decay("--method", "spiel-ma")[2].defaults["eps"] == 1e-8
    assert config.get_parser().parse_args([]).grad_clip == 0


def test_learning_rate_schedule_never_exceeds_the_peak():
    # warmup in whole steps (a fraction of the steps is rounded up), then a linear decay to peak / (total - warm)
    for total in (7, 50, 120, 333, 1000):
        for warmup in (0, 0.03, 0.1, 0.25, 2, 2.5):
            lrs = [train.lr_at(s, total, 1.0, warmup) for s in range(1, total + 1)]
            assert max(lrs) == pytest.approx(1.0) and all(lr <= 1.0 + 1e-12 for lr in lrs), (total, warmup)
            assert all(a <= b for a, b in zip(lrs, lrs[1:max(lrs.index(max(lrs)), 1)]))
    assert train.lr_at(4, 120, 1.0, 0.03) == 1.0 and train.lr_at(3, 120, 1.0, 0.03) == 0.75  # 3.6 -> 4 steps


def test_ckpt_alone_runs_the_default_task_to_its_exact_match_line(tiny, tmp_path, capsys):
    """`python train.py --ckpt DIR` with no --data: the demo's task on that model, exact match before and after
    (shortened here; the user's flags win over the task's)."""
    argv = ["--ckpt", tiny.hf, "--out", str(tmp_path / "r"), "--max-steps", "2", "--exact-match", "2",
            "--device", "cpu", "--threads", "1"]
    one_line(argv, "the default budget (--match-lora-rank 64, the paper's): a budget of 155,648 deltas does not fit "
                   "98,304 targeted weights; choose another budget (e.g. --density 0.05)")
    capsys.readouterr()
    # (LLaMA 2 has room for the paper's budget; this tiny model has not)
    assert train.main([*argv, "--density", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "no --data: fine-tuning" in out and "the demo's task" in out and "--data your.jsonl" in out
    assert "exact match before fine-tuning: " in out and "exact match after fine-tuning: " in out
    args = json.loads((tmp_path / "r" / "args.json").read_text())
    assert args["data"].endswith(os.path.join("demo", "train.jsonl")) and args["max_steps"] == 2
    assert args["lr"] == config.TASK_LR["spiel-ag"] and args["batch_size"] == 8
    one_line(["--data", os.path.join(ROOT, "demo", "train.jsonl")], "--ckpt is required", capsys)


def test_a_padded_vocabulary_trains_generates_and_merges_and_too_few_rows_is_one_line(tiny, task, tmp_path, capsys):
    """an embedding with more rows than the tokenizer has pieces (an added pad token: LLaMA 2 + 1 row) trains,
    samples only ids the tokenizer can decode, and merges; fewer rows than pieces names both numbers."""
    import generate
    import merge
    from conftest import write_meta
    from llama import ModelArgs
    with open(tiny.tokenizer, "rb") as src, open(tmp_path / "tokenizer.model", "wb") as dst:
        dst.write(src.read())  # one level above the Meta folders, as Meta ships it
    sample = ["--prompt", "the cat", "--temperature", "2", "--top-p", "1", "--max-new-tokens", "80", "--device", "cpu"]
    for rows in (tiny.args.vocab_size + 44, tiny.args.vocab_size - 56):
        args = ModelArgs(**{**tiny.args.__dict__, "vocab_size": rows})
        sd = random_state_dict(args, seed=1)
        meta = write_meta(sd, args, str(tmp_path / f"meta{rows}"))  # vocab_size -1: the embedding's rows
        hf = write_hf(sd, args, str(tmp_path / f"hf{rows}"), tokenizer=tiny.tokenizer)
        out = tmp_path / f"run{rows}"
        if rows < 256:
            for ckpt in (meta, hf):
                with pytest.raises(CheckpointError, match=f"{ckpt}: its embedding has {rows} rows but .* has 256 "
                                                          "tokens: this tokenizer is not the model's"):
                    generate.main(["--ckpt", ckpt, *sample])
                code, message = run_cli("--ckpt", ckpt, "--data", task[0], "--out", str(out))
                assert code and "has 256 tokens" in message and not out.exists()
                with pytest.raises(CheckpointError, match="has 256 tokens"):
                    merge.main(["--ckpt", ckpt, "--out", str(out)])
            continue
        generate.main(["--ckpt", hf, *sample])  # (an id >= 256 would crash the tokenizer's decoder)
        assert run(tiny, task, out, "--ckpt", meta, "--max-steps", "2") == 0
        generate.main(["--ckpt", meta, "--delta", str(out / "delta.safetensors"), *sample])
        merge.main(["--ckpt", meta, "--delta", str(out / "delta.safetensors"), "--out", str(tmp_path / "m"),
                    "--dtype", "float32"])
        assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == rows


def test_the_mmap_threshold_is_fixed_only_for_a_large_model(monkeypatch):
    """glibc's 1 MB mmap threshold (memory at 7B) for a model with a 32 MB fp32 matrix; smaller ones keep
    glibc's default (the fresh pages would cost them speed)."""
    import ctypes

    import system
    from llama import ModelArgs
    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name: type("C", (), {"mallopt": lambda *a: calls.append(a[-2:])})())
    system.fix_mmap_threshold(ModelArgs(dim=1024, n_layers=6, n_heads=16, vocab_size=4096))  # bench.py's CPU shape
    assert calls == []
    system.fix_mmap_threshold(ModelArgs(dim=4096, n_layers=4, n_heads=32, vocab_size=32000))  # 7B width
    assert calls == [(-3, 1 << 20)]
