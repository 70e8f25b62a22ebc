"""bench.py end to end on tiny shapes: the speed/memory workers for every method, and the quality study (train.py
runs, the plain-loop reference, scoring, choosing the lr on dev) on a tiny fixture. No timing is asserted,
only that every number is there and sane."""

import json
import os
import random
import shutil
import sys

import pytest

import bench
import spiel
from conftest import WORDS, run_watched
from llama import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speed_runs_every_method_at_the_matched_budget(tmp_path):
    out = tmp_path / "bench.json"
    bench_py = [sys.executable, os.path.join(ROOT, "bench.py"), "--shape", "tiny", "--threads", "1", "--json", str(out),
                "--runs-dir", str(tmp_path / "runs")]
    p = run_watched([*bench_py, "--rounds", "1", "--wait-policies", "passive"], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| method | passive: step s (x PEFT LoRA dropout 0) |" in p.stdout
    res = json.loads(out.read_text())["best"]["passive"]
    assert all(r["omp_wait_policy"] == "PASSIVE" for r in res.values())
    assert set(res) == set(bench.METHODS)
    for m, r in res.items():
        assert "error" not in r, r
        assert r["step_s"] > 0 and all(t > 0 for t in r["step_times"]) and r["tokens_per_s"] > 0, m
        assert r["peak_memory_gb"] > 0 and r["threads"] == 1
        # every method timed over the same steps: one reselection cycle after the warm-up
        assert len(r["step_times"]) == 20 and r["step_s"] == sum(r["step_times"]) / 20, m
    # the budget: LoRA rank 16 on all seven projections, SpIEL exactly as many deltas
    want = spiel.lora_param_count(Transformer(bench.SHAPES["tiny"]["model"]), bench.RANK)
    assert res["lora"]["trainable"] == res["spiel-ag"]["trainable"] == res["spiel-ma"]["trainable"] == want
    assert res["lora-nodrop"]["trainable"] == want and res["frozen"]["trainable"] == 0
    # SpIEL's cycle: plain steps, the AG window and the reselection
    assert res["spiel-ag"]["phases"].count("reselect") == 1 and "window" in res["spiel-ag"]["phases"]
    assert res["spiel-ma"]["phases"].count("reselect") == 1 and "window" not in res["spiel-ma"]["phases"]
    # both wait policies, set alike for every method (the variable removed for libgomp's default), the fastest
    # of the rounds kept
    p = run_watched([*bench_py, "--rounds", "2", "--methods", "frozen", "lora"], cwd=tmp_path,
                    env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert p.returncode == 0, p.stdout + p.stderr
    got = json.loads(out.read_text())
    for policy, want in (("spinning", "(libgomp's default)"), ("passive", "PASSIVE")):
        for r in got["best"][policy].values():
            assert r["omp_wait_policy"] == want and len(r["round_means"]) == 2 and len(r["step_times"]) == 40
            assert r["step_s"] == min(r["round_means"])


def test_the_worker_interleaves_the_methods_steps(monkeypatch, tmp_path):
    """one process, step t of every method before step t + 1 of any: a slow spell falls on all of them."""
    order = []
    real = bench.our_model

    def spy(margs, method, device, seed):
        loss_fn, model, params, optimizer, selector = real(margs, method, device, seed)
        return (lambda x, y: order.append(method) or loss_fn(x, y)), model, params, optimizer, selector
    monkeypatch.setattr(bench, "our_model", spy)
    out = tmp_path / "w.json"
    assert bench.main(["--worker", "frozen,spiel-ma", "--json-out", str(out), "--shape", "tiny", "--rounds", "1",
                       "--threads", "1"]) == 0
    assert len(order) == 2 * 25 and all({order[i], order[i + 1]} == {"frozen", "spiel-ma"} for i in range(0, 50, 2))
    res = json.loads(out.read_text())
    assert set(res) == {"frozen", "spiel-ma"} and all("peak_memory_gb" not in r for r in res.values())


def test_profile_prints_each_methods_ops_per_step(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert bench.main(["--shape", "tiny", "--threads", "1", "--profile", "spiel-ma", "lora-nodrop", "--profile-rows",
                       "5", "--json", str(out), "--runs-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| op | spiel-ma | lora-nodrop |" in printed and "| total self CPU |" in printed
    res = json.loads(out.read_text())
    ma, lora = res["ms_per_step"]["spiel-ma"], res["ms_per_step"]["lora-nodrop"]
    # SpIEL-MA's own parts show up in its column only: the sparse-delta layer and SM3
    assert ma["SparseDeltaFn"] > 0 and ma["Optimizer.step#SM3.step"] > 0 and "SparseDeltaFn" not in lora
    assert lora["Optimizer.step#AdamW.step"] > 0 and all(v > 0 for v in res["wall_s"].values())


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_quality_study_on_a_tiny_fixture(tiny, tmp_path, capsys, monkeypatch):
    fx = tmp_path / "fixture"
    shutil.copytree(tiny.hf, fx / "base")
    rng = random.Random(0)
    rec = lambda task: (lambda w: {"instruction": f"{task} {w}", "output": w})(  # noqa: E731
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))))
    write_jsonl(fx / "train.jsonl", [rec("copy") for _ in range(64)])
    write_jsonl(fx / "val.jsonl", [rec("copy") for _ in range(4)])
    write_jsonl(fx / "retain.jsonl", [rec("sort") for _ in range(2)])
    methods = ["spiel-ag", "plain-lora", "plain-full"]  # (each a subprocess per run: a few, to stay quick)
    monkeypatch.setattr(bench, "QUALITY", {m: (f, {"fixture": g["demo"][:2 if m == "spiel-ag" else 1]})
                                           for m, (f, g) in bench.QUALITY.items()})
    out = tmp_path / "q.json"
    argv = ["--quality", "--fixtures", str(fx), "--quality-steps", "3", "--seeds", "0", "1", "--jobs", "2",
            "--quality-methods", *methods, "--runs-dir", str(tmp_path / "runs"), "--json", str(out)]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())["results"]
    assert set(res) == {f"3/{fx}/{m}" for m in methods}
    for key, r in res.items():
        assert r["best_lr"] in [float(lr) for lr in r["grid"]], key
        assert len(r["grid"]) == (2 if key.endswith("spiel-ag") else 1), key
        for runs in r["grid"].values():
            assert len(runs) == 2 and all("error" not in x for x in runs), runs
            assert all(0 <= x["dev"] <= 1 and 0 <= x["test"] <= 1 and 0 <= x["retained"] <= 1 for x in runs)
    # every run left what plot.py and merge.py read: a log, and its delta / adapter / model
    runs = tmp_path / "runs" / "fixture-3"
    assert (runs / "plain-full-lr0.0001-seed0" / "model" / "config.json").exists()
    assert (runs / "plain-lora-lr0.001-seed1" / "lora.safetensors").exists()
    assert (runs / "spiel-ag-lr0.001-seed0" / "delta.safetensors").exists()
    assert all((runs / d / "log.jsonl").exists() for d in os.listdir(runs))
    printed = capsys.readouterr().out
    assert "| steps | fixture | method | best lr |" in printed and "±" in printed
    # a second call reuses the finished runs (their score.json) instead of training again
    mtime = os.path.getmtime(runs / "spiel-ag-lr0.001-seed0" / "score.json")
    assert bench.main(argv) == 0
    assert os.path.getmtime(runs / "spiel-ag-lr0.001-seed0" / "score.json") == mtime
    # a longer run at each method's best lr of that study: one lr per method
    long = ["--quality", "--fixtures", str(fx), "--quality-steps", "4", "--seeds", "0", "--jobs", "2",
            "--quality-methods", "spiel-ag", "--runs-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "l.json"),
            "--lr-from", str(out)]
    assert bench.main(long) == 0
    got = json.loads((tmp_path / "l.json").read_text())["results"][f"4/{fx}/spiel-ag"]
    assert list(got["grid"]) == [str(res[f"3/{fx}/spiel-ag"]["best_lr"])]
    with pytest.raises(SystemExit, match="no best lr for .*lora"):
        bench.main([*long, "--quality-methods", "lora"])
