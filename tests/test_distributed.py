"""train.py under torchrun on the CPU (gloo, 2 processes started here): 2 processes x grad-accum 1 give the same
run as 1 process x grad-accum 2, with and without --fsdp, for every method; an interrupted 2-process run
resumes exactly; processes that disagree on the indices stop with a message; one failing process ends all; a
Ctrl-C to torchrun prints one line and a resume command that works.
Each torchrun call runs several configurations in the same 2 processes (train.main, one after another).
All of it is the slow tier: every test launches torchrun."""

import json
import os
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import communicate, popen, ranks_said, run_watched, wait_until
from test_train import ROOT

pytestmark = pytest.mark.slow  # torchrun launches

RUNNER = """
import json, os, sys
sys.path.insert(0, {root!r})
import spiel, system, train
{patch}
code = 0
for argv in json.load(open(sys.argv[1])):
    code = train.main(argv)
    if code:
        break
system.leave(code)  # as train.cli ends
"""
TOLERANCE = dict(rtol=1e-4, atol=1e-6)  # the same sums, added in another order


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def torchrun_command(tmp_path, configs, patch=""):
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    (tmp_path / "runner.py").write_text(RUNNER.format(root=ROOT, patch=patch))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(tmp_path / "runner.py"), str(tmp_path / "configs.json")]


def torchrun(tmp_path, configs, patch=""):
    return run_watched(torchrun_command(tmp_path, configs, patch), cwd=ROOT, env=ENV)


def args(tiny, task, out, method, accum, *extra):
    return ["--ckpt", tiny.hf, "--data", task[0], "--val-data", task[1], "--seq-len", "48", "--batch-size", "2",
            "--grad-accum", str(accum), "--device", "cpu", "--dtype", "float32", "--out", str(out), "--lr", "1e-2",
            "--warmup", "2", "--density", "0.1", "--first-reselect", "2", "--reselect-every", "5", "--eval-every", "0",
            "--save-every", "1000", "--max-steps", "12", "--method", method, "--lora-rank", "4", "--lora-dropout", "0",
            "--threads", "1", *extra]


def trained_tensors(out, method) -> dict:
    if method == "full":
        return torch.load(os.path.join(out, "state.pt"), weights_only=True)["trainable"]
    return load_file(os.path.join(out, "lora.safetensors" if method == "lora" else "delta.safetensors"))


def reselections(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [(r["step"], r["by_matrix"]) for r in map(json.loads, f) if r.get("event") == "reselect"]


METHODS = ["spiel-ag", "spiel-ma", "lora", "full"]


@pytest.fixture(scope="module")
def one_process(tiny, task, tmp_path_factory):
    """every method in one process with grad-accum 2: the reference runs."""
    root = tmp_path_factory.mktemp("one")
    for method in METHODS:
        assert train.main(args(tiny, task, root / method, method, 2)) == 0
    return root


def test_two_processes_equal_one_with_twice_the_accumulation(tiny, task, tmp_path, one_process):
    """for SpIEL-AG (through windows and reselections), SpIEL-MA, LoRA and full fine-tuning, without and with
    --fsdp: the same indices after every reselection and the same trained values within TOLERANCE."""
    configs = [args(tiny, task, tmp_path / f"{m}{'-fsdp' * fsdp}", m, 1, *(["--fsdp"] * fsdp))
               for fsdp in (False, True) for m in METHODS]
    p = torchrun(tmp_path, configs)
    assert p.returncode == 0, ranks_said(p)
    for m in METHODS:
        ref = trained_tensors(one_process / m, m)
        for name in (m, m + "-fsdp"):
            got = trained_tensors(tmp_path / name, m)
            assert got.keys() == ref.keys(), name
            for k in ref:
                if k.endswith(".indices"):
                    assert torch.equal(got[k], ref[k]), (name, k)
                else:
                    torch.testing.assert_close(got[k], ref[k], **TOLERANCE, msg=lambda s: f"{name} {k}: {s}")
            assert reselections(tmp_path / name) == reselections(one_process / m), name


def test_a_family_with_biases_and_tied_embeddings_under_fsdp_equals_one_process(tiny, task, family, tmp_path):
    """Qwen2.5's q/k/v biases and tied embedding, sharded by FSDP: 2 processes give the 1-process run."""
    qwen = ["--ckpt", family("qwen2.5"), "--seq-len", "160"]  # (its own chat template: longer prompts)
    for m in ("spiel-ag", "full"):
        assert train.main(args(tiny, task, tmp_path / f"{m}-1", m, 2) + qwen) == 0
    p = torchrun(tmp_path, [args(tiny, task, tmp_path / f"{m}-2", m, 1, "--fsdp") + qwen for m in ("spiel-ag", "full")])
    assert p.returncode == 0, ranks_said(p)
    for m in ("spiel-ag", "full"):
        ref, got = trained_tensors(tmp_path / f"{m}-1", m), trained_tensors(tmp_path / f"{m}-2", m)
        assert got.keys() == ref.keys() and any(k.endswith(".bias") for k in ref) == (m == "full")
        for k in ref:  # (a k bias's gradient is nearly 0: a shift of every key leaves the softmax as it is, only RoPE
            # makes it depend on the position; Adam's normalised step then magnifies the order of summation)
            tol = dict(rtol=1e-2, atol=1e-3) if k.endswith("wk.bias") else TOLERANCE
            torch.testing.assert_close(got[k], ref[k], **tol, msg=lambda s: f"{m} {k}: {s}")


def test_an_interrupted_two_process_run_resumes_exactly(tiny, task, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    p = torchrun(tmp_path, [args(tiny, task, whole, "spiel-ag", 1),
                            args(tiny, task, split, "spiel-ag", 1, "--stop-at-step", "6")])
    assert p.returncode == 0, ranks_said(p)
    state = torch.load(split / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["selector"]  # inside an open window
    # one process cannot continue a two-process run
    with pytest.raises(Exception, match=r"saved by 2 process\(es\), resumed by 1; resume with: torchrun --nproc_per_node 2"):
        train.main(["--out", str(split), "--resume"])
    p = torchrun(tmp_path, [["--out", str(split), "--resume"]])
    assert p.returncode == 0, ranks_said(p)
    a, b = trained_tensors(whole, "spiel-ag"), trained_tensors(split, "spiel-ag")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_processes_exit_cleanly(tmp_path):
    """after the last collective each process leaves at its own pace. Left to Python's teardown, the process
    group's gloo threads made a finished process die of SIGABRT (about 1 launch in 4 with 2 processes, 9 in 10
    with 4): system.leave, as train.cli ends, skips that teardown. 5 launches of 4 processes."""
    script = tmp_path / "finish.py"
    script.write_text(f"""import sys, time
sys.path.insert(0, {ROOT!r})
import torch, torch.distributed as dist, system
procs, _ = system.setup_distributed("cpu")
for i in range(50):  # one all-reduce a step, as system.Stop.agree
    flag = torch.tensor([float(i)])  # (still alive when Python tears down)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
time.sleep(0.05 * (procs.rank == 0))  # rank 0 leaves last, as when it saves the run's files
system.leave(0)
""")
    for _ in range(5):
        p = run_watched([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                         str(script)], env=ENV)
        assert p.returncode == 0, ranks_said(p)


def test_ctrl_c_in_one_process_stops_all_after_the_same_step(tiny, task, tmp_path):
    """a Ctrl-C that reaches only rank 1 (during step 4): both processes finish step 4, save it, exit 130,
    and the resumed run ends where an uninterrupted one does."""
    patch = """
import os, signal
import torch.distributed as dist
lr_at = train.lr_at
def interrupting(step, *a):
    if dist.get_rank() == 1 and step == 4:
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C to this process alone (its handler: system.Stop)
    return lr_at(step, *a)
train.lr_at = interrupting
"""
    split, whole = tmp_path / "split", tmp_path / "whole"
    p = torchrun(tmp_path, [args(tiny, task, split, "spiel-ag", 1)], patch=patch)
    assert p.returncode != 0 and "stopped after step 4" in p.stdout, ranks_said(p)
    assert torch.load(split / "state.pt", weights_only=True)["step"] == 4
    p = torchrun(tmp_path, [["--out", str(split), "--resume"], args(tiny, task, whole, "spiel-ag", 1)])
    assert p.returncode == 0, ranks_said(p)
    a, b = trained_tensors(whole, "spiel-ag"), trained_tensors(split, "spiel-ag")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_processes_that_disagree_on_the_indices_stop_with_a_message(tiny, task, tmp_path):
    patch = """
import torch.distributed as dist
grow = spiel.drop_and_grow
def skewed(layer, *a, **k):  # rank 1 moves one delta elsewhere: its indices no longer match rank 0's
    out = grow(layer, *a, **k)
    if dist.get_rank() == 1:
        layer.indices[0] = (layer.indices.max() + 1) % layer.weight_shape[0]
    return out
spiel.drop_and_grow = skewed
"""
    p = torchrun(tmp_path, [args(tiny, task, tmp_path / "r", "spiel-ma", 1)], patch=patch)
    assert p.returncode != 0
    assert "the ranks disagree on the sparse indices after reselection" in p.stderr


def test_one_failing_process_ends_them_all(tiny, task, tmp_path):
    patch = """
import data, torch.distributed as dist
step = data.Batches.next
def failing(self):  # rank 1 fails during its 3rd step while rank 0 goes on to its next collective
    if dist.get_rank() == 1 and self.index >= 10:
        raise ValueError("rank 1 failed on purpose")
    return step(self)
data.Batches.next = failing
"""
    p = torchrun(tmp_path, [args(tiny, task, tmp_path / "r", "lora", 1)], patch=patch)
    assert p.returncode != 0 and "rank 1 failed on purpose" in p.stderr


def test_a_stop_under_torchrun_prints_one_line_and_a_resume_command_that_works(tiny, task, tmp_path):
    """SIGINT to torchrun (Ctrl-C in its terminal): torchrun passes it on; rank 0 alone says so, both
    processes save the same step, and the command printed to continue works when pasted into a shell."""
    out = tmp_path / "r"
    held = """import time, system
stops, enter = [], system.Stop.__enter__
def entering(self):  # the run's Stop (its signal handlers), kept here so that step 4 can look at it
    stops.append(self)
    return enter(self)
system.Stop.__enter__ = entering
lr_at = train.lr_at
def held(step, *a):  # step 4 waits for the Ctrl-C (so the run cannot end before it arrives)
    while step > 3 and not stops[-1].requested:
        time.sleep(0.05)
    return lr_at(step, *a)
train.lr_at = held
"""
    command = torchrun_command(tmp_path, [args(tiny, task, out, "spiel-ag", 1, "--max-steps", "30")], patch=held)
    p = popen(command, cwd=ROOT, env=ENV)
    wait_until(p, lambda: (out / "log.jsonl").exists() and sum('"loss"' in line for line in open(out / "log.jsonl"))
               >= 3, "step 3")
    p.send_signal(signal.SIGINT)
    stdout, stderr = communicate(p)
    saved = torch.load(out / "state.pt", weights_only=True)["step"]
    assert saved == 4 and stderr.count("SIGINT: finishing this step") == 1, stderr[-3000:]
    hints = [line for line in stdout.splitlines() if "continue with: " in line]
    assert len(hints) == 1 and f"stopped after step {saved}; " in hints[0], stdout
    resume = hints[0].split("continue with: ")[1]
    assert resume.startswith("torchrun --nproc_per_node 2 train.py --out ") and resume.endswith(" --resume")
    p = run_watched(["bash", "-c", resume], cwd=ROOT, env=ENV)
    assert p.returncode == 0, ranks_said(p)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 30
