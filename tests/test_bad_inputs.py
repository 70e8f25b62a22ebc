"""Bad input as a new user gives it (the trial of issue 35): every script ends in one line naming the file or
flag and the problem, a non-zero exit, no traceback, nothing half-written. The eight gaps that trial found, each
with the user's own command (in this process, where the model must not even load), and the edges beside
them; one fast test runs the most important in a real shell, and the slow walk runs tools/bad_inputs.py's whole
list (every script) in a real shell against the fixtures' checkpoints."""

import dataclasses
import errno
import json
import os
import re
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import bad_inputs
import config
import convert
import data
import files
import finetune
import generate
import lora
import merge
import spiel
import train
from conftest import random_state_dict, run_watched, to_hf, write_hf
from files import CheckpointError
from llama import load_model, read_shapes
from test_train import ROOT, one_line, one_line_raise, other_base, run_cli  # noqa: F401 (a fixture)

DEMO_BASE = os.path.join(ROOT, "demo", "base")


def nothing_loads(monkeypatch):
    """the data, the tokenizer and the model must not be read in this test (a 7B base takes a minute)."""
    def boom(*a, **k):
        raise AssertionError("loaded")
    for module, name in ((train.data, "load_run"), (train, "load_base"), (train.tokenizer, "load"),
                         (merge, "load_model"), (generate, "load_model")):
        monkeypatch.setattr(module, name, boom)


def argparse_line(main, argv, capsys) -> str:
    """main(argv) stops in argparse (exit 2): its one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    return err


# -----------------------------------------------------------------------------
# the eight gaps


def test_an_output_that_cannot_be_written_is_refused_before_anything_loads(tiny, trained, tmp_path, monkeypatch):
    """1. `touch f; python train.py --max-steps 2 --out f/run`, and merge.py's and convert.py's outputs: a path
    under a regular file, or in a read-only place, is one line before the model (or the data) is read."""
    delta = os.path.join(trained("spiel-ag"), "delta.safetensors")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("")
    nothing_loads(monkeypatch)
    one_line(["--max-steps", "2", "--out", "f/run"], f"{tmp_path}/f/run: cannot be created ({tmp_path}/f is a file, "
                                                     f"not a folder); choose another --out")
    one_line_raise(CheckpointError, "f/m: cannot be created", merge.main,
                   ["--ckpt", tiny.hf, "--delta", delta, "--out", "f/m"])
    one_line_raise(CheckpointError, "f/s: cannot be created .* choose another output folder", convert.main,
                   [delta, "--to", "sft", "f/s", "--ckpt", tiny.hf])

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(files.tempfile, "mkdtemp", read_only)  # (root writes where the mode bits say no)
    one_line(["--max-steps", "2", "--out", "ro/run"], "ro/run: cannot be written (Read-only file system: ")
    one_line_raise(CheckpointError, r"ro/m: cannot be written \(Read-only file system", merge.main,
                   ["--ckpt", tiny.hf, "--out", "ro/m"])
    assert os.listdir(tmp_path) == ["f"]


def test_a_full_disk_in_torch_s_or_safetensors_words_is_one_line(tmp_path, monkeypatch):
    """2. torch.save says a full disk as "[enforce fail at inline_container.cc:672] . unexpected pos", safetensors
    as a SafetensorError: one line naming the file, the old file kept, no temporary file (a whole run that fails
    so at its 2nd checkpoint: test_runs.py's test_a_save_that_fails_mid_write_keeps_the_last_checkpoint_resumable;
    by hand on a 1.6 MB tmpfs, with --save-every 10, the same line)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    path = tmp_path / "state.pt"
    path.write_bytes(b"the last good one")

    def fails(error):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise error
        return write
    torch_words = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 528576 vs 528516")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=0))  # (as a full disk reads)
    with pytest.raises(CheckpointError, match=r"state.pt: not written \(No space left on device\)$"):
        files.write_whole(str(path), fails(torch_words))
    monkeypatch.undo()  # a short write with room left: torch's own words
    with pytest.raises(CheckpointError, match=r"state.pt: not written \(\[enforce fail .* unexpected pos"):
        files.write_whole(str(path), fails(torch_words))

    def second_shard_fails(tmp):
        save_file({"a": torch.zeros(2)}, os.path.join(tmp, "model-00001.safetensors"))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(CheckpointError, match=r"m: not written \(No space left on device\); nothing was left"):
        files.write_folder(str(tmp_path / "m"), second_shard_fails)
    assert sorted(os.listdir(tmp_path)) == ["state.pt"] and path.read_bytes() == b"the last good one"


def test_device_cuda_on_a_torch_without_cuda_is_refused_by_argparse(tiny, tmp_path, monkeypatch, capsys):
    """3. `python train.py --device cuda` (and generate.py's, and a resume of a run made on a GPU) on a torch that
    cannot reach CUDA: argparse's one line, not an AssertionError from the load."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = argparse_line(train.main, ["--max-steps", "2", "--device", "cuda"], capsys)
    assert re.fullmatch(r"train.py: error: argument --device: cuda: (this torch is a CPU build|no CUDA GPU is "
                        r"visible); use --device cpu", err), err
    err = argparse_line(generate.main, ["--ckpt", tiny.hf, "--prompt", "x", "--device", "cuda"], capsys)
    assert err.startswith("generate.py: error: argument --device: cuda: "), err
    stored = vars(config.get_parser().parse_args(["--ckpt", tiny.hf, "--data", tiny.hf])) | {"device": "cuda"}
    (tmp_path / "args.json").write_text(json.dumps(stored))
    err = argparse_line(train.main, ["--out", str(tmp_path), "--resume"], capsys)
    assert f"argument --device (the run's, in {tmp_path}/args.json): cuda: " in err, err


@pytest.mark.parametrize("argv", [["--method", "lora", "--lora-rank", "8"],
                                  ["--targets", "attention", "--match-lora-rank", "2"]], ids=["lora-rank", "match"])
def test_the_demo_takes_the_users_budget_and_echoes_each_flag_once(argv, capsys):
    """4, 5. `python train.py --method lora --lora-rank 8` trains rank 8 (not the rank the demo's --density gives),
    `python train.py --targets attention --match-lora-rank 2` runs; args.json records one budget; the demo's line
    names each flag once, with the user's value; a LoRA run prints its rank."""
    args, mode = config.resolve(argv)
    assert mode == "demo" and args.density is None
    line = config.describe(args, mode, argv)
    flags = [t for t in shlex.split(line) if t.startswith("--")]
    assert len(flags) == len(set(flags)) and "--density" not in flags and line.endswith(shlex.join(argv)), line
    model = load_model(DEMO_BASE, dtype=torch.float32)
    want = spiel.lora_param_count(model, ["wq", "wk", "wv", "wo"], 2)  # (--match-lora-rank 2 on attention)
    params, optimizer, selector = train.add_trainable(model, args)
    if args.method == "lora":
        assert {m.rank for m in lora.lora_layers(model).values()} == {8}
        train.say_budget(args, model, params, optimizer, selector, 1, print)
        assert "LoRA: rank 8, alpha 16 (scaling 2), on 28 matrices" in capsys.readouterr().out
    else:
        assert sum(m.indices.numel() for m in spiel.delta_layers(model).values()) == want


def test_a_finished_run_without_state_pt_gets_advice_that_leads_somewhere(trained, tmp_path, monkeypatch):
    """6. a finished run whose state.pt was deleted: --resume says what is left and what to do (not "without
    --resume", which the folder in use refuses), before anything loads."""
    out = tmp_path / "r"
    shutil.copytree(trained("spiel-ag"), out)
    os.remove(out / "state.pt")
    nothing_loads(monkeypatch)
    code, message = run_cli("--out", str(out), "--resume")
    assert code == f"error: {out}/state.pt: not found (deleted?), so this run cannot continue; what it made " \
                   f"(delta.safetensors) is usable as it is; to train further, start a new run with another --out"
    assert sorted(os.listdir(out)) == ["args.json", "delta.safetensors", "log.jsonl"]


def test_data_that_is_no_list_of_records_says_so(tiny, tmp_path, monkeypatch):
    """7. --data naming one JSON object (valid JSON, neither lines nor an array), a binary file; a bad record of a
    .json array is "record N", not a line number."""
    monkeypatch.setattr(train, "load_base", lambda *a: pytest.fail("loaded"))
    for name, text, needle in (
            ("object.json", '{\n  "instruction": "a",\n  "output": "b"\n}\n', "object.json: one JSON object, not a "
             "list of records: give one object per line (.jsonl) or a JSON array of objects (.json)"),
            ("array.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a"}]\n',
             "array.json:record 2: Alpaca records need"),
            ("binary.jsonl", b"\x80PK\x03\x04", "binary.jsonl: not UTF-8 text (invalid start byte at byte 0)")):
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        one_line(["--ckpt", tiny.hf, "--data", str(path), "--out", str(tmp_path / "o")], needle)
    one = tmp_path / "one.json"  # (one object on one line is one record)
    one.write_text('{"instruction": "a", "output": "b"}\n')
    assert [r for _, r in data.read_records(str(one))] == [{"instruction": "a", "output": "b"}]


def test_convert_refuses_a_fine_tune_of_another_base_without_loading_it(tiny, trained, other_base, tmp_path):
    """8. `convert.py --to sft` (and --to peft) with the --ckpt of another base of the same shapes: refused as
    generate.py and merge.py refuse it, from the few weights the fingerprint needs (convert.py loads no model)."""
    for run, to in (("spiel-ag", "sft"), ("lora", "peft")):
        src = os.path.join(trained(run), "lora.safetensors" if run == "lora" else "delta.safetensors")
        one_line_raise(CheckpointError, f"{src}: this fine-tune was trained on another base model", convert.main,
                       [src, "--to", to, str(tmp_path / to), "--ckpt", other_base])
        convert.main([src, "--to", to, str(tmp_path / to), "--ckpt", tiny.hf])  # its own base: written
    assert sorted(os.listdir(tmp_path)) == ["peft", "sft"]


def test_a_base_s_fingerprint_read_without_loading_it_is_the_loaded_one_s(tiny, tmp_path):
    """finetune.fingerprint_at (norms and 64 embedding rows, read from the files) equals fingerprint(the loaded
    model) in every layout: Meta in 1 and 2 shards, HF safetensors, HF pytorch_model.bin, a bf16 copy."""
    (tmp_path / "bin").mkdir()
    shutil.copy(os.path.join(tiny.hf, "config.json"), tmp_path / "bin")
    torch.save(to_hf(tiny.sd, tiny.args), tmp_path / "bin" / "pytorch_model.bin")
    bf16 = write_hf({k: t.bfloat16() for k, t in tiny.sd.items()}, tiny.args, str(tmp_path / "bf16"), n_shards=1)
    want = finetune.fingerprint(load_model(tiny.hf, dtype=torch.float32))
    for ckpt in (tiny.meta1, tiny.meta2, tiny.hf, str(tmp_path / "bin"), bf16):
        assert finetune.fingerprint_at(ckpt, read_shapes(ckpt)) == want, ckpt
    args1 = dataclasses.replace(tiny.args, n_layers=1)  # and another base's differs
    one = write_hf(random_state_dict(args1, seed=3), args1, str(tmp_path / "one"))
    assert finetune.fingerprint_at(one, args1) == finetune.fingerprint(load_model(one)) != want


# -----------------------------------------------------------------------------
# beside them


def test_senseless_values_are_refused_by_argparse_naming_the_flag(tiny, task, capsys):
    """generate.py's --temperature -1, --top-p 0, --max-new-tokens 0; train.py's two budgets, a reselection
    interval not above the first reselection, --fsdp outside torchrun."""
    for flag, value, says in (("--temperature", "-1", "-1 is not >= 0"), ("--top-p", "0", "0 is not in (0, 1]"),
                              ("--max-new-tokens", "0", "0 is not an integer >= 1")):
        err = argparse_line(generate.main, ["--ckpt", tiny.hf, "--prompt", "x", flag, value], capsys)
        assert err == f"generate.py: error: argument {flag}: {says}", err
    run = ["--ckpt", tiny.hf, "--data", task[0]]
    for extra, says in ((["--density", "0.1", "--num-tunable", "9"], "--density and --num-tunable are two budgets"),
                        (["--reselect-every", "5"], "--reselect-every 5 must be above --first-reselect 5 (or 0"),
                        (["--fsdp"], "--fsdp shards the base across torchrun's processes")):
        assert says in argparse_line(train.main, [*run, *extra], capsys)


def test_budget_errors_name_the_flag(tiny, task, tmp_path):
    base = ["--ckpt", tiny.hf, "--data", task[0], "--seq-len", "48", "--out", str(tmp_path / "o")]
    one_line([*base, "--num-tunable", "3"], "--num-tunable 3: a budget of 3 deltas cannot give each of 14 matrices")
    one_line([*base, "--density", "1e-09"], "--density 1e-09: a budget of 0 deltas does not fit ")
    one_line([*base, "--method", "lora", "--num-tunable", "9"], "--num-tunable 9: a budget of 9 is below LoRA rank 1")
    assert not os.path.exists(tmp_path / "o")


def test_every_flag_of_generate_py_has_help(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    options = capsys.readouterr().out.partition("options:")[2]
    entries = re.split(r"\n  (?=-)", options)[1:]  # one per flag: its names (and metavar), then its help
    bare = [e.split()[0] for e in entries if len(e.split()) <= 2]
    assert len(entries) >= 12 and not bare, bare


def test_a_resume_on_other_threads_says_it_is_not_bit_for_bit(trained):
    """--resume --threads 2 on a run made with the default threads is allowed, and says so in one line."""
    out = trained("spiel-ag")
    for argv, note in ((["--threads", "2"], "note: --threads 2 (the run used torch's default): the run continues "
                                            "correctly, but not bit for bit"),
                       (["--max-steps", "9"], "")):
        args, mode = config.resolve(["--out", out, "--resume", *argv])
        assert mode == "resume" and config.describe(args, mode, argv) == note


# -----------------------------------------------------------------------------
# in a real shell: the most important ones here, every script's whole list in the slow tier


def good_inputs(tiny, task, trained, other_base, folder) -> dict:
    """tools/bad_inputs.py's good inputs, from the fixtures (a 1-layer base of its own for "other shapes")."""
    args1 = dataclasses.replace(tiny.args, n_layers=1)
    small = write_hf(random_state_dict(args1), args1, str(folder / "small"), tokenizer=tiny.tokenizer)
    return {"base": tiny.hf, "other": other_base, "small": small, "data": task[0], "run": trained("spiel-ag"),
            "lora_run": trained("lora")}


FAST = ("--out under a regular file (the demo)", "--to sft with the --ckpt of another base (same shapes)")


@pytest.mark.slow  # (scripts in a shell, or a tool's own run: the slow tier)
def test_the_users_commands_end_in_one_line_in_a_shell(tiny, task, trained, other_base, tmp_path):
    """`touch f; python train.py --max-steps 2 --out f/run`, and convert.py with another base: as a shell runs
    them (side by side), one line, no traceback, a non-zero exit, nothing left behind."""
    paths = good_inputs(tiny, task, trained, other_base, tmp_path)
    cases = [c for c in bad_inputs.CASES if c.input in FAST]
    assert len(cases) == len(FAST)
    with ThreadPoolExecutor(len(cases)) as pool:
        done = list(pool.map(lambda ic: bad_inputs.run_case(ic[1], paths, str(tmp_path / str(ic[0])), run_watched),
                             enumerate(cases)))
    assert [wrong for _, wrong in done] == [[]] * len(cases), [(p.args, p.stderr) for p, _ in done]


@pytest.mark.slow
def test_every_script_walks_its_bad_inputs_in_a_shell(tiny, task, trained, other_base, tmp_path):
    """tools/bad_inputs.py's whole list (the table in docs/runs.md), against the fixtures' checkpoints."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    paths = bad_inputs.bad_inputs(good_inputs(tiny, task, trained, other_base, inputs), str(inputs))
    results = bad_inputs.walk(paths, str(tmp_path / "cases"), jobs=2, run=run_watched)
    assert len(results) >= 37
    wrong = [(case.input, shlex.join(case.argv), p and p.stderr[-500:], w) for case, p, w in results if w]
    assert not wrong, wrong
