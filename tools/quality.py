"""
How well each method learns, and what it makes the base forget: every method at its best learning rate of a
small grid, several seeds, on the two fixtures tools/build_demo.py builds (demo/ and demo/transfer/).

    python tools/quality.py                      # the study (about 2 hours on 2 cores)
    python tools/quality.py --quality-steps 300 --seeds 0

"learned": held-out exact match on the fine-tuning task; "retained": exact match on held-out examples of what
the base was pre-trained on (what fine-tuning made it forget). The lr is chosen on the first half of val.jsonl
("dev") and the numbers are reported on the second half ("test"). The plain-loop rows train the same adapter /
model with a 30-line loop that shares nothing with train.py but the model code.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
import chat  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import files  # noqa: E402
import finetune  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402
from generate import exact_match  # noqa: E402
import tokenizer  # noqa: E402
from llama import PROJECTIONS, Transformer, load_model, matrix_shape, read_shapes, \
    target_linears  # noqa: E402
from merge import save_hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def n_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


FIXTURES = {"demo": os.path.join(ROOT, "demo"), "transfer": os.path.join(ROOT, "demo", "transfer")}


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
ABLATION = {"spiel-ag+clip1": ("spiel-ag", ["--grad-clip", "1"]),
            "spiel-ag+wd30": ("spiel-ag", ["--weight-decay", "30"]),
            "spiel-ma+clip1": ("spiel-ma", ["--grad-clip", "1"]), "lora+clip1": ("lora", ["--grad-clip", "1"])}
BEST_300 = {"spiel-ag": {"demo": (3e-3,), "transfer": (1e-2,)}, "spiel-ma": {"demo": (3e-2,), "transfer": (0.1,)},
            "lora": {"demo": (3e-3,), "transfer": (1e-2,)}}
QUALITY.update({name: (QUALITY[base][0] + extra, BEST_300[base]) for name, (base, extra) in ABLATION.items()})

# --ablations: what SpIEL's choices earn, each variant at its method's best 300-step lr (not tuned again)
#   regrowth: the method's criterion, random positions (--regrow random), the support fixed after the first
#   reselection (--reselect-every 0), and both: a random support that stays (as random-support sparse
#   fine-tuning, SpaRTA, arXiv 2502.15975)
#   targets: all seven projections, attention only, MLP only, at one number of trainable parameters: LoRA rank 4's
#   on all seven (SpIEL: --num-tunable; LoRA on fewer matrices: the largest rank within it, alpha / r = 2)
REGROWTH = {"": [], "+random": ["--regrow", "random"], "+fixed": ["--reselect-every", "0"],
            "+random+fixed": ["--regrow", "random", "--reselect-every", "0"]}


def per_rank(targets: str) -> int:
    """in + out summed over the targeted matrices of the fixtures' base (demo/ and demo/transfer/ share shapes)."""
    with torch.device("meta"):
        model = Transformer(read_shapes(fixture_files("demo")["ckpt"]))
    return sum(sum(matrix_shape(m)) for m in target_linears(model, config.parse_targets(targets).split(",")).values())


def ablation_variants() -> dict:
    """name -> (train.py flags, the lr per fixture), registered in QUALITY; and name -> (method, regrowth,
    targets, trainable parameters) for the table."""
    n_all, rows = Q_RANK * per_rank("all"), {}
    for m in ("spiel-ag", "spiel-ma"):
        for suffix, extra in REGROWTH.items():
            if suffix:  # (the criterion on all targets: the study's own run of the method)
                QUALITY[m + suffix] = (QUALITY[m][0] + extra, BEST_300[m])
            rows[m + suffix] = (m, suffix.strip("+").replace("+", ", ") or "criterion", "all", n_all)
    rows["lora"] = ("lora", "-", "all", n_all)
    for t in ("attention", "mlp"):
        for m in ("spiel-ag", "spiel-ma"):
            QUALITY[f"{m}@{t}"] = (["--method", m, "--num-tunable", str(n_all), "--targets", t], BEST_300[m])
            rows[f"{m}@{t}"] = (m, "criterion", t, n_all)
        r = n_all // per_rank(t)
        QUALITY[f"lora@{t}"] = (["--method", "lora", "--lora-rank", str(r), "--lora-alpha", str(2 * r), "--targets",
                                 t], BEST_300["lora"])
        rows[f"lora@{t}"] = ("lora", "-", t, r * per_rank(t))
    return rows


def ablations(a) -> dict:
    rows = ablation_variants()
    lr = {(fx, name): BEST_300[method][os.path.basename(fx.rstrip("/"))][0] for fx in a.fixtures
          for name, (method, *_) in rows.items()}
    steps = a.quality_steps[0]  # (300 by default)
    jobs = [(fx, name, lr[fx, name], seed, steps) for fx in a.fixtures for name in rows for seed in a.seeds]
    with ThreadPoolExecutor(a.jobs) as pool:
        scores = dict(zip(jobs, pool.map(lambda j: quality_job(a, *j), jobs)))
    print(f"\nablations: {steps} steps, {len(a.seeds)} seeds, held-out exact match %, mean ± std (per seed)\n"
          "| fixture | method | regrowth | targets | trainable | lr | learned (test) | retained |\n"
          "|---|---|---|---|---|---|---|---|")
    report = {}
    for fx in a.fixtures:
        for name, (method, regrow, targets, n) in rows.items():
            runs = [(seed, scores[j]) for j in jobs if j[0] == fx and j[1] == name for seed in [j[3]]]
            if any("error" in r for _, r in runs):
                print(f"| {fx} | {method} | {regrow} | {targets} | {n:,} | | failed: {runs[0][1].get('error')} | |")
                continue
            cell = {k: [100 * r[k] for _, r in runs] for k in ("test", "retained")}
            report[f"{fx}/{name}"] = {"method": method, "regrowth": regrow, "targets": targets, "trainable": n,
                                      "lr": lr[fx, name], "seeds": [seed for seed, _ in runs], **cell}
            def fmt(v):
                each = " / ".join(f"{x:.0f}" for x in v)
                return f"{statistics.fmean(v):.0f} ± {statistics.pstdev(v):.0f} ({each})"
            print(f"| {os.path.basename(fx.rstrip('/'))} | {method} | {regrow} | {targets} | {n:,} | "
                  f"{lr[fx, name]:g} | {fmt(cell['test'])} | {fmt(cell['retained'])} |")
    return {"mode": "ablations", "steps": steps, "seeds": a.seeds, "rank": Q_RANK, "common": Q_COMMON,
            "results": report}


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
    tok = tokenizer.load(fx["ckpt"])
    model = load_model(fx["ckpt"], dtype=torch.float32).train()
    if method == "plain-lora":
        base = finetune.base_of(model, fx["ckpt"])
        lora.add_lora(model, PROJECTIONS, Q_RANK, alpha=2 * Q_RANK, dropout=0.1, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad] or list(model.requires_grad_(True).parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    seqs = []
    for rec in map(json.loads, open(fx["data"])):
        p = tok.encode(chat.user_text(rec["instruction"]))  # BOS + the prompt, as generation sees it
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
        finetune.save(model, os.path.join(out, "lora.safetensors"), base)
    else:
        save_hf(model, fx["ckpt"], os.path.join(out, "model"))


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
    fx = fixture_files(fixture)
    if os.path.isdir(os.path.join(out, "model")):
        model = load_model(os.path.join(out, "model"), dtype=torch.float32)
    else:
        model = load_model(fx["ckpt"], dtype=torch.float32)
        path = next(p for p in (os.path.join(out, f) for f in ("delta.safetensors", "lora.safetensors"))
                    if os.path.isfile(p))
        if other_version:  # its base fingerprint may be computed otherwise; the fixture's base is the same
            path = without_fingerprint(path)
        finetune.load(model, path, finetune.base_of(model, fx["ckpt"]))
    tok = tokenizer.load(fx["ckpt"])
    template = chat.Tulu(tok)  # (the fixtures' tokenizers have no template of their own)
    val, _ = data.load_examples(fx["val"], tok, template, 96)
    retain, _ = data.load_examples(fx["retain"], tok, template, 96)
    half = len(val) // 2
    return {"dev": exact_match(model, template, val[:half], half),
            "test": exact_match(model, template, val[half:], half),
            "retained": exact_match(model, template, retain, len(retain)),
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
            raise SystemExit(f"error: {a.lr_from}: not a tools/quality.py result ({e})") from None
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
                table.append(f"| {steps} | {os.path.basename(fx.rstrip('/'))} | {m} | {best:g} | {cell('test')} | "
                             f"{cell('retained')} | {ms('val_loss')[0]:.3f} | {lrs} |")
    print(f"\nquality: {len(a.seeds)} seeds, mean ± std (%) of held-out exact match at each method's best lr "
          f"(chosen on dev)\n| steps | fixture | method | best lr | learned (test) | retained | val loss | "
          f"dev EM (%) per lr of the grid |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    return {"mode": "quality", "seeds": a.seeds, "rank": Q_RANK, "common": Q_COMMON, "results": report}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--json", help="write every number here (default: quality.json)")
    a("--runs-dir", default=os.path.join(ROOT, "runs", "quality"), help="where the runs write (cached: a finished "
      "run is scored once)")
    a("--fixtures", nargs="+", default=list(FIXTURES), help=f"{' or '.join(FIXTURES)}, or a folder laid out alike")
    a("--quality-methods", nargs="+", default=[m for m in QUALITY if m not in ABLATION], choices=list(QUALITY))
    a("--ablations", action="store_true", help="the ablation table instead: regrowth and targets, 300 steps")
    a("--quality-steps", type=int, nargs="+", default=[300, 1000], help="a short and a long run")
    a("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a("--lr-from", help="a tools/quality.py JSON: run each method only at the best lr found there (a long run)")
    a("--jobs", type=int, default=n_cores(), help="runs at once (each on one thread)")
    a("--train-py", default=os.path.join(ROOT, "train.py"), help="the train.py the study runs (e.g. an older "
      "version's, for a before / after table)")
    # internal: one plain-loop run / score, in a fresh process
    for flag in ("--plain", "--score", "--fixture", "--out"):
        a(flag, help=argparse.SUPPRESS)
    a("--lr", type=float, help=argparse.SUPPRESS)
    a("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain:
        plain_loop(args.fixture, args.plain, args.lr, args.seed, args.steps, args.out)
        return 0
    if args.score:  # (a run of another version's train.py: --train-py names it)
        other = not os.path.samefile(args.train_py, os.path.join(ROOT, "train.py"))
        files.write_json(os.path.join(args.score, "score.json"), score(args.fixture, args.score, other))
        return 0
    os.makedirs(args.runs_dir, exist_ok=True)
    t0 = time.time()
    res = ablations(args) if args.ablations else quality(args)
    res["seconds"] = time.time() - t0
    path = args.json or f"{res['mode']}.json"
    files.write_json(path, res)
    print(f"wrote {path} ({res['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
