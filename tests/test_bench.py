"""tools/bench.py end to end on tiny shapes: the speed/memory workers for every method (the tool's own processes: the
slow tier), their interleaved steps and the profile (in this process). No timing is asserted, only that every
number is there and sane. (The quality study, tools/quality.py: test_quality.py.)"""

import json
import os
import sys

import pytest

import bench
import spiel
from conftest import run_watched
from llama import PROJECTIONS, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # python tools/bench.py: a worker process per wait policy and one per method for its memory
def test_speed_runs_every_method_at_the_matched_budget(tmp_path):
    out = tmp_path / "bench.json"
    bench_py = [sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--shape", "tiny", "--threads", "1",
                "--json", str(out), "--runs-dir", str(tmp_path / "runs")]
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
    want = spiel.lora_param_count(Transformer(bench.SHAPES["tiny"]["model"]), PROJECTIONS, bench.RANK)
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


@pytest.fixture
def short_schedule(monkeypatch):
    """train.py's schedule shortened to a warm-up (first reselection) of 2 steps and a cycle of 3."""
    import config
    real = config.get_parser

    def shorter(*a, **k):  # the defaults bench.py reads the schedule from (and builds SpIEL's Selector with)
        parser = real(*a, **k)
        parser.set_defaults(first_reselect=2, reselect_every=3)
        return parser
    monkeypatch.setattr(config, "get_parser", shorter)


@pytest.mark.slow  # (scripts in a shell, or a tool's own run: the slow tier)
def test_profile_prints_each_methods_ops_per_step(tmp_path, capsys, short_schedule):
    """--profile: one reselection cycle of each method under torch.profiler, their own CPU time per op. (Here the
    cycle is shortened, reselection included: parsing the profiler's events costs about 0.25 s a step, 10 s for the
    default 20-step cycle of two methods.)"""
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


def test_real_data_packed_and_unpacked_take_the_same_steps(tmp_path, capsys, short_schedule):
    """--real-data: the trial's length distribution; SpIEL-AG packed and --no-packing over the same steps (a warm-up
    through the first reselection, then 2 rounds of the same step): the same examples, the same losses to float
    rounding, far less padding packed. (No timing asserted; the tiny shape.)"""
    out = tmp_path / "r.json"
    assert bench.main(["--real-data", "--shape", "tiny", "--threads", "1", "--steps", "1", "--rounds", "2",
                       "--json", str(out), "--runs-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| spiel-ag packed |" in printed and "| spiel-ag --no-packing |" in printed and "goals:" in printed
    res = json.loads(out.read_text())
    assert res["examples"] == 400 and res["batch"] == 8 and res["grad_accum"] == 4 and res["seq_len"] == 1024
    lengths = res["lengths"]
    assert abs(lengths["median"] - 53) <= 2 and abs(lengths["p95"] - 174) <= 5 and abs(lengths["p99"] - 989) <= 20
    assert list(res["methods"]) == ["spiel-ag"] and res["trl"] is None
    r = res["methods"]["spiel-ag"]
    packed, unpacked = r["packed"], r["unpacked"]
    assert len(packed["steps"]) == len(unpacked["steps"]) == 2 + 2
    assert [s["tokens"] for s in packed["steps"]] == [s["tokens"] for s in unpacked["steps"]]
    assert packed["steps"][2]["tokens"] == packed["steps"][3]["tokens"]  # every round replays the same step
    assert r["max_rel_loss_diff"] < 1e-4
    assert all(abs(p["loss"] - u["loss"]) <= r["max_rel_loss_diff"] * u["loss"] + 1e-12
               for p, u in zip(packed["steps"], unpacked["steps"]))
    assert packed["padding"] < 0.5 * unpacked["padding"] and unpacked["padding"] > 0.5
    assert len(packed["round_tokens_per_s"]) == 2 and packed["tokens_per_s"] == max(packed["round_tokens_per_s"]) > 0
    assert r["speedup"] == packed["tokens_per_s"] / unpacked["tokens_per_s"] and set(r["goals"]) == {
        "padding_at_most_5pct", "speed_at_least_2x"}
