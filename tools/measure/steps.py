"""N steps of one method on tools/bench.py's CPU shape (2 threads) -> a JSON file with the median step time (the first
step not counted). Used by threads.sh and demo.sh: python tools/measure/steps.py lora-nodrop 6 out.json"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tools/
import bench  # noqa: E402

method, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
_, step = bench.setup(argparse.Namespace(shape="cpu", threads=2, seed=0, dtype=None, device="cpu", grad_path="auto"),
                      [method])
times = []
for t in range(1, n + 1):
    t0 = time.perf_counter()
    step(method, t)
    times.append(time.perf_counter() - t0)
json.dump({"median": statistics.median(times[1:]), "times": times}, open(out, "w"))
