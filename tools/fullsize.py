"""
The full-size check: a model's whole path at its real shapes, on this machine, with random weights (nothing to
download). Not a test: LLaMA 2 7B takes about an hour on 2 CPU cores, 14 GB of disk and a 24 GB machine.

    python tools/fullsize.py --dir /big/disk                                  # LLaMA 2 7B: 32 layers
    python tools/fullsize.py --dir /tmp/fs --layers 4                         # 4 layers at 7B width: minutes
    python tools/fullsize.py --dir /tmp/fs --layers 4 --preset Llama-3.1-8B   # or Qwen2.5-7B (llama.PRESETS)

It writes a checkpoint of the preset's shapes (random bf16 weights; --layers N: the first N layers at full
width, the whole vocabulary). LLaMA 2 in Meta's layout: params.json + consolidated.00.pth, and the demo's
tokenizer one level up, so the embedding's 32,000 rows are a padded vocabulary for its few pieces. A model that
params.json cannot describe (Llama 3.1's rope scaling, Qwen2.5's q/k/v biases) in the Hugging Face layout, as the
Hub ships it: config.json of its family (merge.hf_config: model_type llama with rope_scaling llama3, or qwen2),
safetensors shards, and a byte-level BPE tokenizer.json learned from the demo's text with the family's special
tokens (Llama 3: a BOS before every text, EOS <|eot_id|>; Qwen2: no BOS, EOS <|im_end|>): a few hundred tokens
for the embedding's 128,256 or 152,064 rows, again a padded vocabulary. Then it runs what a user runs, each in a
fresh process, at train.py's settings for the SpIEL paper's budget (LoRA rank 64's count: 159,907,840 deltas on
LLaMA 2 7B), gradient checkpointing, 1 x 64 tokens per step:
  for the base in int8, nf4, and the method in spiel-ag, spiel-ma (6 steps planned, reselections at 2 and 5):
    train.py: load and quantize; steps 1-2 (SpIEL-AG: its accumulation window); the first reselection at step 2
              (it replaces every delta); save; stop
    train.py --resume: load again, step 3 (SpIEL-AG: the next window opens, its candidates picked with the
              optimizer's state in memory, as in every window after the first), save, stop
  generate.py: a few tokens with the last delta on the int8 base
  merge.py: the Hugging Face export of that delta (bf16), removed afterwards
Each process's own peak memory (its anonymous RSS, sampled every 10 ms by this script: the page cache of the
mmap'ed checkpoint is not counted, as train.py's closing line), the larger of the two train.py runs, is printed
beside tools/memory.py's estimate for the same settings, with the load, step and reselection times. --json keeps
everything.
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
import files  # noqa: E402
import memory  # noqa: E402  (tools/memory.py)
from llama import PRESETS, ModelArgs  # noqa: E402
from merge import save_hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--data", os.path.join(ROOT, "demo", "train.jsonl"), "--val-frac", "0", "--eval-every", "0",
         "--grad-checkpoint", "--seq-len", "64", "--batch-size", "1", "--grad-accum", "1", "--max-steps", "6",
         "--first-reselect", "2", "--reselect-every", "3", "--save-every", "1000", "--device", "cpu"]


def hf_only(args: ModelArgs) -> bool:
    """params.json (Meta's layout) cannot say this model: it is written in the Hugging Face layout."""
    return bool(args.rope_scaling or args.bias or args.tie_embeddings or args.sliding_window or args.hidden_dim)


def write_checkpoint(folder: str, args: ModelArgs, seed: int = 0):
    """random bf16 weights of these shapes, in Meta's layout (one consolidated.00.pth, written a tensor at a time)
    or, for a model params.json cannot describe, in the Hugging Face one (write_hf)."""
    if hf_only(args):
        return write_hf(folder, args, seed)
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
    params = {k: getattr(args, k) for k in ("dim", "multiple_of", "n_heads", "n_kv_heads", "ffn_dim_multiplier",
                                            "n_layers", "norm_eps", "rope_theta") if getattr(args, k) is not None}
    with open(os.path.join(folder, "params.json"), "w") as fp:
        json.dump(params | {"vocab_size": -1}, fp)
    shutil.copyfile(os.path.join(ROOT, "demo", "base", "tokenizer.model"),
                    os.path.join(os.path.dirname(folder.rstrip("/")), "tokenizer.model"))


def write_hf(folder: str, args: ModelArgs, seed: int = 0):
    """the Hugging Face layout as the Hub ships the family: random weights (memory.random_model: q/k/v biases
    included, drawn a tensor at a time) saved by merge.save_hf with the family's config.json, the tokenizer files
    beside them, and the tokenizer's BOS and EOS ids in config.json. Written beside `folder`, renamed when whole."""
    tmp = folder.rstrip("/") + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(memory.random_model(args, "cpu", torch.bfloat16, seed=seed), None, tmp, verbose=False)
    cfg = files.read_json(os.path.join(tmp, "config.json"))
    bos, eos = write_tokenizer(tmp, cfg["model_type"])
    files.write_json(os.path.join(tmp, "config.json"), cfg | {"bos_token_id": bos, "eos_token_id": eos})
    os.rename(tmp, folder)


# a family's special tokens in its tokenizer.json: its BOS (Qwen2 has none), its EOS (an instruct model's end of
# turn) and others it has
SPECIAL = {"llama": ("<|begin_of_text|>", "<|eot_id|>",
                     ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>")),
           "qwen2": (None, "<|im_end|>", ("<|endoftext|>", "<|im_start|>"))}


def write_tokenizer(folder: str, model_type: str, vocab_size: int = 512) -> tuple:
    """a byte-level BPE tokenizer.json learned from the demo's text (vocab_size tokens, specials first) and
    tokenizer_config.json naming its special tokens, as `model_type`'s family has them -> (BOS id or None, EOS id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bos, eos, other = SPECIAL[model_type]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    with open(os.path.join(ROOT, "demo", "train.jsonl")) as f:
        texts = [" ".join(json.loads(line).values()) for line in f]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                      special_tokens=[t for t in (bos, eos, *other) if t],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:  # (the tokenizer puts it before every text: tokenizer.TokenizerJSON reads it from there)
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    tk.save(os.path.join(folder, "tokenizer.json"))
    files.write_json(os.path.join(folder, "tokenizer_config.json"), {"bos_token": bos, "eos_token": eos})
    return None if bos is None else tk.token_to_id(bos), tk.token_to_id(eos)


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
    ap.add_argument("--dir", required=True, help="a folder with room for the checkpoint (14 GB for LLaMA 2 7B, "
                                                 "twice that while merge.py's export exists)")
    ap.add_argument("--preset", default="7B", choices=list(PRESETS), help="the model's shapes (llama.PRESETS)")
    ap.add_argument("--layers", type=int, help="the first N layers at the preset's width (default: all of them)")
    ap.add_argument("--density", type=float, help="SpIEL budget as train.py's --density (default: the paper's, "
                                                  "as many deltas as LoRA rank 64 trains)")
    ap.add_argument("--threads", type=int, help="CPU threads for every process (default: torch's)")
    ap.add_argument("--bases", nargs="+", default=["int8", "nf4"], choices=["int8", "nf4"])
    ap.add_argument("--methods", nargs="+", default=["spiel-ag", "spiel-ma"], choices=["spiel-ag", "spiel-ma"])
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--checkpoint-only", action="store_true", help="write the checkpoint and stop (e.g. for "
                                                                   "train.py --ckpt on a GPU: docs/gpu.md)")
    a = ap.parse_args(argv)
    shape = ModelArgs(**(PRESETS[a.preset].__dict__ | {"n_layers": a.layers or PRESETS[a.preset].n_layers}))
    name = memory.model_name(a.preset)
    ckpt = os.path.join(os.path.abspath(a.dir), f"{name.lower().replace(' ', '-')}-shaped-{shape.n_layers}-layers")
    if not any(os.path.isfile(os.path.join(ckpt, f)) for f in ("params.json", "config.json")):
        t0 = time.time()
        print(f"writing a random checkpoint of {name}'s shapes ({shape.n_layers} layers) to {ckpt}", flush=True)
        write_checkpoint(ckpt, shape)
        print(f"  written in {time.time() - t0:.0f}s", flush=True)
    if a.checkpoint_only:
        print(f"checkpoint: {ckpt}")
        return 0
    budget = ["--density", str(a.density)] if a.density else []
    report = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "preset": a.preset,
              "layers": shape.n_layers, "threads": a.threads or torch.get_num_threads(), "runs": {}}
    for base in a.bases:
        for method in a.methods:
            out = os.path.join(a.dir, "runs", f"{method}-{base}")
            shutil.rmtree(out, ignore_errors=True)
            first = run("train.py", ["--ckpt", ckpt, "--out", out, "--method", method, "--quantize", base, *TRAIN,
                                     *budget, "--stop-at-step", "2"], a.threads)
            resumed = run("train.py", ["--out", out, "--resume", "--stop-at-step", "3"], a.threads)
            est = memory.estimate(shape, method, base, 64, 1, True, a.density, dtype=torch.float32, device="cpu")
            report["runs"][f"{method}, {base}"] = {
                "peak_gb": max(first["peak_gb"], resumed["peak_gb"]), "estimate_gb": est["total"] / 1e9,
                "estimate": est, "first_peak_gb": first["peak_gb"], "resumed_peak_gb": resumed["peak_gb"],
                **timings(out, first["output"], (1, 2)),
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

    print(f"\nfull-size check: {name} shapes, {shape.n_layers} layers, {report['machine']}, "
          f"{report['threads']} threads; 1 x 64 tokens per step, gradient checkpointing, fp32 compute")
    print("| method, base | load s | step s (1, 2, 3) | reselection s | peak GB, measured | estimate (memory.py) "
          "| measured / estimate |\n|---|---:|---|---:|---:|---:|---:|")
    for run_name, r in report["runs"].items():
        steps = ", ".join(f"{s:.0f}" for s in [*r["step_s"].values(), *r["resumed"]["step_s"].values()])
        print(f"| {run_name} | {r['load_s']:.0f} | {steps} | {sum(r['reselect_s'].values()):.0f} | {r['peak_gb']:.2f} "
              f"| {r['estimate_gb']:.2f} | {r['peak_gb'] / r['estimate_gb']:.2f} |")
    print(f"generate.py (int8 base + delta, 4 tokens): {gen['seconds']:.0f}s, peak {gen['peak_gb']:.2f} GB; "
          f"merge.py (bf16 export): {mrg['seconds']:.0f}s, peak {mrg['peak_gb']:.2f} GB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
