"""How many ops a step runs: every aten op call (nested ones included) in one plain training step (no AG window,
no reselection) of each method on tools/bench.py's CPU shape, and what SpIEL adds per delta layer over the frozen
base. Counts, not times: they do not depend on the machine's speed.
    python tools/measure/ops.py [frozen lora-nodrop spiel-ma spiel-ag]"""
import argparse
import os
import sys

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tools/
import bench  # noqa: E402

methods = sys.argv[1:] or ["frozen", "lora-nodrop", "spiel-ma", "spiel-ag"]
built, step = bench.setup(argparse.Namespace(shape="cpu", threads=2, seed=0, dtype=None, device="cpu",
                                             grad_path="auto"), methods)
counts = {}
for method in methods:
    for t in range(1, 8):  # through the first reselection (step 5) and two plain steps
        step(method, t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(method, 8)  # a plain step: no window is open, no reselection is due
    counts[method] = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
layers = len([m for m in built[methods[-1]][1].modules() if type(m).__name__ == "SparseDeltaLinear"]) or 42
print(f"aten op calls in one plain step (tools/bench.py's CPU shape: {layers} matrices with deltas)")
print("| method | op calls | over frozen | per delta layer |\n|---|---:|---:|---:|")
base = sum(counts.get("frozen", {}).values())
for method in methods:
    n = sum(counts[method].values())
    extra = n - base if "frozen" in counts else float("nan")
    per = f"{extra / layers:.1f}" if method.startswith("spiel") else ""
    print(f"| {method} | {n:,} | {extra:+,} | {per} |")
if "frozen" in counts:
    for method in methods:
        if method.startswith("spiel"):
            diff = {k: counts[method].get(k, 0) - counts["frozen"].get(k, 0) for k in counts[method]}
            top = sorted(((v, k) for k, v in diff.items() if v), reverse=True)[:12]
            print(f"{method}, ops added per step: " + ", ".join(f"{k.removeprefix('aten::')} {v}" for v, k in top))
