"""what glibc's fixed 1 MB mmap threshold (train.py's, for a large model) costs a step on tools/bench.py's CPU
shape: two copies of each method in one process, their steps interleaved, the threshold set before each step to
1 MB for one copy and 32 MB (the top of glibc's own range) for the other. Mean and median of the steps after the
5th.
    python tools/measure/mmap_threshold.py lora-nodrop spiel-ma"""
import argparse
import ctypes
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tools/
import bench  # noqa: E402

methods, n = sys.argv[1:] or ["lora-nodrop", "spiel-ma"], 25
a = argparse.Namespace(shape="cpu", threads=2, seed=0, dtype=None, device="cpu", grad_path="auto")
copies = [f"{m}@{mb}mb" for m in methods for mb in (1, 32)]
steps = {}
for c in copies:  # (setup builds one copy of the method per call)
    _, step = bench.setup(a, [c.split("@")[0]])
    steps[c] = step
libc, times = ctypes.CDLL("libc.so.6"), {c: [] for c in copies}
for t in range(1, n + 1):
    for c in copies[t % len(copies):] + copies[:t % len(copies)]:
        libc.mallopt(-3, int(c.split("@")[1][:-2]) << 20)  # -3: M_MMAP_THRESHOLD
        t0 = time.perf_counter()
        steps[c](c.split("@")[0], t)
        times[c].append(time.perf_counter() - t0)
for c in copies:
    x = times[c][5:]
    print(f"{c:20s} mean {statistics.fmean(x):.3f} s, median {statistics.median(x):.3f} s")
