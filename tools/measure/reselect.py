"""where a SpIEL reselection's time goes on tools/bench.py's CPU shape: 24 steps (the first reselection at step 5), then
step 25, which ends in the next reselection, under cProfile (Selector.reselect's line is the reselection).
    python tools/measure/reselect.py spiel-ma"""
import argparse
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tools/
import bench  # noqa: E402

method = sys.argv[1] if len(sys.argv) > 1 else "spiel-ma"
_, step = bench.setup(argparse.Namespace(shape="cpu", threads=2, seed=0, dtype=None, device="cpu",
                                         grad_path="auto"), [method])
for t in range(1, 25):
    step(method, t)
prof = cProfile.Profile()
prof.runcall(step, method, 25)
pstats.Stats(prof).sort_stats("cumtime").print_stats("spiel.py|sm3.py", 12)
