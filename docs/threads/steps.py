"""N steps of one method on bench.py's CPU shape (2 threads) -> a JSON file with the median step time (the first
step not counted). Used by threads.sh: python docs/threads/steps.py lora-nodrop 6 out.json"""
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
import bench
from llama import ModelArgs
method, N, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
shape = bench.SHAPES['cpu']
margs = ModelArgs(**{**vars(shape['model']), 'max_seq_len': shape['seq']})
loss_fn, model, params, opt, sel = bench.our_model(margs, method, 'cpu', 0)
g = torch.Generator().manual_seed(0)
ts = []
for t in range(1, N + 1):
    t0 = time.perf_counter()
    tok = torch.randint(4096, (2, 257), generator=g)
    (loss_fn(tok[:, :-1], tok[:, 1:]) / 512).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    ts.append(time.perf_counter() - t0)
json.dump({"median": statistics.median(ts[1:]), "times": ts}, open(out, "w"))
