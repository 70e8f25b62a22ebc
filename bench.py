"""
SpIEL side by side with LoRA and full fine-tuning: speed, memory and quality, in one command.

    python bench.py                          # speed + memory, a LLaMA-shaped model on the CPU (a few minutes)
    python bench.py --shape gpu-1b           # the same at a 1B-class shape in bf16 on a GPU
    python bench.py --quality --plot q.png   # quality: the demo task, 4 methods x 3 seeds, through train.py

What it checks: SpIEL (Ansell et al. 2024, arXiv 2401.16405, the method in section 3) is reported to be often
better than LoRA (Hu et al. 2021, arXiv 2106.09685) at the same number of trainable parameters, comparable
in run time, with memory that grows with that number rather than with the model. Here the budget is LoRA
rank 16 on all seven projections (SpIEL: as many deltas); full fine-tuning and a frozen model bracket it.

Speed: each method runs in a fresh process (`--worker`), so its peak memory is its own (peak RSS on the
CPU, torch.cuda.max_memory_allocated on a GPU; GB = 2**30 bytes, as train.py prints). A step is exactly
train.py's: forward with reduction="sum", divide by the target tokens, backward, clip, optimizer step,
zero_grad, and for SpIEL the Selector's begin_step / reselect. SpIEL is timed over one whole reselection
cycle (steps first+1 .. first+cycle: plain steps, the AG accumulation window and the reselection that
closes it), since the window and the drop-and-grow are part of what SpIEL costs; the others over --steps
steps after --warmup. "frozen" is the floor: no weight gets a gradient, only the activations do.

Quality: train.main() on the demo (train.DEMO_ARGS) once per method and seed, at exactly the same budget
(LoRA rank --rank; SpIEL with as many deltas, --match-lora-rank), reading each run's log.jsonl.

Gradient paths (--grad-paths): the two ways spiel.py computes d(values), timed alone per matrix shape and
density (the table in docs/bench.md, and where spiel.SPARSE_DENSITY_MAX comes from).
"""

import argparse
import glob
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import spiel
import train
from llama import PRESETS, ModelArgs, Transformer

# model shapes (random weights, random tokens): "cpu" is LLaMA-shaped but small enough for 2 cores
SHAPES = {
    "cpu": dict(model=ModelArgs(dim=1024, n_layers=6, n_heads=16, vocab_size=4096), seq=256, batch=2,
                dtype="float32"),  # ffn 2816 (Meta's rule, multiple_of 256): 85M parameters
    "gpu-1b": dict(model=ModelArgs(dim=2048, n_layers=16, n_heads=16, vocab_size=32000), seq=2048, batch=4,
                   dtype="bfloat16"),
    "tiny": dict(model=PRESETS["tiny"], seq=32, batch=2, dtype="float32"),  # for the tests
}
METHODS = ("frozen", "lora", "spiel-ag", "spiel-ma", "full")
LORA_RANK = 16  # the matched budget: LoRA rank 16 on all seven projections, SpIEL as many deltas
# quality mode: peak lr per method on the demo (train.py's other demo settings unchanged). MA takes a
# larger lr because SM3 without momentum is Adagrad-like: its steps shrink as the accumulators grow.
# checked on the demo (600 steps, seed 0): none diverges and all reach 100% exact match, so none was tuned
QUALITY_LR = {"spiel-ag": 3e-3, "spiel-ma": 3e-2, "lora": 3e-3, "full": 1e-3}


def n_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# -----------------------------------------------------------------------------
# speed and memory: one method in this process


def trainable_part(model, method: str, a):
    """(params, optimizer, selector) exactly as train.py builds them; lr and weight decay are train.py's
    defaults (they do not change the time of a step). "frozen" trains nothing: only activations get gradients."""
    for p in model.parameters():
        p.requires_grad_(False)
    lr, wd = train.DEFAULT_LR.get(method, 0.0), train.DEFAULT_WD.get(method, 0.0)
    if method in ("spiel-ag", "spiel-ma"):
        layers = spiel.add_sparse_deltas(model, lora_rank=LORA_RANK, seed=a.seed, verbose=False)
        if hasattr(spiel, "set_grad_path"):
            spiel.set_grad_path(model, a.grad_path)
        params = [layer.values for layer in layers.values()]
        if method == "spiel-ag":
            optimizer = spiel.AdamW(params, lr=lr, weight_decay=wd)
        else:
            from sm3 import SM3
            optimizer = SM3(params, lr=lr, weight_decay=wd)
        # a long run (so ~rho0 = 20% is replaced at each reselection), reselecting every --cycle steps
        schedule = spiel.Schedule(10**9, a.cycle, first=min(5, a.cycle - 1))
        return params, optimizer, spiel.Selector(model, method[-2:], schedule)
    if method == "lora":
        import lora
        lora.add_lora(model, LORA_RANK, alpha=16.0, dropout=0.1, seed=a.seed, verbose=False)  # train.py's defaults
        params = [p for p in model.parameters() if p.requires_grad]
    elif method == "full":
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
    else:  # frozen: the embedding output is the only thing that requires grad
        model.tok_embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_())
        return [], None, None
    return params, spiel.AdamW(params, lr=lr, weight_decay=wd), None


def resolved_grad_paths(model, device, dtype) -> dict:
    """how many delta layers compute d(values) by each path outside AG windows (what "auto" resolves to)."""
    if not hasattr(spiel, "choose_grad_path"):
        return {}
    counts = {}
    for layer in spiel.delta_layers(model).values():
        o, i = layer.weight_shape
        empty = lambda n: torch.empty(0, n, device=device, dtype=dtype)  # noqa: E731  (no tokens needed)
        path = spiel.choose_grad_path(layer, empty(o), empty(i))
        counts[path] = counts.get(path, 0) + 1
    return counts


def worker(a) -> dict:
    """time one method in this process; returns its numbers."""
    shape, method = SHAPES[a.shape], a.worker
    torch.set_num_threads(a.threads)
    device, cuda = a.device, a.device.startswith("cuda")
    dtype = getattr(torch, a.dtype or shape["dtype"])
    torch.manual_seed(a.seed)
    margs = ModelArgs(**{**vars(shape["model"]), "max_seq_len": shape["seq"]})
    torch.set_default_dtype(dtype)  # built in its compute dtype on its device: no fp32 copy of a big model
    with torch.device(device):
        model = Transformer(margs)
    torch.set_default_dtype(torch.float32)  # deltas, LoRA and optimizer state stay fp32
    n_base = sum(p.numel() for p in model.parameters())
    params, optimizer, selector = trainable_part(model, method, a)
    n_trainable = sum(p.numel() for p in params)
    grad_path = a.grad_path if selector and hasattr(spiel, "set_grad_path") else None
    paths = resolved_grad_paths(model, device, dtype) if grad_path else {}
    print(f"worker {method}: shape {a.shape} ({margs.n_layers} layers, dim {margs.dim}, {n_base:,} base "
          f"parameters), {dtype}, {device}, torch.set_num_threads({a.threads}), {n_trainable:,} trainable"
          + (f", grad path {grad_path} {paths}" if grad_path else ""), flush=True)

    B, T = shape["batch"], shape["seq"]
    g = torch.Generator().manual_seed(a.seed)
    model.train()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the peak from here on still counts everything allocated
    setup_gb = mem_gb(cuda)

    def batch():  # random tokens (B, T + 1) -> inputs (B, T), targets (B, T)
        tokens = torch.randint(margs.vocab_size, (B, T + 1), generator=g).to(device)
        return tokens[:, :-1], tokens[:, 1:]

    def step(t):  # train.py's step, with one micro-batch
        if selector:
            selector.begin_step(t)  # SpIEL-AG: open the accumulation window before the step's backward
        _, loss = model(*batch(), reduction="sum")
        (loss / (B * T)).backward()  # per target token
        if optimizer:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if selector and selector.schedule.is_reselection(t):
            selector.reselect(t, optimizer)  # drop and regrow

    # SpIEL: warm up through the first reselection, then time one whole cycle; the others: warmup, then steps
    n_warm, n_timed = (selector.schedule.first, a.cycle) if selector else (a.warmup, a.steps)
    times, phases = [], []
    for t in range(1, n_warm + n_timed + 1):
        t0 = time.perf_counter()
        step(t)
        if cuda:
            torch.cuda.synchronize()
        if t > n_warm:
            times.append(time.perf_counter() - t0)
            phases.append("reselect" if selector and selector.schedule.is_reselection(t) else
                          "window" if method == "spiel-ag" and selector.schedule.window_open(t) else "plain")
    median, mean = statistics.median(times), statistics.fmean(times)
    return {"method": method, "shape": a.shape, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "threads": a.threads, "torch": torch.__version__, "base_params": n_base, "trainable": n_trainable,
            "grad_path": grad_path, "grad_path_layers": paths, "tokens_per_step": B * T,
            "step_times": times, "phases": phases, "median_s": median, "cycle_mean_s": mean if selector else None,
            "phase_mean_s": {ph: statistics.fmean(x for x, p in zip(times, phases) if p == ph) for ph in set(phases)},
            "tokens_per_s": B * T / (mean if selector else median),  # what a long run sees per step on average
            "setup_memory_gb": setup_gb, "peak_memory_gb": mem_gb(cuda),
            "memory": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (ru_maxrss)"}


def mem_gb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def speed(a) -> dict:
    """each method in a fresh process; a table; all numbers to --json."""
    results = {}
    for method in a.methods:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "worker.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--json-out", out]
            for k in ("shape", "device", "dtype", "steps", "warmup", "cycle", "grad_path", "threads", "seed"):
                if getattr(a, k) is not None:
                    cmd += ["--" + k.replace("_", "-"), str(getattr(a, k))]
            p = subprocess.run(cmd)
            if p.returncode:
                results[method] = {"method": method, "error": f"worker exited with code {p.returncode}"}
                continue
            with open(out) as f:
                results[method] = json.load(f)
    lora_s = results.get("lora", {}).get("cycle_mean_s") or results.get("lora", {}).get("median_s")
    print(f"\nshape {a.shape}: {SHAPES[a.shape]['batch']} x {SHAPES[a.shape]['seq']} tokens per step, LoRA rank "
          f"{LORA_RANK} budget, grad path {a.grad_path}")
    print(f"{'method':<10}{'median s':>10}{'cycle mean s':>14}{'tokens/s':>10}{'x LoRA':>8}{'peak GB':>9}"
          f"{'trainable':>14}")
    for m, r in results.items():
        if "error" in r:
            print(f"{m:<10}  {r['error']}")
            continue
        step_s = r["cycle_mean_s"] or r["median_s"]
        r["ratio_to_lora"] = step_s / lora_s if lora_s else None
        cyc = f"{r['cycle_mean_s']:.3f}" if r["cycle_mean_s"] else "-"
        ratio = f"{r['ratio_to_lora']:.2f}" if lora_s else "-"
        print(f"{m:<10}{r['median_s']:>10.3f}{cyc:>14}{r['tokens_per_s']:>10.0f}{ratio:>8}"
              f"{r['peak_memory_gb']:>9.2f}{r['trainable']:>14,}")
    print("tokens/s and x LoRA use the cycle mean for SpIEL (window and reselection included), the median "
          "otherwise; memory is " + next((r["memory"] for r in results.values() if "memory" in r), "-"))
    for m, r in results.items():
        if r.get("phase_mean_s") and len(r["phase_mean_s"]) > 1:
            print(f"  {m} mean step by phase: " + ", ".join(f"{k} {v:.3f}s" for k, v in r["phase_mean_s"].items()))
    return {"mode": "speed", "shape": a.shape, "lora_rank": LORA_RANK, "methods": results}


# -----------------------------------------------------------------------------
# gradient paths: dense dW then gather vs the sampled product at the active entries, one matrix at a time


def grad_paths(a) -> dict:
    """ms per d(values) call for each path, by matrix shape and density (the shapes of the cpu preset)."""
    shape = SHAPES[a.shape]
    tokens, dim, ffn = shape["seq"] * shape["batch"], shape["model"].dim, shape["model"].ffn_dim
    device, dtype = a.device, getattr(torch, a.dtype or shape["dtype"])
    g = torch.Generator().manual_seed(a.seed)
    rows = []
    for out_f, in_f in ((dim, dim), (ffn, dim), (dim, ffn)):
        dy = torch.randn(tokens, out_f, generator=g).to(device, dtype)
        x = torch.randn(tokens, in_f, generator=g).to(device, dtype)
        for density in (0.01, 0.02, 0.04, 0.08, 0.16):
            k = int(density * out_f * in_f)
            layer = spiel.SparseDeltaLinear(torch.nn.Linear(in_f, out_f, bias=False, device=device), k, generator=g)
            times = {}
            for path, fn in (("dense", lambda: (dy.T @ x).view(-1)[layer.indices]),
                             ("sparse", lambda: spiel.sampled_grad(layer, dy, x))):
                fn()  # warm-up
                ts = []
                for _ in range(5):
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    fn()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    ts.append((time.perf_counter() - t) * 1e3)
                times[path] = statistics.median(ts)
            rows.append({"shape": [out_f, in_f], "density": density, **times})
    print(f"d(values) ms, dense / sparse ({tokens} tokens, {dtype}, {device}):")
    print("| matrix (out x in) | " + " | ".join(f"{d:.0%}" for d in (0.01, 0.02, 0.04, 0.08, 0.16)) + " |")
    print("| --- " * 6 + "|")
    for i in range(0, len(rows), 5):
        r = rows[i:i + 5]
        print(f"| {r[0]['shape'][0]} x {r[0]['shape'][1]} | " +
              " | ".join(f"{x['dense']:.1f} / {x['sparse']:.1f}" for x in r) + " |")
    return {"mode": "grad_paths", "tokens": tokens, "rows": rows}


# -----------------------------------------------------------------------------
# quality: train.py on the demo task, 4 methods x seeds


def set_flag(argv: list, flag: str, value) -> list:
    """argv with `flag value` replaced (or appended)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = str(value)
    else:
        argv += [flag, str(value)]
    return argv


def read_run(out: str) -> dict:
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    evals = [(r["step"], r["val_loss"]) for r in log if r.get("event") == "eval"]
    em = [r["exact_match"] for r in log if r.get("event") == "exact_match"]
    from safetensors import safe_open
    # the trainable count, from the saved artifact: delta values, LoRA A and B, or the whole model (full)
    n = 0
    for path in glob.glob(os.path.join(out, "*.safetensors")) + glob.glob(os.path.join(out, "model", "*.safetensors")):
        with safe_open(path, "pt") as f:
            n += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".indices"))
    return {"out": out, "val_loss": evals[-1][1] if evals else None, "exact_match": em[-1] if em else None,
            "exact_match_before": em[0] if len(em) > 1 else None, "trainable": n, "val_curve": evals,
            "train_curve": [(r["step"], r["loss"]) for r in log if "loss" in r]}


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def quality(a) -> dict:
    runs_dir = a.runs_dir or os.path.join("runs", f"bench-quality-{time.strftime('%Y%m%d-%H%M%S')}")
    base = train.DEMO_ARGS
    if "--density" in base:  # the budget is a LoRA rank here, so both sides train exactly the same count
        i = base.index("--density")
        base = base[:i] + base[i + 2:]
    for flag in ("ckpt", "data", "val_data", "steps"):
        if getattr(a, flag) is not None:
            base = set_flag(base, "--max-steps" if flag == "steps" else "--" + flag.replace("_", "-"), getattr(a, flag))
    for flag in ("--ckpt", "--data"):
        if not os.path.exists(base[base.index(flag) + 1]):
            raise SystemExit(f"error: {base[base.index(flag) + 1]} not found (the demo's? build it: python demo.py)")
    results = {}
    for method in ("spiel-ag", "spiel-ma", "lora", "full"):
        runs = []
        for seed in a.seeds:
            out = os.path.join(runs_dir, f"{method}-seed{seed}")
            argv = set_flag(set_flag(set_flag(set_flag(base, "--method", method), "--seed", seed), "--out", out),
                            "--lr", QUALITY_LR[method])
            if method != "full":  # SpIEL: as many deltas as LoRA of this rank trains; LoRA: this rank
                argv = set_flag(argv, "--lora-rank" if method == "lora" else "--match-lora-rank", a.rank)
            print(f"\n=== {method}, seed {seed}: python train.py {' '.join(argv)}", flush=True)
            code = train.main(argv)
            runs.append(read_run(out) if code == 0 else {"out": out, "error": f"train.py returned {code}"})
        ok = [r for r in runs if "error" not in r]
        vl, em = mean_std([r["val_loss"] for r in ok]), mean_std([r["exact_match"] for r in ok])
        results[method] = {"lr": QUALITY_LR[method], "seeds": list(a.seeds), "runs": runs,
                           "val_loss_mean": vl[0], "val_loss_std": vl[1], "exact_match_mean": em[0],
                           "exact_match_std": em[1], "trainable": ok[0]["trainable"] if ok else None}
    fmt = lambda m, s, p: "-" if m is None else f"{m:.{p}f} ± {s:.{p}f}"  # noqa: E731
    per_run = ("--method", "--lr", "--lora-rank", "--match-lora-rank")
    shared = [x for i, x in enumerate(base) if x not in per_run and base[i - 1] not in per_run]
    print(f"\nquality: {len(a.seeds)} seed(s) of python train.py {' '.join(shared)}, --method and --lr as below")
    print(f"{'method':<10}{'lr':>8}{'val loss':>18}{'exact match':>18}{'trainable':>12}")
    for m, r in results.items():
        print(f"{m:<10}{r['lr']:>8g}{fmt(r['val_loss_mean'], r['val_loss_std'], 4):>18}"
              f"{fmt(r['exact_match_mean'], r['exact_match_std'], 3):>18}{r['trainable'] or 0:>12,}")
    if a.plot:
        plot(results, a.plot)
    return {"mode": "quality", "train_args": base, "runs_dir": runs_dir, "methods": results}


def plot(results: dict, path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot drawn")
        return
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for m, r in results.items():
        run = r["runs"][0]  # the first seed
        if "error" in run:
            continue
        ax_t.plot(*zip(*run["train_curve"]), label=m, lw=0.8)
        ax_v.plot(*zip(*run["val_curve"]), label=m, marker="o")
    for ax, title in ((ax_t, "train loss"), (ax_v, "validation loss")):
        ax.set(xlabel="step", title=f"{title} (seed {next(iter(results.values()))['seeds'][0]})", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--json", help="write every number here (default bench.json, or bench-quality.json with --quality)")
    a("--threads", type=int, default=n_cores(), help="torch.set_num_threads (default: the cores available)")
    a("--seed", type=int, default=0)
    # speed and memory
    a("--shape", default="cpu", choices=list(SHAPES))
    a("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the shape's")
    a("--grad-path", default="auto", choices=["auto", "dense", "sparse"],
      help="SpIEL's d(values) outside AG windows: dense dW then gather, sampled (SDDMM), or spiel.py's choice")
    a("--warmup", type=int, default=2, help="untimed steps before --steps (not SpIEL: it warms up to its first "
                                             "reselection)")
    a("--steps", type=int, help="timed steps (default 8); with --quality: training steps (default: the demo's)")
    a("--cycle", type=int, default=20, help="SpIEL's reselection interval, all of it timed (first at min(5, cycle-1))")
    a("--worker", choices=METHODS, help=argparse.SUPPRESS)  # internal: run one method, write --json-out
    a("--json-out", help=argparse.SUPPRESS)
    # quality
    a("--quality", action="store_true", help="fine-tune on the demo task instead of timing")
    a("--grad-paths", action="store_true", help="time the dense and sparse value gradient per matrix and density")
    a("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a("--ckpt", help="default: the demo's (demo/base)")
    a("--data", help="default: the demo's (demo/train.jsonl)")
    a("--val-data", help="default: the demo's (demo/val.jsonl)")
    a("--rank", type=int, default=4, help="the matched budget: LoRA rank, and SpIEL with as many deltas (on the "
                                          "demo, rank 4 = 37,376 parameters, 5.1%% of the targeted weights)")
    a("--runs-dir", help="where the runs go (default runs/bench-quality-<time>)")
    a("--plot", help="draw the train/validation loss curves (seed 0) to this image (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.worker:
        args.steps = args.steps or 8
        r = worker(args)
        with open(args.json_out, "w") as f:
            json.dump(r, f)
        return 0
    torch.set_num_threads(args.threads)
    print(f"torch.set_num_threads({args.threads})")
    t0 = time.time()
    res = quality(args) if args.quality else grad_paths(args) if args.grad_paths else speed(args)
    res["seconds"] = time.time() - t0
    path = args.json or ("bench-quality.json" if args.quality else "bench-grad-paths.json" if args.grad_paths
                         else "bench.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path} ({res['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
