"""
How fast SpIEL trains, side by side with LoRA, full fine-tuning and the best peer (PEFT), and what it holds.

    python tools/bench.py                                  # speed + memory on the CPU bench shape (about 20 min)
    python tools/bench.py --peer /path/to/venv/bin/python  # plus PEFT LoRA / transformers rows (35 min on 2 cores)
    python tools/bench.py --shape gpu-1b                   # the same at a 1B-class shape in bf16 on a GPU
    python tools/bench.py --grad-paths                     # SpIEL's value gradient alone: dense vs sparse (SDDMM)
    python tools/bench.py --profile spiel-ma lora-nodrop   # where a step's time goes, op by op (torch.profiler)
    python tools/bench.py --real-data                      # packed vs --no-packing on heavy-tailed lengths

SpIEL (Ansell et al. 2024, arXiv 2401.16405) is reported to fine-tune as well as LoRA (Hu et al. 2021,
arXiv 2106.09685) or better at the same number of trainable parameters, at comparable speed, with memory
that grows with that number rather than with the model.

Speed: a step is train.py's train_step: forward, the summed loss over the tokens of the step, backward, (SpIEL-AG:
the window's end_step), optimizer step, zero_grad, and for SpIEL the drop-and-regrow when it is due; the
trainable part is built by train.add_trainable with train.py's defaults, at a matched budget (LoRA rank 16;
SpIEL with as many deltas). Timing: one process holds every method and steps them in turn, so they share
the thread settings and every slow spell of the machine (on a shared 2-core machine a lone process per
method drew windows 15% apart); each method's number is the mean step of its fastest round, a round being
one reselection cycle (SpIEL's plain steps, the AG window, the reselection). Memory: each method alone in a
fresh process (peak RSS on the CPU, torch.cuda.max_memory_allocated on a GPU; GB = 2**30 bytes). "frozen" is
the floor: no weight gets a gradient, only the activations do. The peer rows run Hugging Face transformers'
LlamaForCausalLM (+ PEFT LoRA) with torch's AdamW on the same shape and the same step; they need an
interpreter where transformers and peft are installed (--peer), which this repo does not depend on; with
--peer that interpreter runs our rows too (it needs requirements.txt as well).

Real data: real (non-padding) tokens/s of train.py's step (data.step_batches, the forward with segments,
train_step) on 400 instruction examples of heavy-tailed lengths, packed and --no-packing from the same seed on the
same examples, the padding of each and the largest per-step loss difference between them (the same gradient: float
rounding); with --peer, TRL's SFTTrainer with packing on the same examples where TRL is installed there.

Gradient paths: the table in docs/bench.md behind spiel.SPARSE_DENSITY_MAX. How well each method learns:
tools/quality.py.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
import config  # noqa: E402
import data  # noqa: E402
import files  # noqa: E402
import spiel  # noqa: E402
import train  # noqa: E402
from llama import IGNORE_INDEX, PRESETS, ModelArgs, Transformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # random weights, random tokens
    "cpu": dict(model=ModelArgs(dim=1024, n_layers=6, n_heads=16, vocab_size=4096), seq=256, batch=2, dtype="float32"),
    "gpu-1b": dict(model=ModelArgs(dim=2048, n_layers=16, n_heads=16, vocab_size=32000), seq=2048, batch=4,
                   dtype="bfloat16"),
    "tiny": dict(model=PRESETS["tiny"], seq=32, batch=2, dtype="float32"),  # for the tests
}
RANK = 16  # the matched budget: LoRA rank 16 on all seven projections, SpIEL with as many deltas
METHODS = ("frozen", "lora", "lora-nodrop", "spiel-ag", "spiel-ma", "full")
PEERS = ("peer-frozen", "peer-lora", "peer-lora-nodrop", "peer-full")
NOTES = {"lora": "dropout 0.1 (train.py's default)", "lora-nodrop": "dropout 0", "peer-lora": "PEFT, dropout 0.1",
         "peer-lora-nodrop": "PEFT, dropout 0", "peer-frozen": "transformers", "peer-full": "transformers"}


def sync(device: str):
    """wait for the GPU's queued work (a step's time is its work's)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def n_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# -----------------------------------------------------------------------------
# speed and memory: one method in this process


def our_model(margs, method, device, seed):
    """-> (loss function of (inputs, targets, segments or None), model, trainable params, optimizer, selector) for
    this repo's methods."""
    with torch.device(device):
        model = Transformer(margs)
    a = config.get_parser().parse_args(["--method", method.replace("-nodrop", "") if method != "frozen" else "lora",
                                       "--lora-rank", str(RANK), "--match-lora-rank", str(RANK), "--seed", str(seed)]
                                      + (["--lora-dropout", "0"] if method == "lora-nodrop" else []))
    if method == "frozen":  # nothing trains; the embedding output is the only thing that needs a gradient
        model.requires_grad_(False).tok_embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_())
        params, optimizer, selector = [], None, None
    else:  # SpIEL: a long run (so about rho0 = 20% is replaced at each reselection)
        params, optimizer, selector = train.add_trainable(model, a, total_steps=10**9)
    return (lambda x, y, s=None: model(x, y, reduction="sum", segments=s)[1]), model, params, optimizer, selector


def peer_model(margs, method, device, seed):
    """the same for transformers' LlamaForCausalLM (+ PEFT LoRA), with torch.optim.AdamW."""
    import transformers
    from peft import LoraConfig, get_peft_model

    cfg = transformers.LlamaConfig(
        hidden_size=margs.dim, num_hidden_layers=margs.n_layers, num_attention_heads=margs.n_heads,
        num_key_value_heads=margs.n_kv_heads, intermediate_size=margs.ffn_dim, vocab_size=margs.vocab_size,
        max_position_embeddings=margs.max_seq_len, rms_norm_eps=margs.norm_eps, rope_theta=margs.rope_theta,
        tie_word_embeddings=False, use_cache=False)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa",
                                                       dtype=torch.get_default_dtype()).to(device)
    model.requires_grad_(method == "peer-full")
    if method.startswith("peer-lora"):
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, bias="none", target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            lora_dropout=0.0 if method.endswith("nodrop") else 0.1))
    if method == "peer-frozen":
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False) if params else None

    def loss_fn(x, y):
        return F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten(), reduction="sum")
    return loss_fn, model, params, optimizer, None


def model_args(a, seq_len: int) -> ModelArgs:
    """the shape's model with seq_len positions (and this process's threads set)."""
    torch.set_num_threads(a.threads)
    return ModelArgs(**{**vars(SHAPES[a.shape]["model"]), "max_seq_len": seq_len})


def build(a, margs, method):
    """one method (ours or a peer) from a.seed, in its compute dtype, in training mode."""
    torch.manual_seed(a.seed)
    torch.set_default_dtype(getattr(torch, a.dtype or SHAPES[a.shape]["dtype"]))
    built = (peer_model if method.startswith("peer") else our_model)(margs, method, a.device, a.seed)
    torch.set_default_dtype(torch.float32)
    if built[4]:
        spiel.set_grad_path(built[1], a.grad_path)
    built[1].train()
    return built


def setup(a, methods):
    """every method of `methods` built in this process. -> (method -> (loss fn, model, params, optimizer,
    selector), step(method, t): train.py's step t of that method on one micro-batch of random tokens)."""
    shape = SHAPES[a.shape]
    margs = model_args(a, shape["seq"])
    built = {method: build(a, margs, method) for method in methods}
    B, T = shape["batch"], shape["seq"]
    g = torch.Generator().manual_seed(a.seed)

    def step(method, t):  # train.py's step t on (B, T + 1) random tokens
        loss_fn, model, params, optimizer, selector = built[method]
        tokens = torch.randint(margs.vocab_size, (B, T + 1), generator=g).to(a.device)
        if optimizer:
            train.train_step(t, [loss_fn(tokens[:, :-1], tokens[:, 1:])], B * T, params, optimizer, selector)
        else:  # frozen: only the backward pass
            (loss_fn(tokens[:, :-1], tokens[:, 1:]) / (B * T)).backward()
    return built, step


def worker(a) -> dict:
    """build every method of --worker (comma-separated) in this process and step them in turn: step t of each
    method, then step t + 1 of each (the order rotated every step), so a slow spell of the machine falls on all
    of them alike. All warm up through SpIEL's first reselection, then --rounds rounds of one reselection
    cycle each (SpIEL's plain steps, AG's window, the reselection). -> method -> its numbers."""
    shape, cuda, methods = SHAPES[a.shape], a.device.startswith("cuda"), a.worker.split(",")
    built, step = setup(a, methods)
    B, T = shape["batch"], shape["seq"]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    defaults = config.get_parser().parse_args([])
    n_warm, cycle = defaults.first_reselect, defaults.reselect_every  # (the Selector's schedule)
    times, phases = {m: [] for m in methods}, {m: [] for m in methods}
    for t in range(1, n_warm + a.rounds * cycle + 1):
        for method in methods[t % len(methods):] + methods[:t % len(methods)]:
            t0 = time.perf_counter()
            step(method, t)
            sync(a.device)
            if t > n_warm:
                sel = built[method][4]
                times[method].append(time.perf_counter() - t0)
                phases[method].append("reselect" if sel and sel.schedule.is_reselection(t) else "window" if sel and
                                      sel.method == "ag" and sel.schedule.window_open(t) else "plain")
    res = {}
    for method in methods:
        ts, ph = times[method], phases[method]
        rounds = [statistics.fmean(ts[i:i + cycle]) for i in range(0, len(ts), cycle)]
        best = min(range(len(rounds)), key=rounds.__getitem__) if rounds else None
        res[method] = {
            "method": method, "note": NOTES.get(method, ""), "shape": a.shape, "device": a.device,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp's default)"), "threads": a.threads,
            "dtype": a.dtype or shape["dtype"], "torch": torch.__version__, "python": sys.executable,
            "trainable": sum(p.numel() for p in built[method][2]), "tokens_per_step": B * T, "step_times": ts,
            "phases": ph, "round_means": rounds}
        if rounds:  # the fastest round, and its phases
            bt, bp = ts[best * cycle:(best + 1) * cycle], ph[best * cycle:(best + 1) * cycle]
            res[method] |= {"step_s": rounds[best], "tokens_per_s": B * T / rounds[best], "phase_mean_s": {
                p: statistics.fmean(x for x, q in zip(bt, bp) if q == p) for p in set(bp)}}
    if len(methods) == 1:  # alone in its process: the peak is its own
        res[methods[0]]["peak_memory_gb"] = (torch.cuda.max_memory_allocated() / 2**30 if cuda else
                                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return res


# how idle OpenMP threads wait, set alike for our methods and the peers' (they share a process): libgomp's
# default (they spin a while before sleeping: how any PyTorch program runs, a PEFT user's included) or PASSIVE
# (they sleep at once)
WAIT_POLICIES = {"spinning": None, "passive": "PASSIVE"}


def flags(a, *keys) -> list:
    """a's settings of `keys` as command-line flags, for a worker process."""
    return [x for k in keys if getattr(a, k) is not None for x in ("--" + k.replace("_", "-"), str(getattr(a, k)))]


def run_worker(a, methods, policy, rounds) -> dict:
    """a worker in a fresh process (the --peer interpreter when it has to run a peer) under one wait policy."""
    out = os.path.join(a.runs_dir, f"speed-{'+'.join(methods)}-{policy}-{rounds}.json")
    python = a.peer if any(m.startswith("peer") for m in methods) else sys.executable
    cmd = [python, os.path.abspath(__file__), "--worker", ",".join(methods), "--json-out", out, "--rounds",
           str(rounds)] + flags(a, "shape", "device", "dtype", "grad_path", "threads", "seed")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_WAIT_POLICY": WAIT_POLICIES[policy]} if WAIT_POLICIES[policy] else {}
    p = subprocess.run(cmd, env=env)
    return json.load(open(out)) if p.returncode == 0 else {m: {"error": f"exit code {p.returncode}"} for m in methods}


def speed(a) -> dict:
    """time: for each wait policy one process runs every method, their steps interleaved (worker), --rounds
    reselection cycles; per method the fastest round counts. Memory: each method alone in a fresh process
    through SpIEL's first reselection (its peak). A table; every number to --json."""
    methods = a.methods + (list(PEERS) if a.peer else [])
    best = {p: run_worker(a, methods, p, a.rounds) for p in a.wait_policies}
    memory = {m: run_worker(a, [m], a.wait_policies[0], 0)[m].get("peak_memory_gb") for m in methods}
    for by in best.values():
        for m, r in by.items():
            r["peak_memory_gb"] = memory[m]
    print(f"\nshape {a.shape}: {SHAPES[a.shape]['batch']} x {SHAPES[a.shape]['seq']} tokens per step, budget LoRA rank "
          f"{RANK}, {a.threads} threads; every method in one process per column, steps interleaved; the mean step "
          f"of the fastest of {a.rounds} rounds (a round: one reselection cycle)")
    head = " | ".join(f"{p}: step s (x PEFT LoRA dropout 0)" for p in a.wait_policies)
    print(f"| method | {head} | peak GB | trainable | note |\n|---|" + "---|" * (len(a.wait_policies) + 3))
    for m in methods:
        cells = []
        for p in a.wait_policies:
            r, peer = best[p][m], best[p].get("peer-lora-nodrop", {}).get("step_s")
            cells.append(r["error"] if "error" in r else f"{r['step_s']:.3f}" + (f" ({r['step_s'] / peer:.2f}x)"
                                                                               if peer else ""))
        r = best[a.wait_policies[0]][m]
        gb = "?" if memory[m] is None else f"{memory[m]:.2f}"
        print(f"| {m} | {' | '.join(cells)} | {gb} | {r.get('trainable', 0):,} | {NOTES.get(m, '')} |")
    for p in a.wait_policies:
        for m, r in best[p].items():
            if len(r.get("phase_mean_s", {})) > 1:
                phases = sorted(r["phase_mean_s"].items())
                print(f"  {m} ({p}) by phase: " + ", ".join(f"{k} {v:.3f}s" for k, v in phases))
    return {"mode": "speed", "shape": a.shape, "rank": RANK, "rounds": a.rounds, "best": best}


def profile(a) -> dict:
    """where a step's time goes: the methods of --profile warm up through SpIEL's first reselection, then
    one reselection cycle of each runs under torch.profiler, their steps interleaved (one process: the same
    thread settings and slow spells for all); per op, its own CPU time (not its callees') in ms per step,
    the ops that cost the most in any method first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    methods = a.profile
    built, step = setup(a, methods)
    defaults = config.get_parser().parse_args([])
    n_warm, cycle = defaults.first_reselect, defaults.reselect_every
    per_op, wall = {m: {} for m in methods}, {m: 0.0 for m in methods}
    for t in range(1, n_warm + cycle + 1):  # the methods' steps interleaved, as in the speed table
        for method in methods[t % len(methods):] + methods[:t % len(methods)]:
            if t <= n_warm:
                step(method, t)
                continue
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                step(method, t)
                wall[method] += (time.perf_counter() - t0) / cycle
            for e in prof.key_averages():
                per_op[method][e.key] = per_op[method].get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / cycle
    ops = sorted({k for d in per_op.values() for k in d}, key=lambda k: -max(d.get(k, 0) for d in per_op.values()))
    print(f"\nself CPU ms per step over one reselection cycle ({cycle} steps; {a.threads} threads, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; the profiler's own overhead included)")
    print("| op | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
    for k in ops[:a.profile_rows]:
        print(f"| {k[:48]} | " + " | ".join(f"{per_op[m].get(k, 0):.1f}" for m in methods) + " |")
    rest = {m: sum(v for k, v in per_op[m].items() if k not in ops[:a.profile_rows]) for m in methods}
    print("| (every other op) | " + " | ".join(f"{rest[m]:.1f}" for m in methods) + " |")
    print("| total self CPU | " + " | ".join(f"{sum(per_op[m].values()):.1f}" for m in methods) + " |")
    print("| wall ms per step (profiled) | " + " | ".join(f"{wall[m] * 1e3:.1f}" for m in methods) + " |")
    return {"mode": "profile", "methods": methods, "ms_per_step": per_op, "wall_s": wall}


# -----------------------------------------------------------------------------
# real data: heavy-tailed instruction lengths, packed vs --no-packing (and TRL's SFTTrainer with packing)

# issue 34's trial: 400 instruction examples of these token length percentiles, batch 8 x grad-accum 4, --seq-len 1024
REAL_EXAMPLES, REAL_PERCENTILES = 400, {50: 53, 95: 174, 99: 989}
REAL_BATCH, REAL_ACCUM, REAL_SEQ = 8, 4, 1024


def real_lengths(n: int, seed: int) -> list:
    """n example lengths in tokens with the trial's median, 95th and 99th percentiles: log length piecewise linear
    in the normal quantile z through those three (a lognormal of sigma 0.72 up to the 95th percentile, a steeper
    tail beyond it: no single lognormal has both the 95th and the 99th), taken at n evenly spaced quantiles,
    cut at REAL_SEQ as train.py cuts, in a shuffled order (seed)."""
    normal = statistics.NormalDist()
    knots = [(normal.inv_cdf(q / 100), math.log(v)) for q, v in REAL_PERCENTILES.items()]
    out = []
    for i in range(n):
        z = normal.inv_cdf(min(max(i / (n - 1), 0.25 / n), 1 - 0.25 / n))
        (z0, l0), (z1, l1) = knots[:2] if z <= knots[1][0] else knots[1:]
        out.append(min(REAL_SEQ, max(2, round(math.exp(l0 + (z - z0) * (l1 - l0) / (z1 - z0))))))
    return [out[i] for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()]


def real_examples(vocab: int, seed: int) -> list:
    """REAL_EXAMPLES examples (inputs, targets, None) as data.load_examples makes them: random token ids of the
    shape's vocabulary, the first 20-80% of each a prompt with no labels, the rest an answer with labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in real_lengths(REAL_EXAMPLES, seed):
        ids = torch.randint(vocab, (n + 1,), generator=g)
        prompt = max(1, round(n * (0.2 + 0.6 * torch.rand((), generator=g).item())))
        targets = ids[1:].clone()
        targets[:prompt - 1] = IGNORE_INDEX  # targets[t] is token t + 1
        out.append((ids[:-1], targets, None))
    return out


def real_step(t: int, run, draws, packing: bool, device: str) -> dict:
    """train.py's step t (fine_tune's loop) on one step's draws, packed or one example a row: -> its seconds,
    loss, real tokens and positions processed."""
    loss_fn, model, params, optimizer, selector = run
    t0 = time.perf_counter()
    micro = data.step_batches(draws, REAL_BATCH, REAL_SEQ, 0, packing, train.picks_candidates(selector, t))
    n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in micro)
    losses = (loss_fn(x.to(device), y.to(device), s if s is None else s.to(device)) for x, y, s in micro)
    loss = train.train_step(t, losses, n_targets, params, optimizer, selector)[0]
    sync(device)
    return {"seconds": time.perf_counter() - t0, "loss": loss, "tokens": sum(len(x) for d in draws for x, _, _ in d),
            "padded_tokens": sum(x.numel() for x, _, _ in micro)}


def real_rate(steps, n_warm: int, n: int) -> dict:
    """a run's numbers from its step records: padding over the warm-up and the first round (each step once), real
    tokens/s of each round (n steps after n_warm) and of the fastest."""
    rounds = [steps[i:i + n] for i in range(n_warm, len(steps), n)]
    rates = [sum(s["tokens"] for s in r) / sum(s["seconds"] for s in r) for r in rounds]
    once = steps[:n_warm + n]
    return {"padding": 1 - sum(s["tokens"] for s in once) / sum(s["padded_tokens"] for s in once),
            "round_tokens_per_s": rates, "tokens_per_s": max(rates), "steps": steps}


def real_data(a) -> dict:
    """each method of --methods twice, packed and --no-packing, from the same seed, in this process, their steps
    interleaved (step t of each run before step t + 1 of any; the order rotated every step); every run draws the
    same examples (data.Batches, seed): a warm-up through SpIEL's first reselection (train.py's --first-reselect
    steps), then --rounds rounds of the same --steps steps (the run's next --steps draws, replayed, so every round
    is the same work); per run the fastest round's real tokens/s. With --peer, TRL's SFTTrainer with packing on the
    same examples (trl_worker). A table; every number to --json."""
    margs = model_args(a, REAL_SEQ)
    examples = real_examples(margs.vocab_size, a.seed)
    lengths = [len(x) for x, _, _ in examples]
    cuts = statistics.quantiles(lengths, n=100, method="inclusive")
    dist = {"median": cuts[49], "p95": cuts[94], "p99": cuts[98], "mean": statistics.fmean(lengths),
            "max": max(lengths), "cut": sum(n == REAL_SEQ for n in lengths)}
    print(f"real data: {len(examples)} examples of random token ids; tokens per example: median {dist['median']:.0f}, "
          f"95th percentile {dist['p95']:.0f}, 99th {dist['p99']:.0f}, mean {dist['mean']:.1f}, max {dist['max']} "
          f"({dist['cut']} cut at {REAL_SEQ}); the first 20-80% of each a prompt with no labels")
    n_warm, n = config.get_parser().parse_args([]).first_reselect, a.steps
    batches = data.Batches(examples, REAL_BATCH, a.seed)
    draws = [[batches.next() for _ in range(REAL_ACCUM)] for _ in range(n_warm + n)]
    runs = {(m, packing): build(a, margs, m) for m in a.methods for packing in (True, False)}
    keys, steps = list(runs), {k: [] for k in runs}
    for t in range(1, n_warm + a.rounds * n + 1):
        d = draws[t - 1] if t <= n_warm else draws[n_warm + (t - n_warm - 1) % n]
        for k in keys[t % len(keys):] + keys[:t % len(keys)]:
            steps[k].append(real_step(t, runs[k], d, k[1], a.device))
    res = {m: {"packed": real_rate(steps[m, True], n_warm, n), "unpacked": real_rate(steps[m, False], n_warm, n),
               "max_rel_loss_diff": max(abs(p["loss"] - u["loss"]) / abs(u["loss"])
                                        for p, u in zip(steps[m, True], steps[m, False]))} for m in a.methods}
    for r in res.values():
        r["speedup"] = r["packed"]["tokens_per_s"] / r["unpacked"]["tokens_per_s"]
        r["goals"] = {"padding_at_most_5pct": r["packed"]["padding"] <= 0.05, "speed_at_least_2x": r["speedup"] >= 2}
    trl = run_trl(a) if a.peer else None
    print(f"batch {REAL_BATCH} x grad-accum {REAL_ACCUM} ({REAL_BATCH * REAL_ACCUM} examples a step), --seq-len "
          f"{REAL_SEQ}, shape {a.shape}, {a.threads} threads; real tokens/s: the fastest of {a.rounds} rounds of the "
          f"same {n} steps after {n_warm} warm-up steps, every run's steps interleaved in one process")
    base = res[a.methods[0]]["unpacked"]["tokens_per_s"]
    print(f"| run | padding | real tokens/s | x {a.methods[0]} --no-packing |\n|---|---|---|---|")
    rows = [(f"{m} {name}", r[mode]) for m, r in res.items() for name, mode in (("packed", "packed"),
                                                                               ("--no-packing", "unpacked"))]
    for name, x in rows + ([("TRL SFTTrainer packing (PEFT LoRA, dropout 0)", trl)] if trl else []):
        print(f"| {name} | " + (f"{x['error']} | | |" if "error" in x else
                                f"{x['padding']:.1%} | {x['tokens_per_s']:.0f} | {x['tokens_per_s'] / base:.2f}x |"))
    for m, r in res.items():
        print(f"{m}: the largest per-step loss difference, packed vs unpacked, over the same {len(steps[m, True])} "
              f"steps: {r['max_rel_loss_diff']:.1e} relative")
        print(f"{m}: goals: padding <= 5%: {'met' if r['goals']['padding_at_most_5pct'] else 'NOT met'} "
              f"({r['packed']['padding']:.1%}); real tokens/s >= 2x unpacked batch {REAL_BATCH}: "
              f"{'met' if r['goals']['speed_at_least_2x'] else 'NOT met'} ({r['speedup']:.2f}x)")
    return {"mode": "real_data", "shape": a.shape, "threads": a.threads, "batch": REAL_BATCH, "grad_accum": REAL_ACCUM,
            "seq_len": REAL_SEQ, "examples": len(examples), "lengths": dist, "warmup_steps": n_warm,
            "rounds": a.rounds, "steps": n, "torch": torch.__version__, "methods": res, "trl": trl}


def run_trl(a) -> dict:
    """trl_worker in the --peer interpreter; -> its numbers or {"error": why}."""
    out = os.path.join(a.runs_dir, "real-trl.json")
    p = subprocess.run([a.peer, os.path.abspath(__file__), "--worker", "trl", "--real-data", "--json-out", out]
                       + flags(a, "shape", "device", "dtype", "threads", "seed", "rounds", "steps"))
    return json.load(open(out)) if p.returncode == 0 else {"error": f"exit code {p.returncode}"}


def trl_worker(a) -> dict:
    """TRL's SFTTrainer with packing on the same examples: transformers' LlamaForCausalLM of the shape with PEFT
    LoRA at the matched budget, dropout 0 (peer_model, the same random weights), TRL's defaults otherwise (its
    AdamW, lr 1e-4): the examples packed once up front (best-fit decreasing into rows of REAL_SEQ tokens), padding-
    free (a micro-batch's rows flattened into one sequence, positions restarting at each example), one row a
    micro-batch (several would make one sequence whose sdpa mask grows with the square of all of them), REAL_ACCUM
    a step. Real tokens/s over the same warm-up and --rounds x --steps as ours, consecutive steps (TRL draws its
    own rows), timed from one step's end to the next."""
    try:
        import datasets
        import tokenizers
        import transformers
        import trl
    except ImportError as e:
        return {"error": f"{e.name} is not installed in {sys.executable}"}
    margs = model_args(a, REAL_SEQ)
    model = build(a, margs, "peer-lora-nodrop")[1]
    examples = real_examples(margs.vocab_size, a.seed)  # our inputs; labels unshifted (transformers shifts them)
    dataset = datasets.Dataset.from_dict({"input_ids": [x.tolist() for x, _, _ in examples],
                                          "labels": [[IGNORE_INDEX] + y[:-1].tolist() for _, y, _ in examples]})
    tok = transformers.PreTrainedTokenizerFast(  # only its pad and eos ids are read
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "<eos>": 1}, "<pad>")),
        pad_token="<pad>", eos_token="<eos>")
    n_warm = config.get_parser().parse_args([]).first_reselect
    ends, seen = [], []

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            seen.append(0)

        def on_step_end(self, args, state, control, **kw):
            sync(a.device)
            ends.append(time.perf_counter())
            seen.append(state.num_input_tokens_seen)
    cfg = trl.SFTConfig(output_dir=os.path.join(a.runs_dir, "trl"), max_length=REAL_SEQ, packing=True,
                    per_device_train_batch_size=1, gradient_accumulation_steps=REAL_ACCUM, learning_rate=1e-4,
                    max_steps=n_warm + a.rounds * a.steps, seed=a.seed, use_cpu=a.device == "cpu",
                    include_num_input_tokens_seen="all", logging_strategy="no", save_strategy="no", report_to="none",
                    disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=cfg, processing_class=tok, callbacks=[Clock()], train_dataset=dataset)
    trainer.train()
    steps = [{"seconds": t1 - t0, "tokens": s1 - s0, "padded_tokens": s1 - s0}  # padding-free: no padding
             for t0, t1, s0, s1 in zip(ends, ends[1:], seen, seen[1:])]
    return {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            **real_rate(steps, n_warm, a.steps)}


# -----------------------------------------------------------------------------
# gradient paths: dense dW then gather vs the sampled product at the active entries, one matrix at a time


def grad_paths(a) -> dict:
    """ms per d(values) call for each path, by matrix shape and density (the shapes of --shape)."""
    shape = SHAPES[a.shape]
    tokens, dim, ffn = shape["seq"] * shape["batch"], shape["model"].dim, shape["model"].ffn_dim
    dtype, g, rows = getattr(torch, a.dtype or shape["dtype"]), torch.Generator().manual_seed(a.seed), []
    densities = (0.01, 0.02, 0.04, 0.08, 0.16)
    for out_f, in_f in ((dim, dim), (ffn, dim), (dim, ffn)):
        dy = torch.randn(tokens, out_f, generator=g).to(a.device, dtype)
        x = torch.randn(tokens, in_f, generator=g).to(a.device, dtype)
        for density in densities:
            layer = spiel.SparseDeltaLinear(torch.nn.Linear(in_f, out_f, bias=False, device=a.device),
                                            int(density * out_f * in_f), generator=g)
            times = {}
            for path, fn in (("dense", lambda: (dy.T @ x).view(-1)[layer.indices]),
                             ("sparse", lambda: spiel.sampled_grad(layer, dy.T.contiguous(),
                                                                   x.T.contiguous(), layer.indices))):
                fn()  # warm-up
                ts = []
                for _ in range(5):
                    sync(a.device)
                    t = time.perf_counter()
                    fn()
                    sync(a.device)
                    ts.append((time.perf_counter() - t) * 1e3)
                times[path] = statistics.median(ts)
            rows.append({"shape": [out_f, in_f], "density": density, **times})
    print(f"d(values) ms, dense / sparse ({tokens} tokens, {dtype}, {a.device}):")
    print("| matrix (out x in) | " + " | ".join(f"{d:.0%}" for d in densities) + " |\n" + "| --- " * 6 + "|")
    for i in range(0, len(rows), len(densities)):
        r = rows[i:i + len(densities)]
        print(f"| {r[0]['shape'][0]} x {r[0]['shape'][1]} | " + " | ".join(f"{x['dense']:.1f} / {x['sparse']:.1f}"
                                                                          for x in r) + " |")
    return {"mode": "grad_paths", "tokens": tokens, "rows": rows}


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--json", help="write every number here (default: bench-<mode>.json)")
    a("--threads", type=int, default=n_cores(), help="torch.set_num_threads for the speed workers (default: all cores)")
    a("--seed", type=int, default=0)
    a("--runs-dir", default=os.path.join(ROOT, "runs", "bench"), help="where the workers write")
    a("--shape", default="cpu", choices=list(SHAPES))
    a("--methods", nargs="+", choices=METHODS, help="default: every method; --real-data: spiel-ag")
    a("--peer", help="a python that has transformers and peft: adds PEFT LoRA / transformers rows")
    a("--device", type=config.device, default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", choices=["float32", "bfloat16"], help="default: the shape's")
    a("--grad-path", default="auto", choices=["auto", "dense", "sparse"], help="SpIEL's value gradient path")
    a("--rounds", type=int, default=3, help="timed reselection cycles (20 steps) of every method; the fastest counts")
    a("--wait-policies", nargs="+", default=list(WAIT_POLICIES), choices=list(WAIT_POLICIES),
      help="how idle threads wait, for our workers and the peers' alike (both columns by default)")
    a("--grad-paths", action="store_true", help="time the dense and sparse value gradient per matrix and density")
    a("--profile", nargs="+", choices=METHODS + PEERS, help="torch.profiler over one reselection cycle of each "
      "method (peers: run bench.py with the --peer interpreter), own CPU time per op")
    a("--profile-rows", type=int, default=20, help="ops shown by --profile")
    a("--real-data", action="store_true", help=f"real tokens/s on {REAL_EXAMPLES} heavy-tailed instruction examples, "
      f"packed vs --no-packing, batch {REAL_BATCH} x grad-accum {REAL_ACCUM}, --seq-len {REAL_SEQ} (with --peer: "
      f"TRL's SFTTrainer with packing too)")
    a("--steps", type=int, default=4, help="--real-data: steps a round (--rounds rounds; the fastest counts)")
    for flag in ("--worker", "--json-out"):  # internal: one worker in a fresh process
        a(flag, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.real_data and "frozen" in (args.methods or []):
        ap.error("--real-data: frozen trains nothing (choose methods that train)")
    if args.real_data and min(args.rounds, args.steps) < 1:
        ap.error("--real-data needs --rounds and --steps of at least 1")
    args.methods = args.methods or (["spiel-ag"] if args.real_data else list(METHODS))
    if args.worker:
        files.write_json(args.json_out, trl_worker(args) if args.real_data else worker(args))
        return 0
    os.makedirs(args.runs_dir, exist_ok=True)
    t0 = time.time()
    res = grad_paths(args) if args.grad_paths else profile(args) if args.profile else real_data(args) \
        if args.real_data else speed(args)
    res["seconds"] = time.time() - t0
    path = args.json or f"bench-{res['mode']}.json"
    files.write_json(path, res)
    print(f"wrote {path} ({res['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
