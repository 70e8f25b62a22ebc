"""plot.py on tiny hand-written runs and delta files: both figures are written, a resumed run's repeated
steps keep their last record, and bad input (or no matplotlib) gives one line and exit code 1."""

import json
import os
import sys

import pytest

pytest.importorskip("matplotlib")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import plot  # noqa: E402
from conftest import run_watched  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"wq": (8, 16), "wk": (4, 16), "wv": (4, 16), "wo": (16, 8),
          "w1": (300, 16), "w2": (16, 300), "w3": (300, 16)}  # w1..w3 bigger than 256: binned


def write_run(folder, records):
    os.makedirs(folder)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


def step(t, loss):
    return {"step": t, "loss": loss, "lr": 1e-3 * (1 - t / 10), "grad_norm": 1.0, "step_time": 0.1, "tokens_per_s": 99.0}


@pytest.fixture
def runs(tmp_path):
    """a SpIEL run interrupted after step 4 and resumed from its step-3 checkpoint, and a LoRA run."""
    spiel = [{"event": "eval", "step": 0, "val_loss": 3.0}, {"event": "exact_match", "step": 0, "exact_match": 0.0},
             step(1, 3.0), step(2, 2.5), {"event": "reselect", "step": 2, "changed": 50, "of": 100, "by_matrix": {}},
             step(3, 2.2), step(4, 9.9),  # interrupted here; the resume repeats step 4
             {"event": "some_future_event", "step": 4, "what": "ignored"},
             step(4, 2.0), {"event": "eval", "step": 4, "val_loss": 2.1, "sample": "abc", "new_key": 1},
             step(5, 1.8), {"event": "reselect", "step": 5, "changed": 10, "of": 100, "by_matrix": {}},
             {"event": "end", "seconds": 1.0, "tokens_per_s": 99.0, "peak_memory_gb": 0.1},
             {"event": "exact_match", "step": 5, "exact_match": 0.5}]
    lora = [step(1, 3.1), step(2, 2.9), {"event": "eval", "step": 2, "val_loss": 2.8}]
    return write_run(tmp_path / "spiel", spiel), write_run(tmp_path / "lora", lora)


def write_delta(path, fmt="spiel-delta", n_layers=2):
    g = torch.Generator().manual_seed(0)
    tensors, shapes = {}, {}
    for i in range(n_layers):
        for p, (o, n) in SHAPES.items():
            name = f"layers.{i}.{'attention' if p in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}.{p}"
            k = max(1, o * n // 20)
            tensors[name + ".indices"] = torch.randperm(o * n, generator=g)[:k].sort().values.int()
            tensors[name + ".values"] = torch.randn(k, generator=g)
            shapes[name] = [o, n]
    save_file(tensors, str(path), metadata={"format": fmt, "shapes": json.dumps(shapes)})
    return str(path)


def run_plot(*args):
    return run_watched([sys.executable, "plot.py", *args], cwd=ROOT)


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000


def test_read_log_keeps_last_record_per_step(runs):
    s = plot.read_log(os.path.join(runs[0], "log.jsonl"))
    assert s["loss"] == {1: 3.0, 2: 2.5, 3: 2.2, 4: 2.0, 5: 1.8}  # the resumed step 4 wins over 9.9
    assert s["val_loss"] == {0: 3.0, 4: 2.1}
    assert s["replaced"] == {2: 0.5, 5: 0.1}
    assert plot.read_log(os.path.join(runs[1], "log.jsonl"))["replaced"] == {}


def test_runs_figure(runs, tmp_path, capsys):
    out = tmp_path / "figs" / "runs.png"
    assert plot.main([*runs, "--labels", "spiel-ag", "lora", "--out", str(out)]) == 0
    assert_png(out)
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert plot.main([runs[1], "--out", str(tmp_path / "lora.png")]) == 0  # no reselections at all
    assert_png(tmp_path / "lora.png")


def test_mask_figure(tmp_path):
    path = write_delta(tmp_path / "delta.safetensors")
    assert plot.main(["--mask", path, "--out", str(tmp_path / "mask.png")]) == 0
    assert_png(tmp_path / "mask.png")
    assert plot.main(["--mask", path, "--matrix", "layers.1.feed_forward.w2", "--out", str(tmp_path / "w2.png")]) == 0
    assert_png(tmp_path / "w2.png")
    assert plot.main(["--mask", path, "--matrix", "layers.9.attention.wq", "--out", str(tmp_path / "x.png")]) == 1


def test_mask_figure_left_panel_varies_when_every_matrix_has_the_same_density(tmp_path):
    """the default budget split gives every matrix the same density (as write_delta does): the left panel shows
    each matrix's mean |delta|, which varies, not a flat colour."""
    path = write_delta(tmp_path / "delta.safetensors")
    shapes, counts, *_ = plot.read_delta(path)
    assert len({round(counts[n] / (o * i), 2) for n, (o, i) in shapes.items()}) == 1  # one density everywhere
    grid = np.asarray(plot.draw_mask(path, None, str(tmp_path / "mask.png")).axes[0].images[0].get_array())
    assert grid.shape == (2, 7) and np.isfinite(grid).all() and grid.std() > 0.01 * grid.mean()


def test_readme_installs_the_plotting_extra_before_its_test_command():
    """a user who follows the README runs plot.py's tests too (they skip without matplotlib)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert readme.index("requirements-plot.txt") < readme.index("python -m pytest")


def test_occupancy_bins():
    full = plot.occupancy(np.arange(300 * 20), (300, 20))  # rows binned 300 -> 256 (uneven bins)
    assert full.shape == (256, 20) and (full == 1).all()
    one = plot.occupancy(np.array([21 * 20 + 3]), (300, 20))  # row 21, column 3
    assert one.sum() > 0 and one[21 * 256 // 300, 3] == one.max()


def test_quality_figure(tmp_path):
    """bench.py --quality's JSON: learned and retained by method, a panel per fixture and length."""
    res = {f"{steps}/{fx}/{m}": {"best_lr": 1e-3, "test": [0.5, 0.1], "retained": [0.2, 0.05], "val_loss": [1, 0]}
           for steps in (300, 1000) for fx in ("/x/demo", "/x/transfer") for m in ("spiel-ag", "lora")}
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"mode": "quality", "results": res}))
    assert plot.main(["--quality", str(path), "--out", str(tmp_path / "q.png")]) == 0
    assert (tmp_path / "q.png").stat().st_size > 10_000
    path.write_text("{}")
    assert plot.main(["--quality", str(path), "--out", str(tmp_path / "q2.png")]) == 1


def test_modes_are_exclusive(runs, tmp_path):
    with pytest.raises(SystemExit):
        plot.main(["--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        plot.main([runs[0], "--mask", "delta.safetensors", "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("case", ["no log", "bad line", "not a delta"])
def test_bad_input_is_one_line(case, tmp_path):
    if case == "no log":
        os.makedirs(tmp_path / "empty")
        bad, args = tmp_path / "empty" / "log.jsonl", [str(tmp_path / "empty")]
    elif case == "bad line":
        folder = tmp_path / "run"
        write_run(folder, [step(1, 3.0)])
        with open(folder / "log.jsonl", "a") as f:
            f.write('{"step": 2, "loss": \n')
        bad, args = folder / "log.jsonl", [str(folder)]
    else:
        bad = write_delta(tmp_path / "model.safetensors", fmt="pt", n_layers=1)
        args = ["--mask", bad]
    p = run_plot(*args, "--out", str(tmp_path / "x.png"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], p.stderr
    assert not os.path.exists(tmp_path / "x.png")


def test_without_matplotlib(tmp_path):
    code = (f"import sys; sys.modules['matplotlib'] = None; import plot; "
            f"sys.exit(plot.main(['--mask', 'missing.safetensors', '--out', {str(tmp_path / 'x.png')!r}]))")
    p = run_watched([sys.executable, "-c", code], cwd=ROOT)
    assert p.returncode == 1
    assert p.stderr.strip() == "error: plot.py needs matplotlib: pip install -r requirements-plot.txt"
