"""
Fine-tune LLaMA 2 with SpIEL (Ansell et al. 2024, arXiv 2401.16405), or with LoRA or full fine-tuning as
baselines: the same data, loop, schedule and logging for all four methods.

    python train.py                                   # the demo: a tiny LLaMA on the CPU, nothing downloaded
    python train.py --ckpt llama-2-7b --data my.jsonl --quantize int8 --grad-checkpoint
    python train.py --out runs/x --resume             # continue an interrupted run exactly (runs.py)
    torchrun --nproc_per_node 4 train.py --ckpt llama-2-13b --data my.jsonl --fsdp

The loop (section 3 of the paper): every step, update the trainable part; every --reselect-every steps,
drop the smallest deltas and regrow as many new positions (SpIEL-AG: by gradients accumulated over a
short window; SpIEL-MA: by SM3's row x column accumulators). Look for "drop and regrow" below.
"""

import os

# idle torch threads sleep instead of spinning: beside another PyTorch process on the same cores, spinning
# threads made the demo 40x slower (docs/bench.md). set before torch starts its threads, so the imports follow
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import json
import math
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist

import data
import lora
import runs
import spiel
from generate import answer, exact_match
from llama import (IGNORE_INDEX, CheckpointError, Tokenizer, base_fingerprint, check_checkpoint, default_device,
                   default_dtype, find_tokenizer, load_model, matrix_shape, target_linears)
from runs import BELOW_1, COUNT, FRACTION, NONNEG, NONNEG_INT, POSITIVE, Parser
from sm3 import SM3

HERE = os.path.dirname(os.path.abspath(__file__))
# `python train.py` with no arguments runs exactly this: the tiny base demo.py pre-trained on two string
# tasks, fine-tuned on a third (under a minute on 2 CPU cores)
DEMO_ARGS = ["--ckpt", os.path.join(HERE, "demo", "base"), "--data", os.path.join(HERE, "demo", "train.jsonl"),
             "--val-data", os.path.join(HERE, "demo", "val.jsonl"), "--method", "spiel-ag", "--density", "0.05",
             "--lr", "3e-3", "--seq-len", "96", "--batch-size", "16", "--grad-accum", "1", "--max-steps", "400",
             "--eval-every", "100", "--exact-match", "100", "--device", "cpu", "--threads", "1"]
# peak learning rates by method when --lr is not given: the paper's for LLaMA 2 (section 4.2)
DEFAULT_LR = {"spiel-ag": 1e-5, "spiel-ma": 1e-3, "lora": 1e-4, "full": 2e-5}
# SpIEL-AG's weight decay: the authors' 30 at their lr 1e-5 shrinks every delta by lr x wd = 3e-4 per step at
# the peak. when --weight-decay is not given, any --lr keeps that shrink (wd = 3e-4 / lr); the others: 0
AG_DECAY_PER_STEP = 3e-4

# -----------------------------------------------------------------------------
# arguments: the only place a default lives


def get_parser() -> Parser:
    ap = Parser(prog="train.py", description=__doc__)
    a = ap.add_argument
    # model and data
    a("--ckpt", help="LLaMA 2 checkpoint folder, Meta or Hugging Face layout (omit all arguments for the demo)")
    a("--data", help="training data, .jsonl or .json: Alpaca, prompt/completion or chat 'messages' records")
    a("--val-data", help="validation data; default: --val-frac of --data")
    a("--val-frac", type=BELOW_1, default=0.05, help="fraction of --data held out when --val-data is not given")
    a("--seq-len", type=COUNT, default=2048, help="examples are truncated to this many tokens")
    # method and budget
    a("--method", default="spiel-ag", choices=["spiel-ag", "spiel-ma", "lora", "full"])
    a("--density", type=FRACTION, help="SpIEL budget as a fraction of the targeted weights")
    a("--num-tunable", type=COUNT, help="SpIEL budget as a number of deltas")
    a("--match-lora-rank", type=COUNT, help="SpIEL budget: as many deltas as LoRA at this rank trains (default "
                                            "when no budget is given: 64, the paper's)")
    a("--lora-rank", type=COUNT, default=64, help="LoRA rank (--density/--num-tunable set one to match instead)")
    a("--lora-alpha", type=POSITIVE, default=16.0)
    a("--lora-dropout", type=BELOW_1, default=0.1)
    # reselection (SpIEL)
    a("--reselect-every", type=COUNT, default=20, help="steps between drop-and-regrow")
    a("--first-reselect", type=COUNT, default=5, help="step of the first reselection (replaces all deltas); "
                                                      "also the AG accumulation window length")
    a("--reselect-rate", type=FRACTION, default=0.2, help="fraction replaced at a reselection, decaying to 0")
    a("--reselect-decay", default="linear", choices=["linear", "cosine"])
    a("--grad-path", default="auto", choices=["auto", "dense", "sparse"],
      help="SpIEL value gradient: dense dW then gather, or only the needed entries (auto: the faster, measured)")
    a("--sm3-momentum", type=BELOW_1, default=0.0, help="SpIEL-MA: SM3 momentum (0 keeps SM3's memory small)")
    # optimization
    a("--lr", type=POSITIVE, help=f"peak learning rate (default by method: {DEFAULT_LR})")
    a("--weight-decay", type=NONNEG, help=f"decoupled weight decay (default: {AG_DECAY_PER_STEP:g} / lr for "
                                          "spiel-ag, the authors' 30 at lr 1e-5; 0 for the others)")
    a("--warmup", type=NONNEG, default=0.03, help="linear warmup: a fraction of the steps if < 1, else steps")
    a("--grad-clip", type=NONNEG, default=0.0, help="clip the gradient norm (0: off, as the authors)")
    a("--batch-size", type=COUNT, default=1, help="examples per micro-batch")
    a("--grad-accum", type=COUNT, default=128, help="micro-batches per step and process (paper: 128 sequences)")
    a("--epochs", type=POSITIVE, default=2.0)
    a("--max-steps", type=COUNT, help="optimizer steps (overrides --epochs; with --resume: extends the run)")
    # system
    a("--quantize", default="none", choices=["none", "int8", "nf4"], help="store the frozen base quantized")
    a("--dtype", choices=["float32", "bfloat16"], help="base and compute dtype (default: bf16 on a GPU that has "
                                                      "it, else fp32); deltas and optimizer state stay fp32")
    a("--device", default=default_device())
    a("--threads", type=COUNT, help="CPU threads (default: torch's, one per core)")
    a("--grad-checkpoint", action="store_true", help="recompute each block in backward (less activation memory)")
    a("--fsdp", action="store_true", help="under torchrun: shard the frozen base (full: all weights) per block")
    a("--seed", type=NONNEG_INT, default=0)
    # output, evaluation, resume
    a("--out", help="output folder (default runs/<method>-<time>); an existing run is never overwritten")
    a("--resume", action="store_true", help="continue the run in --out (with its saved arguments)")
    a("--save-every", type=COUNT, default=200, help="steps between checkpoints (and at the end)")
    a("--eval-every", type=NONNEG_INT, default=100, help="steps between validation loss + one sample (0: off)")
    a("--log-every", type=COUNT, default=10, help="steps between progress lines when stdout is not a terminal")
    a("--exact-match", type=NONNEG_INT, default=0, help="score this many validation answers by greedy exact match "
                                                        "before and after training (single-turn data)")
    a("--stop-at-step", type=COUNT, help="stop after this step as if interrupted (resumable)")
    return ap


# -----------------------------------------------------------------------------
# the trainable part: one setup for train.py, memory.py and bench.py


def add_trainable(model, a, total_steps: int = 1) -> tuple:
    """the trainable part of `model` for a.method, its optimizer, and (SpIEL) the Selector that moves the
    deltas. -> (params, optimizer, selector or None)"""
    lr = a.lr or DEFAULT_LR[a.method]
    wd = a.weight_decay if a.weight_decay is not None else AG_DECAY_PER_STEP / lr if a.method == "spiel-ag" else 0.0
    budget = {"density": a.density, "num_tunable": a.num_tunable, "lora_rank": a.match_lora_rank}
    if a.method in ("spiel-ag", "spiel-ma"):
        if all(v is None for v in budget.values()):
            budget["lora_rank"] = 64  # the paper's budget: as many deltas as LoRA rank 64 trains
        layers = spiel.add_sparse_deltas(model, **budget, seed=a.seed)
        spiel.set_grad_path(model, a.grad_path)
        params = [layer.values for layer in layers.values()]
        if a.method == "spiel-ag":
            optimizer = spiel.AdamW(params, lr=lr, weight_decay=wd)
        else:
            optimizer = SM3(params, lr=lr, momentum=a.sm3_momentum, weight_decay=wd,
                            positions={m.values: (m.indices, m.weight_shape) for m in layers.values()})
        schedule = spiel.Schedule(total_steps, a.reselect_every, a.first_reselect, a.reselect_rate, a.reselect_decay)
        return params, optimizer, spiel.Selector(model, a.method[-2:], schedule, optimizer)
    if a.method == "lora":
        rank = a.lora_rank
        if a.density is not None or a.num_tunable is not None:  # match a SpIEL budget
            n_targeted = sum(math.prod(matrix_shape(m)) for m in target_linears(model).values())
            rank = lora.rank_for_budget(model, a.num_tunable or round(a.density * n_targeted))
        lora.add_lora(model, rank, a.lora_alpha, a.lora_dropout, seed=a.seed)
        params = [p for p in model.parameters() if p.requires_grad]
    else:  # full fine-tuning
        params = list(model.requires_grad_(True).parameters())
    # every element has the same age here: torch's AdamW (betas 0.9/0.999, eps 1e-8, as the authors' trainer)
    return params, torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False), None


# -----------------------------------------------------------------------------
# helpers: the learning rate, evaluation, processes, interruption


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """linear warmup to the peak, then linear decay (the last step gets peak / (total - warmup))."""
    warm = warmup * total if warmup < 1 else warmup
    return peak * step / warm if step <= warm else peak * (total - step + 1) / max(total - warm, 1)


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device) -> float:
    """mean loss per answer token over (up to 500) validation examples."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, min(len(examples), 500), batch_size):
        x, y = data.collate(examples[i:i + batch_size], pad_id)
        total += model(x.to(device), y.to(device), reduction="sum")[1].item()
        n += int((y != IGNORE_INDEX).sum())
    model.train()
    return total / max(n, 1)


def setup_distributed(device: str) -> tuple:
    """torchrun's environment -> (rank, world size, this process's device); NCCL on CUDA, gloo on the CPU."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard(model, params, full: bool):
    """--fsdp: each transformer block's frozen weights sharded across the processes (FSDP2, fully_shard per
    block); the trainable deltas / adapters stay whole on every process. Full fine-tuning shards everything
    (FSDP then averages its gradients over the processes; the loop scales its loss to make that a sum)."""
    from torch.distributed.fsdp import fully_shard
    for layer in spiel.delta_layers(model).values():  # a sharded base cannot hold W0 + delta (spiel.py 9)
        layer.resident = False
    for module in [*model.layers, model]:
        fully_shard(module, ignored_params=None if full else set(params))


STOP = []  # the first Ctrl-C finishes the step, saves and exits; a second one exits at once


def on_sigint(*_):
    if STOP:
        raise SystemExit("quit without saving; the last checkpoint is intact")
    STOP.append(1)
    print("\ninterrupted: finishing this step, saving, exiting (Ctrl-C again to quit at once)", file=sys.stderr)


# -----------------------------------------------------------------------------


def main(argv):
    demo = not argv
    args = runs.resolve_args(get_parser(), DEMO_ARGS if demo else argv)
    if args.quantize != "none" and args.method == "full":
        raise SystemExit("error: full fine-tuning needs a full-precision base (drop --quantize)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)  # only rank 0 prints and writes
    if demo:
        say("demo: python train.py " + " ".join(os.path.relpath(x, HERE) if x.startswith(HERE) else x for x in DEMO_ARGS))
    check_checkpoint(args.ckpt)  # a missing or broken checkpoint is reported before anything slow
    if not args.resume and rank == 0:
        runs.prepare(args)  # until its first checkpoint, the folder can be started over
    torch.manual_seed(args.seed + rank)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)

    # --- data ---------------------------------------------------------------------------------------------------
    tok = Tokenizer(find_tokenizer(args.ckpt))
    if args.resume and args.data_sha256 and runs.sha256(args.data) != args.data_sha256:
        raise CheckpointError(f"{args.data}: not the data this run trained on (its sha256 differs)")
    train_set, val_set, dropped = data.load_splits(args.data, args.val_data, args.val_frac, tok, args.seq_len, args.seed)
    if dropped:
        say(f"data: dropped {dropped} examples left with no answer token after truncation to {args.seq_len}")
    per_step = args.batch_size * args.grad_accum * world
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(train_set) / per_step))
    say(f"data: {len(train_set)} training / {len(val_set)} validation examples, "
        f"{sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in train_set) / len(train_set):.1f} answer tokens per example; "
        f"{per_step} examples per step ({world} process{'es' * (world > 1)}), {total_steps} steps")

    # --- model and the trainable part -----------------------------------------------------------------------------
    t0 = time.time()
    model = load_model(args.ckpt, device=device, dtype=dtype, quantize=None if args.quantize == "none" else args.quantize)
    say(f"model: {args.ckpt} ({model.layout} layout, {model.args.n_layers} layers, dim {model.args.dim}) loaded in "
        f"{time.time() - t0:.1f}s as {dtype}" + (f", base quantized to {args.quantize}" if args.quantize != "none" else ""))
    model.grad_checkpoint = args.grad_checkpoint
    fingerprint = base_fingerprint(model)  # of weights fine-tuning never changes: a resume checks it
    n_base = sum(p.numel() for p in model.parameters()) + sum(math.prod(m.weight_shape) for m in model.modules()
                                                               if hasattr(m, "dequantize"))
    if runs.full_fsdp(args):  # sharded first: the optimizer must hold the sharded weights
        shard(model, [], full=True)
    params, optimizer, selector = add_trainable(model, args, total_steps)
    n_trainable = sum(p.numel() for p in params)
    lr, wd = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]
    say(spiel.budget_summary(model) if selector else f"{args.method}: {len(params)} trainable tensors")
    say(f"trainable: {n_trainable:,} of {n_base:,} parameters ({n_trainable / n_base:.3%}); lr {lr:g}, weight decay "
        f"{wd:g}, gradient clipping {args.grad_clip or 'off'}")
    density = n_trainable / sum(math.prod(m.weight_shape) for m in selector.layers.values()) if selector else 0
    if density > 0.1 and args.density is None and args.num_tunable is None:
        say(f"warning: this budget is {density:.0%} of the targeted weights (the paper's is 2.5% on 7B: LoRA rank 64 "
            f"matched); on a small model pass --density (e.g. 0.05) or a smaller --match-lora-rank")
    if args.fsdp and not runs.full_fsdp(args):
        shard(model, params, full=False)

    # --- resume, or evaluate the base -------------------------------------------------------------------------------
    batches = data.Batches(train_set, args.batch_size, args.seed)
    start = 1
    if args.resume:
        start = runs.load_state(args, model, optimizer, selector, batches, rank, world, fingerprint) + 1
        if start > total_steps:
            say(f"{args.out} already finished at step {start - 1}; extend it with --resume --max-steps N (N > {start - 1})")
            return 0
        say(f"resumed {args.out} at step {start} of {total_steps}")
        if rank == 0:
            runs.write_args(args)  # an extension or a moved input is now the run's
    log = runs.Log(os.path.join(args.out, "log.jsonl") if rank == 0 else None)
    if start == 1 and val_set and (args.eval_every or args.exact_match):
        val_loss = evaluate(model, val_set, args.batch_size, tok.eos_id, device)
        say(f"validation loss before fine-tuning: {val_loss:.4f}")
        log({"event": "eval", "step": 0, "val_loss": val_loss})
        if args.exact_match:
            em = exact_match(model, tok, val_set, args.exact_match)
            say(f"exact match before fine-tuning: {em:.1%} of {min(args.exact_match, len(val_set))} held-out answers")
            log({"event": "exact_match", "step": 0, "exact_match": em})

    # --- the training loop ---------------------------------------------------------------------------------------------
    signal.signal(signal.SIGINT, on_sigint)
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start - 1, dynamic_ncols=True, disable=rank > 0 or not sys.stdout.isatty())
    note = bar.write if rank == 0 else (lambda *a: None)
    model.train()
    t_start, tokens_seen, last_saved = time.time(), 0, start - 1
    for step in range(start, total_steps + 1):
        t_step = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, lr, args.warmup)
        if selector:
            selector.begin_step(step)  # SpIEL-AG: this step's gradients also feed the accumulation window
        # the step's micro-batches (all processes'): the loss is normalised by all of their answer tokens
        micro = [batches.next() for _ in range(args.grad_accum * world)]
        n_targets = sum(int((y != IGNORE_INDEX).sum()) for mb in micro for _, y, _ in mb)
        tokens_seen += sum(len(x) for mb in micro for x, _, _ in mb)  # non-padding tokens
        loss_sum, scale = torch.zeros((), device=device), world if runs.full_fsdp(args) else 1  # (FSDP averages)
        for examples in micro[rank * args.grad_accum:(rank + 1) * args.grad_accum]:  # this process's share
            x, y = data.collate(examples, tok.eos_id)
            _, loss = model(x.to(device), y.to(device), reduction="sum")
            (loss * scale / n_targets).backward()
            loss_sum += loss.detach()
        if world > 1:  # data parallel: the step's gradient is the sum of every process's share
            for p in params if not runs.full_fsdp(args) else []:  # (FSDP sums the sharded ones itself)
                dist.all_reduce(p.grad)
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / n_targets
        if not math.isfinite(train_loss):
            print(f"\nerror: step {step}: the loss is {train_loss}; stopping. The last checkpoint in {args.out} "
                  f"(step {last_saved}) is intact; try a lower --lr.", file=sys.stderr)
            return 1
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf))
        if selector:  # SpIEL-AG: the window keeps the step's gradient as clipping scaled it
            selector.end_step(min(1.0, args.grad_clip / (grad_norm + 1e-6)) if args.grad_clip else 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # --- drop and regrow (SpIEL section 3): the smallest deltas make room for new positions ----------------------
        if selector and selector.schedule.is_reselection(step):
            changed = selector.reselect(step)
            k, n = sum(m.indices.numel() for m in selector.layers.values()), sum(changed.values())
            note(f"step {step}: reselection replaced {n:,} of {k:,} deltas ({n / k:.1%}; scheduled "
                 f"{selector.schedule.fraction(step):.1%})")
            log({"event": "reselect", "step": step, "changed": n, "of": k, "by_matrix": changed})

        tok_s, lr_now = tokens_seen / (time.time() - t_start), lr_at(step, total_steps, lr, args.warmup)
        log({"step": step, "loss": train_loss, "lr": lr_now, "grad_norm": grad_norm, "step_time": time.time() - t_step,
             "tokens_per_s": tok_s})
        bar.update()
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tok_s:.0f}")
        if bar.disable and (step % args.log_every == 0 or step == total_steps):  # a log file: a plain line
            say(f"step {step}/{total_steps}: loss {train_loss:.4f}, lr {lr_now:.2e}, {tok_s:.0f} tokens/s", flush=True)
        if args.eval_every and val_set and (step % args.eval_every == 0 or step == total_steps):
            val_loss = evaluate(model, val_set, args.batch_size, tok.eos_id, device)
            _, _, (system, turns) = val_set[0]
            sample = answer(model, tok, system, turns[0][0], 64)
            note(f"step {step}: validation loss {val_loss:.4f} | {turns[0][0][:60]!r} -> {sample[:80]!r}")
            log({"event": "eval", "step": step, "val_loss": val_loss, "sample": sample})
        stop = bool(STOP) or step == args.stop_at_step
        if step % args.save_every == 0 or step == total_steps or stop:
            runs.save_state(args, step, model, optimizer, selector, batches, rank, world, fingerprint)
            last_saved = step
        if stop:
            bar.close()
            say(f"stopped after step {step}; continue with: python train.py --out {args.out} --resume")
            return 130 if STOP else 0
    bar.close()
    finish(args, model, tok, val_set, time.time() - t_start, tokens_seen, start, total_steps, device, rank, say, log)
    say("to fine-tune LLaMA 2 7B the same way on one GPU:\n  python train.py --ckpt llama-2-7b --data your.jsonl "
        "--quantize int8 --grad-checkpoint   (see README.md)") if demo else None
    return 0


def finish(args, model, tok, val_set, elapsed, tokens_seen, start, total_steps, device, rank, say, log):
    """the end of a run: what it cost, what it gave, where it is, and how to sample from it."""
    cuda = device.startswith("cuda")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    say(f"done: {total_steps - start + 1} steps in {elapsed:.0f}s, {tokens_seen / elapsed:.0f} tokens/s, peak "
        f"{'GPU memory allocated' if cuda else 'RSS'} {peak:.2f} GB")
    log({"event": "end", "seconds": elapsed, "tokens_per_s": tokens_seen / elapsed, "peak_memory_gb": peak})
    if args.method == "full":
        from merge import save_hf
        sd = None
        if runs.full_fsdp(args):  # the whole model, gathered on rank 0
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            save_hf(model, tok.path, os.path.join(args.out, "model"), state_dict=sd)
    if args.exact_match and val_set:
        em = exact_match(model, tok, val_set, args.exact_match)
        say(f"exact match after fine-tuning: {em:.1%} of {min(args.exact_match, len(val_set))} held-out answers")
        log({"event": "exact_match", "step": total_steps, "exact_match": em})
    artifact = os.path.join(args.out, {"lora": "lora.safetensors", "full": "model"}.get(args.method, "delta.safetensors"))
    prompt = val_set[0][2][1][0][0] if val_set else "..."
    say(f"saved {artifact}; sample with: python generate.py --ckpt " + (f"{artifact} " if args.method == "full" else
        f"{args.ckpt} --delta {artifact} ") + f"--chat --temperature 0 --prompt {json.dumps(prompt)}")


def cli(argv):
    """the command line: a bad input or an interruption ends in one line on stderr, never a traceback."""
    try:
        sys.exit(main(argv))
    except (CheckpointError, data.DataError, ValueError, FileExistsError, spiel.RanksDisagree) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was saved: run the same command again", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli(sys.argv[1:])
