"""train.py as users run it: resume from anywhere, extend a run, refuse what would change its math, stop
anywhere (Ctrl-C), one-line errors for damaged run files and senseless flags, and what merge.py and
generate.py refuse (a busy --out, a fine-tune applied twice).

Everything runs in this process (train.main / train.cli, merge.main, generate.main), on the shared finished runs
of conftest's `trained` where a test only needs one (copied before it is resumed or damaged), except where the
claim is about a process: a signal to a live run, a lock held by a live or a killed run, output piped to a file,
a process's own peak memory."""

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import conftest
import files
import train
from conftest import communicate, popen, run_watched, wait_until
from files import CheckpointError
from test_train import ROOT, one_line, one_line_raise, read_log, run, run_cli


def steps(out):
    return {r["step"]: r for r in read_log(out) if "loss" in r}


def train_argv(tiny, task, out, *extra, method="spiel-ag") -> list:
    """the command line conftest.train_run gives train.main (the shared runs' flags, every flag in `extra`
    winning): a run with "--max-steps 8" here ends exactly where trained(method) ends."""
    seen, real = [], train.main
    train.main = lambda argv: seen.append(argv) or 0  # (read off train_run itself: it cannot drift from it)
    try:
        conftest.train_run(tiny, task, out, *extra, method=method)
    finally:
        train.main = real
    return [str(x) for x in seen[0]]


def test_moved_and_copied_run_folders_resume_into_themselves(tiny, task, trained, tmp_path, monkeypatch):
    """a run started with relative inputs and stopped at step 4: a copy of it resumes and writes only into itself;
    the run, moved, resumes from another working directory into the folder where it is now; both end exactly
    where the uninterrupted run (the shared one) ends."""
    monkeypatch.chdir(ROOT)
    argv = train_argv(tiny, task, tmp_path / "a", "--max-steps", "8", "--stop-at-step", "4")
    for flag in ("--ckpt", "--data", "--val-data"):  # relative inputs, as a user types them
        argv[argv.index(flag) + 1] = os.path.relpath(argv[argv.index(flag) + 1], ROOT)
    assert train.main(argv) == 0
    # copied: the copy writes only into itself
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    before = (tmp_path / "a" / "log.jsonl").read_bytes()
    assert train.main(["--out", str(tmp_path / "c"), "--resume"]) == 0
    assert (tmp_path / "a" / "log.jsonl").read_bytes() == before
    # moved: resumes from another working directory, into the folder where it is now
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--out", "b", "--resume"]) == 0
    assert not (tmp_path / "a").exists()
    whole = load_file(os.path.join(trained("spiel-ag"), "delta.safetensors"))
    for name in ("b", "c"):  # and both end exactly where the uninterrupted run ends
        resumed = load_file(tmp_path / name / "delta.safetensors")
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_extending_a_run_continues_on_the_longer_runs_schedule_and_data(tiny, task, trained, tmp_path):
    """--resume --max-steps 8 on a finished 4-step run: steps 5..8 get the learning rate, the reselection steps
    and the data position of an uninterrupted 8-step run (the shared one; steps 1..4 keep the schedule they had),
    and an extension interrupted (inside an open AG window) and resumed ends exactly where an uninterrupted
    extension ends."""
    long = trained("spiel-ag")
    assert train.main(train_argv(tiny, task, tmp_path / "ext", "--max-steps", "4")) == 0
    shutil.copytree(tmp_path / "ext", tmp_path / "ext2")  # the same finished 4-step run, twice
    assert train.main(["--out", str(tmp_path / "ext"), "--resume"]) == 0  # finished: says so, trains nothing
    assert max(steps(tmp_path / "ext")) == 4
    assert train.main(["--out", str(tmp_path / "ext"), "--resume", "--max-steps", "8"]) == 0
    assert train.main(["--out", str(tmp_path / "ext2"), "--resume", "--max-steps", "8", "--stop-at-step", "6"]) == 0
    assert train.main(["--out", str(tmp_path / "ext2"), "--resume"]) == 0
    long_steps, ext = steps(long), steps(tmp_path / "ext")
    assert [ext[t]["lr"] for t in range(5, 9)] == [long_steps[t]["lr"] for t in range(5, 9)]
    reselect = lambda out: {r["step"]: r["changed"] for r in read_log(out) if r.get("event") == "reselect"}  # noqa
    assert reselect(tmp_path / "ext").keys() - {2} == reselect(long).keys() - {2} == {7}
    state = lambda out: torch.load(os.path.join(out, "state.pt"), weights_only=True)  # noqa: E731
    assert state(tmp_path / "ext")["data"] == state(long)["data"] and state(tmp_path / "ext")["step"] == 8
    a, b = load_file(tmp_path / "ext" / "delta.safetensors"), load_file(tmp_path / "ext2" / "delta.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_finished_full_fine_tune_replaces_its_exported_model(tiny, task, tmp_path):
    """model/ of a finished full fine-tune is the run's own: an extension exports the longer run in its place
    (whole, nothing left beside it); an export with deltas still attached is refused."""
    import merge
    import spiel
    from llama import PROJECTIONS, load_model
    out = tmp_path / "full"
    assert run(tiny, task, out, "--method", "full", "--max-steps", "3", "--stop-at-step", "3") == 0
    first = load_file(out / "model" / "model.safetensors")  # a stop at the last step finishes the run
    shutil.rmtree(out / "model")  # as if interrupted during the export: a resume exports again
    assert train.main(["--out", str(out), "--resume"]) == 0
    assert all(torch.equal(first[k], v) for k, v in load_file(out / "model" / "model.safetensors").items())
    assert train.main(["--out", str(out), "--resume", "--max-steps", "5"]) == 0
    second = load_file(out / "model" / "model.safetensors")
    assert max(steps(out)) == 5 and any(not torch.equal(first[k], second[k]) for k in first)
    assert not [n for n in os.listdir(out) if ".tmp" in n]  # nothing left beside it
    model = load_model(tiny.hf, dtype=torch.float32)
    spiel.add_sparse_deltas(model, PROJECTIONS, density=0.05)
    with pytest.raises(ValueError, match="still has sparse deltas"):
        merge.save_hf(model, None, str(tmp_path / "x"))


def test_flags_that_would_change_the_math_are_refused_on_resume(tiny, task, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert run(tiny, task, out, "--max-steps", "4", "--stop-at-step", "2") == 0
    one_line(["--out", out, "--resume", "--lr", "0.5"], "--lr cannot change when resuming", capsys)
    one_line(["--out", out, "--resume", "--method", "lora"], "--method cannot change", capsys)
    assert run_cli("--out", out, "--resume", "--save-every", "1", "--lr", "1e-2")[0] == 0  # allowed / unchanged


def test_interrupt_before_the_loop_leaves_a_folder_that_can_be_started_again(tiny, task, tmp_path, monkeypatch,
                                                                             capsys):
    """Ctrl-C while loading leaves nothing (the folder is made once the inputs passed their checks); Ctrl-C
    after that (here: evaluating the base) leaves args.json, and the same command starts the run over. Each
    Ctrl-C (a KeyboardInterrupt raised there) ends train.cli with exit code 130 and one line on stderr."""
    out = str(tmp_path / "r")
    argv = ["--ckpt", tiny.hf, "--data", task[0], "--device", "cpu", "--out", out, "--max-steps", "2",
            "--density", "0.1", "--batch-size", "4", "--grad-accum", "1", "--seq-len", "48"]

    def boom(*a, **k):
        raise KeyboardInterrupt

    for patched in ("load_model", "evaluate"):
        capsys.readouterr()
        with monkeypatch.context() as m, pytest.raises(SystemExit) as e:
            m.setattr(train, patched, boom)
            train.cli(argv)  # (a traceback would be an exception here, not SystemExit)
        err = capsys.readouterr().err
        assert e.value.code == 130 and len(err.strip().splitlines()) == 1, err
        if patched == "load_model":
            assert not os.path.exists(out)
    assert sorted(os.listdir(out)) == ["args.json", "log.jsonl"]
    one_line(["--out", out, "--resume"], "stopped before its first checkpoint")
    capsys.readouterr()
    assert train.main(argv) == 0  # the same command again: starts over in the same folder
    assert "starting it over" in capsys.readouterr().out


def test_ctrl_c_or_sigterm_in_the_loop_saves_and_the_run_resumes(tiny, task, tmp_path):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's polite stop) to a live train.py in its loop (one process each,
    side by side): it finishes the step, saves it, says so, exits 130 without a traceback, and the run resumes."""
    live = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        live[sig] = out, popen([sys.executable, "train.py", "--ckpt", tiny.hf, "--data", task[0], "--device", "cpu",
                                "--out", str(out), "--max-steps", "2000", "--density", "0.1", "--batch-size", "2",
                                "--grad-accum", "1", "--seq-len", "48", "--eval-every", "0", "--threads", "1"],
                               cwd=ROOT)
    for sig, (out, p) in live.items():  # a few steps logged
        wait_until(p, lambda: (out / "log.jsonl").exists() and len(steps(out)) >= 3, "step 3")
    for sig, (out, p) in live.items():
        p.send_signal(sig)
    for sig, (out, p) in live.items():
        stdout, stderr = communicate(p)
        assert p.returncode == 130 and "Traceback" not in stderr, (sig, stderr)
        saved = torch.load(out / "state.pt", weights_only=True)["step"]
        assert saved >= 3 and f"stopped after step {saved}" in stdout, (sig, stdout)
        assert train.main(["--out", str(out), "--resume", "--max-steps", str(saved + 2)]) == 0
        assert max(steps(out)) == saved + 2, sig


def test_damaged_or_missing_run_files_give_one_line(tiny, task, tmp_path):
    out = tmp_path / "r"
    assert run(tiny, task, out, "--max-steps", "4", "--stop-at-step", "2") == 0
    state = (out / "state.pt").read_bytes()
    (out / "state.pt").write_bytes(state[:len(state) // 2])
    one_line(["--out", str(out), "--resume"], "state.pt: damaged")
    whole = torch.load(io.BytesIO(state), weights_only=True)
    for key in ("selector", "rng"):  # a state.pt from another tool (or an older version) lacking a key
        torch.save({k: v for k, v in whole.items() if k != key}, out / "state.pt")
        one_line(["--out", str(out), "--resume"], f"state.pt: not a resume state of this train.py (no {key})")
    (out / "state.pt").write_bytes(state)
    args = (out / "args.json").read_text()
    (out / "args.json").write_text(args + "}")
    one_line(["--out", str(out), "--resume"], "args.json: not valid JSON")
    (out / "args.json").write_text(args)
    moved = tmp_path / "moved.jsonl"
    shutil.move(task[0], moved)
    try:
        one_line(["--out", str(out), "--resume"], "pass --data with its new place")
        other = tmp_path / "other.jsonl"
        other.write_text(moved.read_text().splitlines()[0] + "\n")
        one_line(["--out", str(out), "--resume", "--data", str(other)], "not the data this run")
        assert run_cli("--out", str(out), "--resume", "--data", str(moved))[0] == 0
    finally:
        shutil.move(moved, task[0])
    one_line(["--out", str(tmp_path / "nothing"), "--resume"], "args.json: not found")


def test_senseless_flags_give_one_line(tiny, task, capsys):
    """(and as a user sees it in a shell, exactly argparse's line: test_train.py's
    test_the_scripts_end_bad_input_with_one_line_in_a_shell)"""
    base = ["--ckpt", tiny.hf, "--data", task[0]]
    for flag, value in (("--lr", "-1"), ("--max-steps", "0"), ("--batch-size", "0"), ("--density", "2"),
                        ("--warmup", "-1"), ("--grad-accum", "0"), ("--seq-len", "x")):
        one_line([*base, flag, value], f"argument {flag}", capsys)


def test_the_default_budget_warns_when_it_is_most_of_a_small_model(tiny, task, tmp_path, capsys):
    assert train.main(["--ckpt", tiny.hf, "--data", task[0], "--device", "cpu", "--max-steps", "1", "--batch-size",
                       "2", "--grad-accum", "1", "--seq-len", "48", "--out", str(tmp_path / "r"), "--lora-rank", "4",
                       "--match-lora-rank", "24"]) == 0
    out = capsys.readouterr().out
    assert "warning: this budget trains" in out and "% as many parameters as the targeted weights hold" in out, out


def test_hints_point_at_the_fine_tuned_model_and_a_real_prompt(tiny, task, tmp_path, capsys):
    assert train.main(["--ckpt", tiny.hf, "--data", task[0], "--val-data", task[1], "--device", "cpu",
                       "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--seq-len", "48", "--method",
                       "full", "--out", str(tmp_path / "full")]) == 0
    out = capsys.readouterr().out
    first_prompt = json.loads(open(task[1]).readline())
    prompt = first_prompt.get("instruction", "") + "\n\n" + first_prompt["input"] if "instruction" in first_prompt \
        else first_prompt["messages"][0]["content"]
    assert f"generate.py --ckpt {tmp_path / 'full' / 'model'} " in out, out
    assert shlex.quote(prompt) in out


TRICKY = "copy \"the cat\" it's $HOME `ls` \\n back\\slash\n\nthe dog "  # newlines, quotes, $, backslashes


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "system", "content": "be brief\nsay 'no' to $PATH \\"},
                  {"role": "user", "content": TRICKY}, {"role": "assistant", "content": "the dog"}]},
    {"instruction": "double each letter", "input": "z g $i 'd' \\i", "output": "zz gg"}], ids=["chat", "alpaca"])
def test_the_sample_hint_pasted_into_bash_gives_generate_the_prompt_that_was_scored(tiny, task, tmp_path, record,
                                                                                    capsys, monkeypatch):
    """the hint at the end of a run, pasted into bash, makes generate.py start from exactly the prompt ids the
    run scored: the first validation example's prompt, with its system prompt (--system), shell-quoted."""
    import chat
    import data
    import generate
    from tokenizer import SentencePiece as Tokenizer
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps(record) + "\n")
    assert run(tiny, task, tmp_path / "r", "--max-steps", "1", "--val-data", str(val), "--seq-len", "128") == 0
    out = capsys.readouterr().out
    hint = out[out.index("sample with: ") + len("sample with: "):].removesuffix("\n")
    assert hint.startswith("python generate.py --ckpt ")
    p = subprocess.run(["bash", "-c", 'python() { printf "%s\\0" "$@"; }; ' + hint], capture_output=True, text=True)
    argv = p.stdout.split("\0")[:-1]  # what bash passes to python: the hint's arguments, unquoted
    assert p.returncode == 0 and argv[0] == "generate.py", (p.stderr, argv)
    seen = []  # the prompt ids generate.py starts from
    monkeypatch.setattr(generate, "generate", lambda model, ids, *a, **k: seen.append(ids) or [])
    generate.main(argv[1:])
    system, turns = data.to_turns(record)
    assert ("--system" in argv) == (system is not None)
    tok = Tokenizer(tiny.tokenizer)
    assert seen == [data.prompt_ids(tok, chat.Tulu(tok), turns[0][0], system)]


def test_a_refused_flag_names_the_value_the_run_used(tmp_path, capsys):
    """a run that took its method's default --lr / --weight-decay: a resume that changes them names the value
    it used, not None; passing that same value is no change."""
    import config
    for method, flag, value, named in (("lora", "--lr", "1e-3", "0.0001, the default for lora"),
                                       ("spiel-ag", "--lr", "1e-3", "1e-05, the default for spiel-ag"),
                                       ("spiel-ag", "--weight-decay", "1", "30, the default for spiel-ag at lr 1e-05"),
                                       ("spiel-ma", "--weight-decay", "1", "0, the default for spiel-ma")):
        out = tmp_path / method
        out.mkdir(exist_ok=True)
        stored = vars(config.get_parser().parse_args(["--ckpt", str(out), "--data", str(out), "--method", method]))
        (out / "args.json").write_text(json.dumps(stored))
        with pytest.raises(SystemExit):
            config.resolve_args(config.get_parser(), ["--out", str(out), "--resume", flag, value])
        assert f"{flag} cannot change when resuming (the run has {named}); " in capsys.readouterr().err
        same = {"--lr": named.split(",")[0], "--weight-decay": named.split(",")[0]}[flag]
        assert config.resolve_args(config.get_parser(), ["--out", str(out), "--resume", flag, same]).resume


def test_resuming_a_finished_run_says_so_before_loading_anything(tiny, task, trained, tmp_path, capsys, monkeypatch):
    """--resume on a finished run, or --resume --max-steps N below where it finished: the message, exit 0, and
    neither the data nor the model is loaded; the same for a run sized by --epochs once it has ended."""
    shutil.copytree(trained("spiel-ag"), tmp_path / "steps")  # a finished 8-step run
    assert run(tiny, task, tmp_path / "epochs", "--epochs", "0.1") == 0  # 16 examples, 8 per step: 2 steps
    capsys.readouterr()

    def boom(*a, **k):
        raise AssertionError("loaded")

    for name in ("load_base", "load_model"):
        monkeypatch.setattr(train, name, boom)
    monkeypatch.setattr(train.tokenizer, "load", boom)
    monkeypatch.setattr(train.data, "load_run", boom)
    for out, extra, step in (("steps", [], 8), ("steps", ["--max-steps", "2"], 8), ("epochs", [], 2)):
        assert train.main(["--out", str(tmp_path / out), "--resume", *extra]) == 0
        assert capsys.readouterr().out.strip().endswith(
            f"{tmp_path / out} already finished at step {step}; extend it with --resume --max-steps N (N > {step})")


def test_a_fine_tune_is_never_applied_twice_and_busy_outputs_are_refused_first(tiny, task, trained, tmp_path):
    import generate
    import merge
    delta = os.path.join(trained("spiel-ag"), "delta.safetensors")
    merged = str(tmp_path / "merged")
    merge.main(["--ckpt", tiny.hf, "--delta", delta, "--out", merged, "--dtype", "float32"])
    one_line_raise(CheckpointError, "already merged", generate.main,
                   ["--ckpt", merged, "--delta", delta, "--prompt", "x"])
    one_line_raise(CheckpointError, "already merged", merge.main,
                   ["--ckpt", merged, "--delta", delta, "--out", str(tmp_path / "m2")])
    # a delta trained on the merged model does not fit the original base
    assert run(tiny, task, tmp_path / "r2", "--max-steps", "2", "--ckpt", merged) == 0
    one_line_raise(CheckpointError, "trained on another base", generate.main,
                   ["--ckpt", tiny.hf, "--delta", str(tmp_path / "r2" / "delta.safetensors"), "--prompt", "x"])
    # merge.py checks --out before it loads anything (here the checkpoint does not even exist)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    one_line_raise(FileExistsError, "exists and is not empty", merge.main,
                   ["--ckpt", str(tmp_path / "nowhere"), "--delta", delta, "--out", str(busy)])
    assert (busy / "keep.txt").read_text() == "mine"


def test_one_checker_one_message_for_a_broken_checkpoint_folder(tmp_path):
    """train.py and generate.py say the same line (generate.py's __main__ prints `error: <message>`; the two
    scripts' stderr, compared in a shell: test_train.py's test_the_scripts_end_bad_input_with_one_line_in_a_shell)."""
    import generate
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    _, message = run_cli("--ckpt", str(tmp_path / "c"), "--data", str(data), "--out", str(tmp_path / "o"))
    with pytest.raises(CheckpointError) as e:
        generate.main(["--ckpt", str(tmp_path / "c"), "--prompt", "x"])
    assert "config.json found but no" in message and "\n" not in message, message
    assert message == f"error: {e.value}"
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# nothing lost: one writer per run folder, failed writes, file modes, no folder left by bad input

GATED = """import os, sys, time, train
lr = train.lr_at
def gated(step, *a):  # steps after {gate} wait until the test creates {release!r}
    while step > {gate} and not os.path.exists({release!r}):
        time.sleep(0.05)
    return lr(step, *a)
train.lr_at = gated
train.cli(sys.argv[1:])"""  # train.py held after a step, so that what the test does meanwhile is no race


def gated_run(argv, gate, release):
    return popen([sys.executable, "-c", GATED.format(gate=gate, release=str(release)), *argv], cwd=ROOT)


def wait_for_step(p, out, step):
    wait_until(p, lambda: os.path.exists(os.path.join(out, "log.jsonl")) and max(steps(out), default=0) >= step,
               f"step {step}")


def small_run_args(tiny, task, out, *extra):
    return ["--ckpt", tiny.hf, "--data", task[0], "--val-data", task[1], "--seq-len", "48", "--batch-size", "4",
            "--grad-accum", "1", "--device", "cpu", "--dtype", "float32", "--out", str(out), "--lr", "1e-2",
            "--density", "0.1", "--first-reselect", "2", "--reselect-every", "5", "--eval-every", "0",
            "--threads", "1", *extra]


def test_a_second_train_py_on_a_live_run_is_refused_and_the_first_is_untouched(tiny, task, tmp_path):
    live, alone = tmp_path / "live", tmp_path / "alone"
    argv = small_run_args(tiny, task, live, "--max-steps", "10", "--save-every", "5")
    p = gated_run(argv, 6, tmp_path / "go")
    try:
        wait_for_step(p, live, 6)  # (past its first checkpoint: --resume would otherwise start), held there
        for second in (argv, ["--out", str(live), "--resume"]):  # the same command again, and a resume
            code, message = run_cli(*second)
            assert code not in (0, None) and "\n" not in message, message
            assert f"{live}: in use by another train.py (pid {p.pid} on " in message, message
        assert p.poll() is None  # still running
    finally:
        (tmp_path / "go").touch()
        stdout, stderr = communicate(p)
    assert p.returncode == 0, stderr
    assert not (live / "lock").exists()  # released at the end
    assert train.main(small_run_args(tiny, task, alone, "--max-steps", "10", "--save-every", "5")) == 0
    a, b = load_file(live / "delta.safetensors"), load_file(alone / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if it had been alone


def test_a_lock_left_by_a_killed_run_does_not_block_resume(tiny, task, tmp_path):
    out = tmp_path / "r"
    p = gated_run(small_run_args(tiny, task, out, "--max-steps", "8", "--save-every", "2"), 3, tmp_path / "never")
    wait_for_step(p, out, 3)
    p.kill()  # SIGKILL: no handler runs, the lock file stays behind
    p.communicate()
    assert f"pid {p.pid} on " in (out / "lock").read_text()
    assert train.main(["--out", str(out), "--resume"]) == 0
    assert max(steps(out)) == 8 and not (out / "lock").exists()


def failing_on_call(real, n, path_arg=1, error=None):
    """real(...), except that call number n writes half a file and fails as a full disk does (`error`: in the
    writer's own words; by default an OSError)"""
    calls = []

    def fake(*a, **k):
        calls.append(1)
        if len(calls) != n:
            return real(*a, **k)
        with open(a[path_arg], "wb") as f:
            f.write(b"half a file")
        raise error or OSError(28, "No space left on device")
    return fake


@pytest.mark.parametrize("what", ["state.pt", "delta.safetensors"])
def test_a_save_that_fails_mid_write_keeps_the_last_checkpoint_resumable(tiny, task, trained, tmp_path, monkeypatch,
                                                                         what):
    """a full disk at the 2nd checkpoint (step 4), in the words torch.save and safetensors use for it: one line
    naming the file and what to do; the checkpoint of step 2 stays whole, and the resumed run ends where an
    uninterrupted one (the shared one) ends."""
    import safetensors
    import safetensors.torch
    out = tmp_path / "r"
    argv = train_argv(tiny, task, out, "--max-steps", "8", "--save-every", "2")
    if what == "state.pt":  # the 2nd checkpoint (step 4) fails; a full disk has no byte free
        torch_words = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 528576 vs 528516")
        monkeypatch.setattr(torch, "save", failing_on_call(torch.save, 2, error=torch_words))
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=0))
    else:
        words = safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(safetensors.torch, "save_file", failing_on_call(safetensors.torch.save_file, 2,
                                                                            error=words))
    code, message = run_cli(*argv)
    monkeypatch.undo()
    assert code == f"error: {out / what}: not written (No space left on device); the checkpoint of step 2 is " \
                   f"intact: free some space, then python train.py --out {out} --resume", message
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2  # the last good checkpoint
    assert not [n for n in os.listdir(out) if "tmp" in n] and not (out / "lock").exists()
    assert train.main(["--out", str(out), "--resume"]) == 0  # once there is space again
    a, b = load_file(out / "delta.safetensors"), load_file(os.path.join(trained("spiel-ag"), "delta.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_merge_that_fails_mid_write_leaves_nothing_that_looks_finished(tiny, trained, tmp_path, monkeypatch):
    import merge
    argv = ["--ckpt", tiny.hf, "--delta", os.path.join(trained("spiel-ag"), "delta.safetensors"), "--out",
            str(tmp_path / "m"), "--dtype", "float32"]
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", failing_on_call(safetensors.torch.save_file, 2))
    monkeypatch.setattr(merge, "MAX_SHARD_BYTES", 50_000)  # several shards: the 2nd one fails
    with pytest.raises(Exception, match=r"/m: not written \(No space left on device\); nothing was left there"):
        merge.main(argv)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # neither m nor a temporary folder
    merge.main(argv)  # and the same command works once there is space
    assert (tmp_path / "m" / "config.json").exists()


def test_written_files_honour_the_umask(tiny, task, tmp_path):
    import merge
    old = os.umask(0o027)
    try:
        assert run(tiny, task, tmp_path / "r", "--max-steps", "2") == 0
        assert run(tiny, task, tmp_path / "l", "--max-steps", "2", "--method", "lora") == 0
        merge.main(["--ckpt", tiny.hf, "--delta", str(tmp_path / "r" / "delta.safetensors"), "--out",
                    str(tmp_path / "m"), "--dtype", "float32"])
    finally:
        os.umask(old)
    files = [tmp_path / "r" / n for n in ("delta.safetensors", "state.pt", "args.json", "log.jsonl")]
    files += [tmp_path / "l" / "lora.safetensors"] + [tmp_path / "m" / n for n in os.listdir(tmp_path / "m")]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o640" for f in files}


def test_a_run_that_fails_its_input_checks_leaves_no_folder(tiny, task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    for data in ("typo.jsonl", str(bad)):  # a typo'd --data, a malformed line
        for out in ([], ["--out", "given"]):  # the default --out (runs/<method>-<time>) or a new one
            code, message = run_cli("--ckpt", tiny.hf, "--data", data, "--device", "cpu", *out)
            assert code not in (0, None) and "\n" not in message
    code, message = run_cli("--ckpt", tiny.hf, "--data", task[0], "--device", "cpu", "--density", "1e-9")
    assert code not in (0, None) and "budget" in message, message  # the model loaded, the budget is senseless
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_resume_says_plainly_when_max_steps_shortens_or_extends_the_run(tiny, task, tmp_path, capsys):
    out = tmp_path / "r"
    assert run(tiny, task, out, "--max-steps", "10", "--stop-at-step", "4") == 0
    capsys.readouterr()
    assert train.main(["--out", str(out), "--resume", "--max-steps", "6", "--stop-at-step", "5"]) == 0
    assert "resumed" in (line := capsys.readouterr().out) and "--max-steps shortens it from 10 steps" in line, line
    assert train.main(["--out", str(out), "--resume", "--max-steps", "8"]) == 0
    assert "--max-steps extends it from 6 steps" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# what a long run shows: progress while loading, an honest memory line, rates below one per second


@pytest.mark.slow  # (train.py in a subprocess, watched from outside: the slow tier)
def test_progress_lines_appear_in_piped_output_while_loading(tiny, task, tmp_path):
    """outside a terminal, loading reports plain lines (here every 0 s instead of 10, the model being tiny)."""
    code = "import sys, files, train\nfiles.PROGRESS_SECONDS = 0\ntrain.cli(sys.argv[1:])"
    p = run_watched([sys.executable, "-c", code, *small_run_args(tiny, task, tmp_path / "r", "--max-steps", "1")],
                    cwd=ROOT)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith(f"loading {tiny.hf}: ")]
    assert len(lines) >= 3 and lines[-1].split(": ")[1].startswith("0.0 of 0.0 GB (100%)"), p.stdout
    assert "\r" not in p.stdout  # no bar redraws in a log


@pytest.mark.slow  # (train.py in a subprocess, watched from outside: the slow tier)
def test_the_memory_line_leaves_out_the_page_cache_of_an_mmaped_checkpoint(tmp_path):
    """reading a 400 MB file through mmap (as loading a checkpoint does) raises the usual peak RSS by its size;
    PeakMemory, what train.py's closing line reports on the CPU, stays where the process's own memory is."""
    torch.save({"w": torch.ones(100_000_000)}, tmp_path / "ckpt.pth")
    code = f"""import torch, system
def hwm():  # the usual peak RSS of this process (ru_maxrss would also hold the parent's, from before exec)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
memory = system.PeakMemory()
before = hwm()
t = torch.load({str(tmp_path / "ckpt.pth")!r}, mmap=True, weights_only=True)["w"]
assert float(t.sum()) == 1e8  # every page read
print(before, hwm(), memory.report("cpu")["peak_gb"] * 1e9, memory.report("cpu")["what"])"""
    p = run_watched([sys.executable, "-c", code], cwd=ROOT)
    before, maxrss, peak = map(float, p.stdout.split()[:3])
    assert maxrss - before > 350e6, p.stdout  # the usual peak counts the mapped file
    assert peak < before + 100e6, p.stdout  # ours does not
    assert "page cache of the mmap'ed checkpoint not counted" in p.stdout


def test_rates_read_right_at_any_speed():
    from system import per_second
    assert per_second(123456, 10) == "12,346 tokens/s" and per_second(123, 10) == "12.3 tokens/s"
    assert per_second(64, 152) == "0.421 tokens/s" and per_second(1, 3600) == "0.000278 tokens/s"
