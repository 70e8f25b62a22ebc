"""tools/quality.py end to end on a tiny fixture: train.py runs, the plain-loop reference, scoring, choosing the lr
on dev, reusing finished runs, a longer run at the best lr found. Every run and score is a process of its own
(the slow tier). No number is asserted beyond its range."""

import json
import os
import random
import shutil

import pytest

import quality
from conftest import WORDS


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.mark.slow  # each run, plain-loop run and score is a process of its own
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
    monkeypatch.setattr(quality, "QUALITY", {m: (f, {"fixture": g["demo"][:2 if m == "spiel-ag" else 1]})
                                             for m, (f, g) in quality.QUALITY.items()})
    out = tmp_path / "q.json"
    argv = ["--fixtures", str(fx), "--quality-steps", "3", "--seeds", "0", "1", "--jobs", "2",
            "--quality-methods", *methods, "--runs-dir", str(tmp_path / "runs"), "--json", str(out)]
    assert quality.main(argv) == 0
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
    assert quality.main(argv) == 0
    assert os.path.getmtime(runs / "spiel-ag-lr0.001-seed0" / "score.json") == mtime
    # a longer run at each method's best lr of that study: one lr per method
    long = ["--fixtures", str(fx), "--quality-steps", "4", "--seeds", "0", "--jobs", "2",
            "--quality-methods", "spiel-ag", "--runs-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "l.json"),
            "--lr-from", str(out)]
    assert quality.main(long) == 0
    got = json.loads((tmp_path / "l.json").read_text())["results"][f"4/{fx}/spiel-ag"]
    assert list(got["grid"]) == [str(res[f"3/{fx}/spiel-ag"]["best_lr"])]
    with pytest.raises(SystemExit, match="no best lr for .*lora"):
        quality.main([*long, "--quality-methods", "lora"])
