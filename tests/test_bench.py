"""bench.py end to end on tiny shapes: the speed/memory workers for every method, and the quality mode through
train.py on the tiny checkpoint. No timing is asserted, only that every number is there and sane."""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import bench
import spiel
from conftest import WORDS
from llama import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speed_runs_every_method_at_the_matched_budget(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--shape", "tiny", "--steps", "1", "--warmup",
                        "1", "--cycle", "2", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "x LoRA" in p.stdout and "torch.set_num_threads(1)" in p.stdout
    res = json.loads(out.read_text())["methods"]
    assert set(res) == set(bench.METHODS)
    for m, r in res.items():
        assert "error" not in r, r
        assert r["median_s"] > 0 and all(t > 0 for t in r["step_times"]) and r["tokens_per_s"] > 0, m
        assert r["peak_memory_gb"] > 0 and r["threads"] == 1
    # the budget: LoRA rank 16 on all seven projections, SpIEL exactly as many deltas
    want = spiel.lora_param_count(Transformer(bench.SHAPES["tiny"]["model"]), bench.LORA_RANK)
    assert res["lora"]["trainable"] == res["spiel-ag"]["trainable"] == res["spiel-ma"]["trainable"] == want
    assert res["frozen"]["trainable"] == 0 and res["full"]["trainable"] == res["full"]["base_params"]
    # SpIEL was timed over one whole cycle: an AG window step and the reselection that closes it
    assert res["spiel-ag"]["phases"] == ["window", "reselect"] and res["spiel-ag"]["cycle_mean_s"] > 0
    assert res["spiel-ma"]["phases"] == ["plain", "reselect"]
    assert len(res["lora"]["step_times"]) == 1 and res["lora"]["ratio_to_lora"] == 1.0


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def test_quality_runs_every_method_through_train_py(tiny, tmp_path, capsys):
    rng = random.Random(0)
    rec = lambda: (lambda w: {"instruction": "copy", "input": w, "output": w})(  # noqa: E731
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))))
    train_data = write_jsonl(tmp_path / "train.jsonl", [rec() for _ in range(64)])
    val_data = write_jsonl(tmp_path / "val.jsonl", [rec() for _ in range(4)])
    out = tmp_path / "q.json"
    assert bench.main(["--quality", "--ckpt", tiny.hf, "--data", train_data, "--val-data", val_data, "--seeds", "0",
                       "--steps", "3", "--rank", "2", "--runs-dir", str(tmp_path / "runs"), "--json", str(out),
                       "--plot", str(tmp_path / "curves.png")]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "quality" and "--max-steps" in res["train_args"]
    methods = res["methods"]
    assert set(methods) == {"spiel-ag", "spiel-ma", "lora", "full"}
    for m, r in methods.items():
        run = r["runs"][0]
        assert "error" not in run, run
        assert math.isfinite(r["val_loss_mean"]) and r["val_loss_std"] == 0.0, m
        assert 0 <= r["exact_match_mean"] <= 1 and run["exact_match_before"] is not None
        assert [s for s, _ in run["val_curve"]] == [0, 3] and len(run["train_curve"]) == 3
        assert r["lr"] == bench.QUALITY_LR[m]
    # matched budget: LoRA rank 2, SpIEL exactly as many deltas
    k = methods["spiel-ag"]["trainable"]
    assert k == methods["spiel-ma"]["trainable"] == methods["lora"]["trainable"] > 0
    assert k < methods["full"]["trainable"]
    printed = capsys.readouterr().out
    assert "exact match" in printed and "±" in printed
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "curves.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in printed
