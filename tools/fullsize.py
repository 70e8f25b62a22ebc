"""
The full-size check: LLaMA 2 7B's whole path at its real shapes, on this machine, with random weights (nothing
to download). Not a test: it takes about an hour on 2 CPU cores, 14 GB of disk and a 24 GB machine.

    python tools/fullsize.py --dir /big/disk           # 7B: 32 layers at 7B width
    python tools/fullsize.py --dir /tmp/fs --layers 4  # 4 layers at 7B width: a few minutes

It writes a 7B-shaped checkpoint in Meta's layout (random bf16 weights: params.json + consolidated.00.pth, and
the demo's tokenizer one level up, so the embedding's 32,000 rows are a padded vocabulary for its few pieces),
then runs what a user runs, each in a fresh process, at train.py's settings for the SpIEL paper's budget
(159,907,840 deltas at 32 layers), gradient checkpointing, 1 x 64 tokens per step:
  for the base in int8, nf4, and the method in spiel-ag, spiel-ma:
    train.py: load and quantize; steps 1-2 (SpIEL-AG: its accumulation window); the first reselection at step 2
              (it replaces every delta); save; stop
    train.py --resume: load again, one more step, save
  generate.py: a few tokens with the last delta on the int8 base
  merge.py: the Hugging Face export of that delta (bf16), removed afterwards
Each process's own peak memory (its anonymous RSS, sampled every 10 ms by this script: the page cache of the
mmap'ed checkpoint is not counted, as train.py's closing line) is printed beside tools/memory.py's estimate for the
same settings, with the load, step and reselection times. --json keeps everything.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
import memory  # noqa: E402  (tools/memory.py)
from llama import PRESETS, ModelArgs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--data", os.path.join(ROOT, "demo", "train.jsonl"), "--val-frac", "0", "--eval-every", "0",
         "--grad-checkpoint", "--seq-len", "64", "--batch-size", "1", "--grad-accum", "1", "--max-steps", "3",
         "--first-reselect", "2", "--reselect-every", "3", "--save-every", "1000", "--device", "cpu"]


def write_checkpoint(folder: str, args: ModelArgs, seed: int = 0):
    """random bf16 weights of these shapes in Meta's layout (one consolidated.00.pth), a tensor at a time."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    hd, f = args.head_dim, args.ffn_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,),
              "output.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        shapes |= {f"layers.{i}.attention.wq.weight": (args.n_heads * hd, args.dim),
                   f"layers.{i}.attention.wk.weight": (args.n_kv_heads * hd, args.dim),
                   f"layers.{i}.attention.wv.weight": (args.n_kv_heads * hd, args.dim),
                   f"layers.{i}.attention.wo.weight": (args.dim, args.n_heads * hd),
                   f"layers.{i}.feed_forward.w1.weight": (f, args.dim),
                   f"layers.{i}.feed_forward.w2.weight": (args.dim, f),
                   f"layers.{i}.feed_forward.w3.weight": (f, args.dim),
                   f"layers.{i}.attention_norm.weight": (args.dim,), f"layers.{i}.ffn_norm.weight": (args.dim,)}
    sd = {k: (1 + 0.1 * torch.randn(s, generator=g) if len(s) == 1 else 0.02 * torch.randn(s, generator=g)).bfloat16()
          for k, s in shapes.items()}  # (norm gains near 1, weights of LLaMA's scale)
    torch.save(sd, os.path.join(folder, "consolidated.00.pth"))
    with open(os.path.join(folder, "params.json"), "w") as fp:
        json.dump({"dim": args.dim, "multiple_of": args.multiple_of, "n_heads": args.n_heads,
                   "n_layers": args.n_layers, "norm_eps": args.norm_eps, "vocab_size": -1}, fp)
    shutil.copyfile(os.path.join(ROOT, "demo", "base", "tokenizer.model"),
                    os.path.join(os.path.dirname(folder.rstrip("/")), "tokenizer.model"))


def anon_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def run(script: str, argv: list, threads) -> dict:
    """one process, its output echoed; -> its exit code, wall time, output and peak anonymous RSS"""
    cmd = [sys.executable, os.path.join(ROOT, script), *argv] + (["--threads", str(threads)] if threads and
                                                                  script == "train.py" else [])
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0, peak, lines = time.time(), 0, []
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def echo():  # (a thread: the loop below keeps sampling while the process is silent)
        for line in p.stdout:
            print("  " + line, end="", flush=True)
            lines.append(line)
    reader = threading.Thread(target=echo)
    reader.start()
    while p.poll() is None:
        peak = max(peak, anon_rss(p.pid))
        time.sleep(0.01)
    reader.join()
    if p.returncode:
        raise SystemExit(f"error: {script} exited with {p.returncode}:\n{''.join(lines[-20:])}")
    return {"seconds": time.time() - t0, "peak_gb": peak / 1e9, "output": "".join(lines)}


def timings(out: str, stdout: str, steps) -> dict:
    """load time of a train.py run (from its output), and its step and reselection times (log.jsonl)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [r for r in map(json.loads, f) if r.get("step") in steps]
    reselect = {r["step"]: r["seconds"] for r in log if r.get("event") == "reselect"}
    steps = {r["step"]: r["step_time"] - reselect.get(r["step"], 0) for r in log if "loss" in r}
    load = re.search(r"loaded in ([\d.]+)s", stdout)
    return {"load_s": float(load[1]) if load else None, "step_s": steps, "reselect_s": reselect}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="a folder with room for the checkpoint (14 GB at 32 layers, "
                                                 "twice that while merge.py's export exists)")
    ap.add_argument("--layers", type=int, default=32, help="layers at 7B width (32: LLaMA 2 7B)")
    ap.add_argument("--threads", type=int, help="CPU threads for every process (default: torch's)")
    ap.add_argument("--bases", nargs="+", default=["int8", "nf4"], choices=["int8", "nf4"])
    ap.add_argument("--methods", nargs="+", default=["spiel-ag", "spiel-ma"], choices=["spiel-ag", "spiel-ma"])
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--checkpoint-only", action="store_true", help="write the 7B-shaped checkpoint and stop (e.g. "
                                                                   "for train.py --ckpt on a GPU: docs/gpu.md)")
    a = ap.parse_args(argv)
    shape = ModelArgs(**{**PRESETS["7B"].__dict__, "n_layers": a.layers})
    ckpt = os.path.join(os.path.abspath(a.dir), f"llama-2-7b-shaped-{a.layers}-layers")
    if not os.path.isfile(os.path.join(ckpt, "params.json")):
        t0 = time.time()
        print(f"writing a random checkpoint of LLaMA 2 7B's shapes ({a.layers} layers) to {ckpt}", flush=True)
        write_checkpoint(ckpt, shape)
        print(f"  written in {time.time() - t0:.0f}s", flush=True)
    if a.checkpoint_only:
        print(f"checkpoint: {ckpt}")
        return 0
    report = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "layers": a.layers,
              "threads": a.threads or torch.get_num_threads(), "runs": {}}
    for base in a.bases:
        for method in a.methods:
            out = os.path.join(a.dir, "runs", f"{method}-{base}")
            shutil.rmtree(out, ignore_errors=True)
            first = run("train.py", ["--ckpt", ckpt, "--out", out, "--method", method, "--quantize", base, *TRAIN,
                                     "--stop-at-step", "2"], a.threads)
            resumed = run("train.py", ["--out", out, "--resume"], a.threads)
            est = memory.estimate(shape, method, base, 64, 1, True, dtype=torch.float32, device="cpu")
            report["runs"][f"{method}, {base}"] = {
                "peak_gb": first["peak_gb"], "estimate_gb": est["total"] / 1e9, "estimate": est,
                "resumed_peak_gb": resumed["peak_gb"], **timings(out, first["output"], (1, 2)),
                "resumed": timings(out, resumed["output"], (3,)), "wall_s": first["seconds"] + resumed["seconds"]}
    delta = os.path.join(a.dir, "runs", f"{a.methods[-1]}-{a.bases[0]}", "delta.safetensors")
    gen = run("generate.py", ["--ckpt", ckpt, "--delta", delta, "--quantize", a.bases[0], "--prompt",
                              "shift: a b c", "--chat", "--max-new-tokens", "4", "--temperature", "0", "--device",
                              "cpu"], a.threads)
    merged = os.path.join(a.dir, "merged")
    shutil.rmtree(merged, ignore_errors=True)
    mrg = run("merge.py", ["--ckpt", ckpt, "--delta", delta, "--out", merged], a.threads)
    shutil.rmtree(merged)
    report |= {"generate": {k: v for k, v in gen.items() if k != "output"},
               "merge": {k: v for k, v in mrg.items() if k != "output"}}

    print(f"\nfull-size check: LLaMA 2 7B shapes, {a.layers} layers, {report['machine']}, "
          f"{report['threads']} threads; 1 x 64 tokens per step, gradient checkpointing, fp32 compute")
    print("| method, base | load s | step s (1, 2, 3) | reselection s | peak GB, measured | estimate (memory.py) "
          "| measured / estimate |\n|---|---:|---|---:|---:|---:|---:|")
    for name, r in report["runs"].items():
        steps = ", ".join(f"{s:.0f}" for s in [*r["step_s"].values(), *r["resumed"]["step_s"].values()])
        print(f"| {name} | {r['load_s']:.0f} | {steps} | {sum(r['reselect_s'].values()):.0f} | {r['peak_gb']:.2f} "
              f"| {r['estimate_gb']:.2f} | {r['peak_gb'] / r['estimate_gb']:.2f} |")
    print(f"generate.py (int8 base + delta, 4 tokens): {gen['seconds']:.0f}s, peak {gen['peak_gb']:.2f} GB; "
          f"merge.py (bf16 export): {mrg['seconds']:.0f}s, peak {mrg['peak_gb']:.2f} GB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
