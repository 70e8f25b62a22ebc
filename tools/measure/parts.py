"""What SpIEL-MA's step adds to the frozen base's, piece by piece, on tools/bench.py's CPU shape (6 layers of dim
1024, ffn 2816, 2 x 256 tokens, LoRA rank 16's budget, 2 threads): each piece timed alone over all 42 matrices,
the median of 7. The floor any pure-PyTorch SpIEL step pays on a CPU: the sampled product (SDDMM) needs dy and x
with the tokens contiguous, and both arrive token-major, so each is transposed once.
    python tools/measure/parts.py"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo's modules
import spiel  # noqa: E402
from sm3 import SM3  # noqa: E402

torch.set_num_threads(2)
N, d, f, n_layers, rank = 512, 1024, 2816, 6, 16
shapes = [(d, d), (d, d), (d, d), (d, d), (f, d), (d, f), (f, d)]  # wq wk wv wo w1 w2 w3: (out, in)
g = torch.Generator().manual_seed(0)
layers = [spiel.SparseDeltaLinear(torch.nn.Linear(i, o, bias=False), rank * (o + i), generator=g)
          for _ in range(n_layers) for o, i in shapes]
dys = [torch.randn(N, m.weight_shape[0]) for m in layers]
inputs = [torch.randn(N, d), torch.randn(N, d), torch.randn(N, d), torch.randn(N, f)]  # a block's 4 distinct
xs = [inputs[i] for _ in range(n_layers) for i in (0, 0, 0, 1, 2, 3, 2)]  # wq/wk/wv and w1/w3 share one
dy_t, x_t = [t.T.contiguous() for t in dys], [t.T.contiguous() for t in xs]
params = [m.values for m in layers]
opt = SM3(params, lr=1e-3, positions={m.values: (m.indices, m.weight_shape) for m in layers})
for p in params:
    p.grad = torch.randn(p.shape, generator=g)


def ms(fn, reps=7) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def transposes():  # dy of every matrix; x once per distinct input (spiel.Inputs)
    shared = spiel.Inputs()
    for dy, x in zip(dys, xs):
        dy.T.contiguous()
        shared.token_major(x)


pieces = {
    "dy and x transposed (x once per input)": transposes,
    "the sampled product (SDDMM)":
        lambda: [spiel.sampled_grad(m, a, b, m.indices) for m, a, b in zip(layers, dy_t, x_t)],
    "the resident weight's writes (forward)": lambda: [spiel.resident_weight(m, m.values) for m in layers],
    "SM3's step": opt.step,
    "for scale: dx = dy W, which the frozen base does too": lambda: [dy @ m.base.weight for m, dy in zip(layers, dys)],
}
print(f"per step, {len(layers)} matrices, {N} tokens, {torch.get_num_threads()} threads (median of 7):")
for name, fn in pieces.items():
    print(f"  {name:52s} {ms(fn):7.1f} ms")
