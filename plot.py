"""
Pictures of a fine-tune: how runs trained, and where a SpIEL delta put its budget.

    python plot.py runs/ag runs/ma runs/lora --out runs.png       # curves from each run's log.jsonl
    python plot.py --mask runs/ag/delta.safetensors --out mask.png   # where the deltas sit
    python plot.py --quality quality.json --out quality.png        # tools/quality.py's study, by method

The run figure has four panels, every run on the same axes: training loss per step, validation loss,
learning rate, and the fraction of deltas replaced at each reselection (SpIEL section 3, drop and grow).
A resumed run repeats the steps after its last checkpoint; the last record of each step wins.
The mask figure shows how large the deltas are per layer and projection (the mean |delta|, with each
matrix's count of deltas), and where one matrix's active positions are (binned to at most 256 x 256).

matplotlib is optional, only this script needs it: pip install -r requirements-plot.txt
"""

import argparse
import importlib.util
import json
import os
import re
import sys

PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the columns of the mask, in model order


class PlotError(Exception):
    """a bad input file; main prints it as one line."""


# -----------------------------------------------------------------------------
# reading


def read_log(path: str) -> dict:
    """series name -> {step: value} from a train.py log.jsonl; unknown events and keys are ignored."""
    if not os.path.isfile(path):
        raise PlotError(f"{path}: not found")
    series = {"loss": {}, "lr": {}, "val_loss": {}, "replaced": {}}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise PlotError(f"{path}:{i}: not JSON ({e})") from None
            if not isinstance(r, dict) or "step" not in r:
                continue
            event, step = r.get("event"), r["step"]
            if event is None:  # a training step
                for key in ("loss", "lr"):
                    if key in r:
                        series[key][step] = r[key]  # a repeated step overwrites: the last one wins
            elif event == "eval" and "val_loss" in r:
                series["val_loss"][step] = r["val_loss"]
            elif event == "reselect" and r.get("of"):
                series["replaced"][step] = r["changed"] / r["of"]
    return series


def read_delta(path: str, matrix: str = None):
    """(shapes, deltas per matrix, mean |delta| per matrix, the chosen matrix's name and flat indices) of a
    spiel delta file."""
    from safetensors import safe_open

    try:
        f = safe_open(path, framework="numpy")  # memory-mapped: only the chosen matrix's indices are read
        meta = f.metadata() or {}
    except Exception as e:
        raise PlotError(f"{path}: cannot read safetensors ({e})") from None
    if meta.get("format") != "spiel-delta":
        raise PlotError(f"{path}: not a spiel delta file (metadata format is {meta.get('format')!r})")
    try:
        shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
        counts = {n: f.get_slice(n + ".indices").get_shape()[0] for n in shapes}
        size = {n: float(abs(f.get_tensor(n + ".values")).mean()) if counts[n] else 0.0 for n in shapes}
    except Exception as e:
        raise PlotError(f"{path}: bad spiel delta file ({e})") from None
    matrix = matrix or next(iter(shapes))
    if matrix not in shapes:
        raise PlotError(f"{path}: no matrix {matrix!r} (the first is {next(iter(shapes))!r})")
    return shapes, counts, size, matrix, f.get_tensor(matrix + ".indices").astype("int64")


def occupancy(indices, shape, bins: int = 256):
    """the fraction of each (row bin, column bin) cell that holds a delta, at most bins x bins."""
    import numpy as np

    (n_out, n_in), rb, cb = shape, min(shape[0], bins), min(shape[1], bins)
    r, c = indices // n_in * rb // n_out, indices % n_in * cb // n_in  # the bin of each delta
    hits = np.bincount(r * cb + c, minlength=rb * cb).reshape(rb, cb)  # (rb, cb)
    rows = np.bincount(np.arange(n_out) * rb // n_out, minlength=rb)  # rows per bin (not all equal)
    cols = np.bincount(np.arange(n_in) * cb // n_in, minlength=cb)
    return hits / np.outer(rows, cols)


# -----------------------------------------------------------------------------
# drawing (matplotlib's object API: no pyplot, no global state, no display needed)


def save(fig, out: str):
    """the figure as `out` (its format from the name), whole or not at all: written beside it, then renamed; a
    folder that cannot hold it, a full disk or an unknown format is one line."""
    tmp = os.path.join(os.path.dirname(out), ".tmp-" + os.path.basename(out))  # (the name keeps the format)
    kind = os.path.splitext(out)[1][1:].lower()
    if kind not in fig.canvas.get_supported_filetypes():
        raise PlotError(f"{out}: its extension names no format matplotlib writes; name a .png, .pdf or .svg file")
    folder = os.path.dirname(out) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise PlotError(f"{out}: cannot be created ({folder} is a file, not a folder); choose another --out")
    try:
        os.makedirs(folder, exist_ok=True)
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise PlotError(f"{out}: not written ({e.strerror or e}" + (f": {e.filename}" if e.filename else "") +
                        ")") from None


def draw_runs(logs: list, out: str):
    """four panels, one line (or markers) per run: logs is [(label, read_log(...)), ...]."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2).flat
    panels = [("loss", "training loss", "-"), ("val_loss", "validation loss", "o-"),
              ("lr", "learning rate", "-"), ("replaced", "fraction replaced at each reselection", "s-")]
    for ax, (key, title, style) in zip(axes, panels):
        for i, (label, series) in enumerate(logs):
            steps = sorted(series[key])
            if steps:
                ax.plot(steps, [series[key][s] for s in steps], style, color=f"C{i}", label=label, ms=4)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "no reselections" if key == "replaced" else "no data", ha="center",
                    va="center", transform=ax.transAxes, color="gray")
    axes[0].set_yscale("log")
    axes[0].legend()
    save(fig, out)


def draw_mask(path: str, matrix: str, out: str):
    """the mean |delta| per layer x projection (with each matrix's count of deltas), and the positions of one
    matrix's deltas. -> the figure"""
    import numpy as np
    from matplotlib.figure import Figure

    shapes, counts, size, matrix, indices = read_delta(path, matrix)
    cells = {}  # (layer, projection) -> name
    for name in shapes:
        m = re.fullmatch(r"layers\.(\d+)\.\w+\.(\w+)", name)
        if m and m[2] in PROJECTIONS:
            cells[int(m[1]), PROJECTIONS.index(m[2])] = name
    if not cells:
        raise PlotError(f"{path}: no matrices named layers.<i>.<module>.<projection>")
    n_layers = max(layer for layer, _ in cells) + 1
    grid = np.full((n_layers, len(PROJECTIONS)), np.nan)  # nan: a matrix without deltas
    for (layer, p), name in cells.items():
        grid[layer, p] = size[name]  # (the density is the same everywhere under the default budget split)

    fig = Figure(figsize=(12, max(4, 1.5 + 0.25 * n_layers)), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(1, 1.4))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)  # from 0: no change is dark
    total = sum(counts.values()) / sum(shapes[n][0] * shapes[n][1] for n in cells.values())
    ax.set(title=f"mean |delta| per matrix\n{sum(counts.values()):,} deltas, {total:.2%} of the weights",
           xlabel="projection" + (" (in each cell: its number of deltas)" if n_layers <= 12 else ""), ylabel="layer",
           xticks=range(len(PROJECTIONS)), xticklabels=PROJECTIONS, yticks=range(n_layers))
    if n_layers <= 12:  # small enough to read the counts in the cells
        for (layer, p), name in cells.items():
            dark = im.norm(grid[layer, p]) < 0.5  # white text on the dark end of the colour map
            ax.text(p, layer, f"{counts[name]:,}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
    fig.colorbar(im, ax=ax, label="mean |delta| of the matrix")

    n_out, n_in = shapes[matrix]
    im2 = ax2.imshow(occupancy(indices, (n_out, n_in)), aspect="auto", cmap="magma", interpolation="nearest",
                     extent=(0, n_in, n_out, 0))  # axes in real row / column numbers
    ax2.set(title=f"{matrix}: {indices.size:,} active of {n_out * n_in:,}", xlabel="input (column)",
            ylabel="output (row, Meta's RoPE order)")
    fig.colorbar(im2, ax=ax2, label="fraction of the cell active")
    save(fig, out)
    return fig


def draw_quality(path: str, out: str):
    """tools/quality.py's result: learned and retained exact match by method (mean and spread over seeds at
    each method's best lr), one panel per fixture and run length."""
    from matplotlib.figure import Figure

    try:
        results = json.load(open(path))["results"]
    except Exception as e:
        raise PlotError(f"{path}: not a tools/quality.py result ({e})") from None
    panels = sorted({key.rpartition("/")[0] for key in results}, key=lambda p: (p.split("/")[1], int(p.split("/")[0])))
    fig = Figure(figsize=(6 * len(panels) ** 0.5 + 4, 3.2 * len(panels)), layout="constrained")
    for ax, panel in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        methods = [key.rpartition("/")[2] for key in results if key.rpartition("/")[0] == panel]
        for j, (what, color) in enumerate((("test", "C0"), ("retained", "C1"))):
            mean = [100 * results[f"{panel}/{m}"][what][0] for m in methods]
            std = [100 * results[f"{panel}/{m}"][what][1] for m in methods]
            ax.bar([i + 0.4 * j for i in range(len(methods))], mean, 0.4, yerr=std, color=color, capsize=3,
                   label="learned (held-out)" if what == "test" else "retained (what the base knew)")
        steps, fixture = panel.split("/")[0], os.path.basename(panel.split("/", 1)[1].rstrip("/"))
        ax.set(title=f"{fixture}, {steps} steps", ylabel="exact match %", ylim=(0, 105),
               xticks=[i + 0.2 for i in range(len(methods))])
        ax.set_xticklabels(methods, rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # beside the bars
    save(fig, out)


# -----------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="run folders (train.py --out), each with a log.jsonl")
    ap.add_argument("--labels", nargs="+", help="legend names for the runs (default: the folder names)")
    ap.add_argument("--mask", help="a delta.safetensors: draw where its deltas are instead of the curves")
    ap.add_argument("--matrix", help="the matrix whose positions the mask figure shows (default: the first)")
    ap.add_argument("--quality", help="a tools/quality.py JSON: draw exact match by method instead")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.error = lambda message: ap.exit(2, f"plot.py: error: {message}\n")  # one line, as the other scripts
    args = ap.parse_args(argv)
    if bool(args.runs) + bool(args.mask) + bool(args.quality) != 1:
        ap.error("give one of: run folders (the curves), --mask (the mask picture), --quality (the study)")
    if args.labels and len(args.labels) != len(args.runs):
        ap.error(f"{len(args.labels)} labels for {len(args.runs)} runs")
    if importlib.util.find_spec("matplotlib") is None:  # checked before any work
        print("error: plot.py needs matplotlib: pip install -r requirements-plot.txt", file=sys.stderr)
        return 1

    try:
        if args.mask:
            draw_mask(args.mask, args.matrix, args.out)
        elif args.quality:
            draw_quality(args.quality, args.out)
        else:
            labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
            logs = [(label, read_log(os.path.join(r, "log.jsonl"))) for label, r in zip(labels, args.runs)]
            draw_runs(logs, args.out)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
