"""
SpIEL side by side with LoRA and full fine-tuning, and with the best peer: speed, memory and quality.

    python bench.py                                    # speed + memory on the CPU bench shape (about 20 minutes)
    python bench.py --peer /path/to/venv/bin/python    # plus PEFT LoRA / transformers rows (35 minutes on 2 cores)
    python bench.py --shape gpu-1b                     # the same at a 1B-class shape in bf16 on a GPU
    python bench.py --grad-paths                       # SpIEL's value gradient alone: dense vs sparse (SDDMM)
    python bench.py --profile spiel-ma lora-nodrop     # where a step's time goes, op by op (torch.profiler)
    python bench.py --quality                          # the quality study (about 2 hours on 2 cores)

SpIEL (Ansell et al. 2024, arXiv 2401.16405) is reported to fine-tune as well as LoRA (Hu et al. 2021,
arXiv 2106.09685) or better at the same number of trainable parameters, at comparable speed, with memory
that grows with that number rather than with the model.

Speed: a step is train.py's: forward, the summed loss over the tokens of the step, backward, (SpIEL-AG: the
window's end_step), optimizer step, zero_grad, and for SpIEL the drop-and-regrow when it is due; the
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

Quality: see `quality` below. Gradient paths: the table in docs/bench.md behind spiel.SPARSE_DENSITY_MAX.
"""

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

import data
import lora
import runs
import spiel
import train
from generate import exact_match
from llama import PRESETS, ModelArgs, Tokenizer, Transformer, find_tokenizer, load_model

HERE = os.path.dirname(os.path.abspath(__file__))
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


def n_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# -----------------------------------------------------------------------------
# speed and memory: one method in this process


def our_model(margs, method, device, seed):
    """-> (loss function of (inputs, targets), trainable params, optimizer, selector) for this repo's methods."""
    with torch.device(device):
        model = Transformer(margs)
    a = runs.get_parser().parse_args(["--method", method.replace("-nodrop", "") if method != "frozen" else "lora",
                                       "--lora-rank", str(RANK), "--match-lora-rank", str(RANK), "--seed", str(seed)]
                                      + (["--lora-dropout", "0"] if method == "lora-nodrop" else []))
    if method == "frozen":  # nothing trains; the embedding output is the only thing that needs a gradient
        model.requires_grad_(False).tok_embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_())
        params, optimizer, selector = [], None, None
    else:  # SpIEL: a long run (so about rho0 = 20% is replaced at each reselection)
        params, optimizer, selector = train.add_trainable(model, a, total_steps=10**9)
    return (lambda x, y: model(x, y, reduction="sum")[1]), model, params, optimizer, selector


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


def setup(a, methods):
    """every method of `methods` built in this process. -> (method -> (loss fn, model, params, optimizer,
    selector), step(method, t): train.py's step t of that method on one micro-batch of random tokens)."""
    shape = SHAPES[a.shape]
    torch.set_num_threads(a.threads)
    margs = ModelArgs(**{**vars(shape["model"]), "max_seq_len": shape["seq"]})
    built = {}
    for method in methods:
        torch.manual_seed(a.seed)
        torch.set_default_dtype(getattr(torch, a.dtype or shape["dtype"]))  # built in its compute dtype
        built[method] = (peer_model if method.startswith("peer") else our_model)(margs, method, a.device, a.seed)
        torch.set_default_dtype(torch.float32)
        if built[method][4]:
            spiel.set_grad_path(built[method][1], a.grad_path)
        built[method][1].train()
    B, T = shape["batch"], shape["seq"]
    g = torch.Generator().manual_seed(a.seed)

    def step(method, t):  # (B, T + 1) random tokens
        loss_fn, model, params, optimizer, selector = built[method]
        if selector:
            selector.begin_step(t)
        tokens = torch.randint(margs.vocab_size, (B, T + 1), generator=g).to(a.device)
        (loss_fn(tokens[:, :-1], tokens[:, 1:]) / (B * T)).backward()
        if selector:
            selector.end_step()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if selector and selector.schedule.is_reselection(t):
            selector.reselect(t)  # drop and regrow
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
    defaults = runs.get_parser().parse_args([])
    n_warm, cycle = defaults.first_reselect, defaults.reselect_every  # (the Selector's schedule)
    times, phases = {m: [] for m in methods}, {m: [] for m in methods}
    for t in range(1, n_warm + a.rounds * cycle + 1):
        for method in methods[t % len(methods):] + methods[:t % len(methods)]:
            t0 = time.perf_counter()
            step(method, t)
            if cuda:
                torch.cuda.synchronize()
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


def run_worker(a, methods, policy, rounds) -> dict:
    """a worker in a fresh process (the --peer interpreter when it has to run a peer) under one wait policy."""
    out = os.path.join(a.runs_dir, f"speed-{'+'.join(methods)}-{policy}-{rounds}.json")
    python = a.peer if any(m.startswith("peer") for m in methods) else sys.executable
    cmd = [python, os.path.abspath(__file__), "--worker", ",".join(methods), "--json-out", out,
           "--rounds", str(rounds)] + [x for k in ("shape", "device", "dtype", "grad_path", "threads", "seed")
                                       if getattr(a, k) is not None for x in ("--" + k.replace("_", "-"),
                                                                              str(getattr(a, k)))]
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
                print(f"  {m} ({p}) by phase: " + ", ".join(f"{k} {v:.3f}s" for k, v in sorted(r["phase_mean_s"].items())))
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
    defaults = runs.get_parser().parse_args([])
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
                             ("sparse", lambda: spiel.sampled_grad(layer, dy, x, layer.indices))):
                fn()  # warm-up
                ts = []
                for _ in range(5):
                    torch.cuda.synchronize() if a.device.startswith("cuda") else None
                    t = time.perf_counter()
                    fn()
                    torch.cuda.synchronize() if a.device.startswith("cuda") else None
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
# quality: every method at its best learning rate of a small grid, several seeds, on two fixtures built by
# demo.py. "learned": held-out exact match on the fine-tuning task; "retained": exact match on held-out
# examples of what the base was pre-trained on (what fine-tuning made it forget). The lr is chosen on the
# first half of val.jsonl ("dev") and the numbers reported on the second half ("test"). The plain-loop rows
# train the same adapter / model with a 30-line loop that shares nothing with train.py but the model code.

FIXTURES = {"demo": os.path.join(HERE, "demo"), "transfer": os.path.join(HERE, "demo", "transfer")}


def fixture_files(name_or_dir: str) -> dict:
    """a fixture folder: base/ (the checkpoint), train.jsonl, val.jsonl, retain.jsonl."""
    d = FIXTURES.get(name_or_dir, name_or_dir)
    return {k: os.path.join(d, f) for k, f in (("ckpt", "base"), ("data", "train.jsonl"), ("val", "val.jsonl"),
                                               ("retain", "retain.jsonl"))}
Q_RANK = 4  # LoRA rank 4 on all seven projections; SpIEL with as many deltas
QUALITY = {  # name -> (train.py flags, or "plain" for the plain loop; the lr grid on each fixture)
    "spiel-ag": (["--method", "spiel-ag", "--match-lora-rank", str(Q_RANK)], {"demo": (1e-3, 3e-3, 1e-2),
                                                                            "transfer": (3e-3, 1e-2, 3e-2)}),
    "spiel-ma": (["--method", "spiel-ma", "--match-lora-rank", str(Q_RANK)], {"demo": (3e-2, 1e-1, 3e-1),
                                                                            "transfer": (3e-2, 1e-1, 3e-1)}),
    "lora": (["--method", "lora", "--lora-rank", str(Q_RANK), "--lora-alpha", str(2 * Q_RANK)],
             {"demo": (1e-3, 3e-3, 1e-2), "transfer": (3e-3, 1e-2, 3e-2)}),
    "lora-paper-alpha": (["--method", "lora", "--lora-rank", str(Q_RANK), "--lora-alpha", str(Q_RANK / 4)],
                         {"demo": (3e-3, 1e-2, 3e-2), "transfer": (1e-2, 3e-2, 1e-1)}),  # alpha / r = 16 / 64
    "full": (["--method", "full"], {"demo": (3e-4, 1e-3, 3e-3), "transfer": (1e-3, 3e-3, 1e-2)}),
    "plain-lora": ("plain", {"demo": (1e-3, 3e-3, 1e-2), "transfer": (3e-3, 1e-2, 3e-2)}),  # as "lora"
    "plain-full": ("plain", {"demo": (1e-4, 3e-4, 1e-3), "transfer": (1e-3, 3e-3, 1e-2)}),
}
# (each grid was centred on the best of a wider 5-value scan, 300 steps, seed 0; the study's table shows
# where each method's best lr falls in its grid: docs/bench.md)
# the ablation: an old default put back, at the method's best 300-step lr
ABLATION = {"spiel-ag+clip1": ("spiel-ag", ["--grad-clip", "1"]), "spiel-ag+wd30": ("spiel-ag", ["--weight-decay", "30"]),
            "spiel-ma+clip1": ("spiel-ma", ["--grad-clip", "1"]), "lora+clip1": ("lora", ["--grad-clip", "1"])}
BEST_300 = {"spiel-ag": {"demo": (3e-3,), "transfer": (1e-2,)}, "spiel-ma": {"demo": (0.1,), "transfer": (0.1,)},
            "lora": {"demo": (3e-3,), "transfer": (1e-2,)}}
QUALITY.update({name: (QUALITY[base][0] + extra, BEST_300[base]) for name, (base, extra) in ABLATION.items()})


def grid(method, fixture) -> tuple:
    grids = QUALITY[method][1]
    return grids.get(os.path.basename(fixture.rstrip("/")), next(iter(grids.values())))


Q_COMMON = ["--seq-len", "96", "--batch-size", "32", "--grad-accum", "1", "--eval-every", "0", "--save-every",
            "100000", "--device", "cpu", "--dtype", "float32"]  # (one thread each: OMP_NUM_THREADS=1)


def plain_loop(fixture, method, lr, seed, steps, out):
    """the simplest fine-tuning loop that could work, for reference: its own tokenization (prompt and answer
    tokenized apart), random batches with replacement, torch's AdamW (betas 0.9/0.95), warmup + cosine."""
    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    fx = fixture_files(fixture)
    tok = Tokenizer(find_tokenizer(fx["ckpt"]))
    model = load_model(fx["ckpt"], dtype=torch.float32).train()
    if method == "plain-lora":
        lora.add_lora(model, Q_RANK, alpha=2 * Q_RANK, dropout=0.1, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad] or list(model.requires_grad_(True).parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    seqs = []
    for rec in map(json.loads, open(fx["data"])):
        p = tok.encode(data.user_text(rec["instruction"]))  # BOS + the prompt, as generation sees it
        a = tok.encode(rec["output"], bos=False, eos=True)
        seqs.append((torch.tensor(p + a), torch.tensor([-100] * (len(p) - 1) + a + [-100])))
    warm, log = max(1, steps // 10), open(os.path.join(out, "log.jsonl"), "w")
    for step in range(1, steps + 1):
        lr_t = lr * min(step / warm, 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))
        for group in opt.param_groups:
            group["lr"] = lr_t
        batch = [seqs[i] for i in torch.randint(len(seqs), (32,)).tolist()]
        x = torch.nn.utils.rnn.pad_sequence([s for s, _ in batch], batch_first=True, padding_value=0)
        y = torch.nn.utils.rnn.pad_sequence([t for _, t in batch], batch_first=True, padding_value=-100)
        _, loss = model(x, y)  # mean over answer tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.write(json.dumps({"step": step, "loss": loss.item(), "lr": lr_t}) + "\n")
    if method == "plain-lora":
        lora.save_lora(model, os.path.join(out, "lora.safetensors"))
    else:
        from merge import save_hf
        save_hf(model, tok.path, os.path.join(out, "model"))


def without_fingerprint(path) -> str:
    """a copy of a fine-tune file without its base fingerprint (older versions computed it otherwise)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    copy = os.path.join(tempfile.mkdtemp(), os.path.basename(path))  # (the run's folder stays as it was)
    save_file(tensors, copy, metadata={k: v for k, v in meta.items() if k != "base_fingerprint"})
    return copy


def score(fixture, out, other_version=False) -> dict:
    """exact match of a finished run on dev / test halves of val.jsonl and on retain.jsonl, and its val loss."""
    from merge import apply_finetune
    fx = fixture_files(fixture)
    if os.path.isdir(os.path.join(out, "model")):
        model = load_model(os.path.join(out, "model"), dtype=torch.float32)
    else:
        model = load_model(fx["ckpt"], dtype=torch.float32)
        path = next(p for p in (os.path.join(out, f) for f in ("delta.safetensors", "lora.safetensors"))
                    if os.path.isfile(p))
        if other_version:  # its base fingerprint may be computed otherwise; the fixture's base is the same
            path = without_fingerprint(path)
        apply_finetune(model, path)
    tok = Tokenizer(find_tokenizer(fx["ckpt"]))
    val, _ = data.load_examples(fx["val"], tok, 96)
    retain, _ = data.load_examples(fx["retain"], tok, 96)
    half = len(val) // 2
    return {"dev": exact_match(model, tok, val[:half], half), "test": exact_match(model, tok, val[half:], half),
            "retained": exact_match(model, tok, retain, len(retain)),
            "val_loss": train.evaluate(model, val, 32, tok.eos_id, "cpu")}


def quality_job(a, fixture, method, lr, seed, steps) -> dict:
    """one run (train.py or the plain loop, in a fresh single-threaded process) and its score, cached."""
    out = os.path.join(a.runs_dir, f"{os.path.basename(fixture.rstrip('/'))}-{steps}", f"{method}-lr{lr:g}-seed{seed}")
    if os.path.isfile(os.path.join(out, "score.json")):
        return json.load(open(os.path.join(out, "score.json")))
    flags, _ = QUALITY[method]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if flags == "plain":
        cmd = ["--plain", method, "--fixture", fixture, "--lr", str(lr), "--seed", str(seed), "--steps", str(steps)]
    else:
        fx = fixture_files(fixture)
        cmd = [a.train_py, "--ckpt", fx["ckpt"], "--data", fx["data"], "--val-data", fx["val"],
               *flags, *Q_COMMON, "--lr", str(lr), "--seed", str(seed), "--max-steps", str(steps)]
    shutil.rmtree(out, ignore_errors=True)  # a run cut short earlier starts over
    cmd = [sys.executable, *(cmd if flags != "plain" else [os.path.abspath(__file__), *cmd]), "--out", out]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--score", out, "--fixture", fixture,
                        "--train-py", a.train_py], env=env,
                       capture_output=True, text=True)
    return json.load(open(os.path.join(out, "score.json"))) if p.returncode == 0 else {"error": p.stderr[-300:]}


def quality(a) -> dict:
    if a.lr_from:  # a long run at the lr each method did best with in an earlier (shorter) study
        try:
            best = json.load(open(a.lr_from))["results"]
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"error: {a.lr_from}: not a bench.py --quality result ({e})") from None
        steps0 = {k.split("/")[0] for k in best}
        picked = {(fx, m): (best[f"{s}/{fx}/{m}"]["best_lr"],) for s in sorted(steps0, key=int)  # longest wins
                  for fx in a.fixtures for m in a.quality_methods if f"{s}/{fx}/{m}" in best}
        missing = [f"{fx}/{m}" for fx in a.fixtures for m in a.quality_methods if (fx, m) not in picked]
        if missing:
            raise SystemExit(f"error: {a.lr_from}: no best lr for {', '.join(missing)}")
    grids = picked if a.lr_from else {(fx, m): grid(m, fx) for fx in a.fixtures for m in a.quality_methods}
    jobs = [(fx, m, lr, seed, steps) for steps in a.quality_steps for fx in a.fixtures for m in a.quality_methods
            for lr in grids[(fx, m)] for seed in a.seeds]
    with ThreadPoolExecutor(a.jobs) as pool:
        scores = dict(zip(jobs, pool.map(lambda j: quality_job(a, *j), jobs)))
    table, report = [], {}
    for steps in a.quality_steps:
        for fx in a.fixtures:
            for m in a.quality_methods:
                by_lr = {lr: [scores[(fx, m, lr, s, steps)] for s in a.seeds] for lr in grids[(fx, m)]}
                ok = {lr: r for lr, r in by_lr.items() if all("error" not in x for x in r)}
                if not ok:
                    table.append(f"| {steps} | {fx} | {m} | failed: {next(iter(by_lr.values()))[0]} |")
                    continue
                # the best lr by mean dev exact match (ties: lower val loss)
                best = max(ok, key=lambda lr: (statistics.fmean(x["dev"] for x in ok[lr]),
                                               -statistics.fmean(x["val_loss"] for x in ok[lr])))
                ms = lambda key: (statistics.fmean(x[key] for x in ok[best]),  # noqa: E731
                                  statistics.pstdev(x[key] for x in ok[best]))
                report[f"{steps}/{fx}/{m}"] = {"best_lr": best, "grid": {str(k): v for k, v in by_lr.items()},
                                               **{k: ms(k) for k in ("test", "retained", "val_loss")}}
                cell = lambda key: f"{100 * ms(key)[0]:.0f} ± {100 * ms(key)[1]:.0f}"  # noqa: E731
                lrs = " / ".join(f"{lr:g}: {100 * statistics.fmean(x['dev'] for x in ok[lr]):.0f}" if lr in ok else
                                 f"{lr:g}: failed" for lr in grids[(fx, m)])
                table.append(f"| {steps} | {os.path.basename(fx.rstrip('/'))} | {m} | {best:g} | {cell('test')} | {cell('retained')} | "
                             f"{ms('val_loss')[0]:.3f} | {lrs} |")
    print(f"\nquality: {len(a.seeds)} seeds, mean ± std (%) of held-out exact match at each method's best lr "
          f"(chosen on dev)\n| steps | fixture | method | best lr | learned (test) | retained | val loss | "
          f"dev EM (%) per lr of the grid |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    return {"mode": "quality", "seeds": a.seeds, "rank": Q_RANK, "common": Q_COMMON, "results": report}


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--json", help="write every number here (default: bench-<mode>.json)")
    a("--threads", type=int, default=n_cores(), help="torch.set_num_threads for the speed workers (default: all cores)")
    a("--seed", type=int, default=0)
    a("--runs-dir", default=os.path.join(HERE, "runs", "bench"), help="where workers and quality runs write")
    # speed
    a("--shape", default="cpu", choices=list(SHAPES))
    a("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    a("--peer", help="a python that has transformers and peft: adds PEFT LoRA / transformers rows")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", choices=["float32", "bfloat16"], help="default: the shape's")
    a("--grad-path", default="auto", choices=["auto", "dense", "sparse"], help="SpIEL's value gradient path")
    a("--rounds", type=int, default=3, help="timed reselection cycles (20 steps) of every method; the fastest counts")
    a("--steps", type=int, help=argparse.SUPPRESS)  # (the plain loop's)
    a("--wait-policies", nargs="+", default=list(WAIT_POLICIES), choices=list(WAIT_POLICIES),
      help="how idle threads wait, for our workers and the peers' alike (both columns by default)")
    a("--grad-paths", action="store_true", help="time the dense and sparse value gradient per matrix and density")
    a("--profile", nargs="+", choices=METHODS + PEERS, help="torch.profiler over one reselection cycle of each "
      "method (peers: run bench.py with the --peer interpreter), own CPU time per op")
    a("--profile-rows", type=int, default=20, help="ops shown by --profile")
    # quality
    a("--quality", action="store_true", help="the quality study (see `quality` in the code)")
    a("--fixtures", nargs="+", default=list(FIXTURES), help=f"{' or '.join(FIXTURES)}, or a folder laid out alike")
    a("--quality-methods", nargs="+", default=[m for m in QUALITY if m not in ABLATION], choices=list(QUALITY))
    a("--quality-steps", type=int, nargs="+", default=[300, 1000], help="a short and a long run")
    a("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a("--lr-from", help="a --quality JSON: run each method only at the best lr found there (a long run)")
    a("--jobs", type=int, default=n_cores(), help="quality runs at once (each on one thread)")
    a("--train-py", default=os.path.join(HERE, "train.py"), help="the train.py the study runs (e.g. an older "
      "version's, for a before / after table)")
    # internal: one worker / plain-loop run / score, in a fresh process
    for flag in ("--worker", "--json-out", "--plain", "--score", "--fixture", "--out"):
        a(flag, help=argparse.SUPPRESS)
    a("--lr", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        runs.write_json(args.json_out, worker(args))
        return 0
    if args.plain:
        plain_loop(args.fixture, args.plain, args.lr, args.seed, args.steps, args.out)
        return 0
    if args.score:  # (a run of another version's train.py: --train-py names it)
        other = not os.path.samefile(args.train_py, os.path.join(HERE, "train.py"))
        runs.write_json(os.path.join(args.score, "score.json"), score(args.fixture, args.score, other))
        return 0
    os.makedirs(args.runs_dir, exist_ok=True)
    t0 = time.time()
    res = (quality(args) if args.quality else grad_paths(args) if args.grad_paths else profile(args) if args.profile
           else speed(args))
    res["seconds"] = time.time() - t0
    path = args.json or f"bench-{res['mode']}.json"
    runs.write_json(path, res)
    print(f"wrote {path} ({res['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
