"""
Fine-tune LLaMA 2 with SpIEL (Ansell et al. 2024, arXiv 2401.16405), or with LoRA or full
fine-tuning as baselines: the same data, loop, schedule and logging for all four methods.

    python train.py                             # the demo: a tiny LLaMA on a CPU, no download
    python train.py --ckpt llama-2-7b --data my.jsonl --quantize int8 --grad-checkpoint
    python train.py --out runs/x --resume       # continue an interrupted run exactly
    torchrun --nproc_per_node 4 train.py --ckpt llama-2-13b --data my.jsonl --fsdp

Top to bottom: the trainable part (add_trainable), one optimizer step with SpIEL's drop and regrow
(train_step: every few steps the smallest deltas are dropped and as many new positions grown, chosen
by gradients accumulated over a short window (SpIEL-AG) or by SM3's row x column accumulators
(SpIEL-MA)), then a run: data, model, resume, the loop, the end. Every knob and its default:
config.py (python train.py --help); the run folder and resume: runs.py.
"""

import math
import os
import shlex
import sys
import time

import torch
import torch.distributed as dist

import chat
import config
import data
import finetune
import lora
import runs
import spiel
import system
import tokenizer
from files import CheckpointError
from generate import answer, evaluate, exact_match
from llama import (IGNORE_INDEX, PROJECTIONS, check_checkpoint, check_vocab, load_model, matrix_shape, read_args,
                   target_linears)
from sm3 import SM3

# -----------------------------------------------------------------------------
# the trainable part: one setup for train.py, tools/memory.py and tools/bench.py


def add_trainable(model, a, total_steps: int = 1) -> tuple:
    """the trainable part of `model` for a.method on a.targets, its optimizer, and (SpIEL) the Selector
    that moves the deltas. -> (params, optimizer, selector or None)"""
    lr, wd = config.lr_and_decay(a.method, a.lr, a.weight_decay)
    targets = a.targets.split(",")
    n_targeted = sum(math.prod(matrix_shape(m)) for m in target_linears(model, targets).values())
    budget, flag = config.budget(a)  # (the flag that set it, for its errors)
    if a.method in ("spiel-ag", "spiel-ma"):
        # (a sharded base cannot hold W0 + delta in its own storage: spiel.py section 9)
        with config.naming(flag, "; choose another budget (e.g. --density 0.05)"):
            layers = spiel.add_sparse_deltas(model, targets, **budget, seed=a.seed, resident=not a.fsdp)
        spiel.set_grad_path(model, a.grad_path)
        params = [layer.values for layer in layers.values()]
        if a.method == "spiel-ag":
            optimizer = spiel.AdamW(params, lr=lr, weight_decay=wd)
        else:  # SM3 needs each delta's positions: its cover sets are their rows and columns
            positions = {m.values: (m.indices, m.weight_shape) for m in layers.values()}
            optimizer = SM3(params, lr=lr, momentum=a.sm3_momentum, weight_decay=wd, positions=positions)
        schedule = spiel.Schedule(total_steps, a.reselect_every, a.first_reselect, a.reselect_rate,
                                  a.reselect_decay)
        return params, optimizer, spiel.Selector(model, a.method[-2:], schedule, optimizer, a.regrow, a.seed)
    if a.method == "lora":
        rank = a.lora_rank
        if a.density is not None or a.num_tunable is not None:  # match a SpIEL budget
            with config.naming(flag):
                rank = lora.rank_for_budget(model, targets, a.num_tunable or round(a.density * n_targeted))
        lora.add_lora(model, targets, rank, a.lora_alpha, a.lora_dropout, seed=a.seed)
        params = [p for p in model.parameters() if p.requires_grad]
    elif set(targets) == set(PROJECTIONS):  # full fine-tuning: every weight
        params = list(model.requires_grad_(True).parameters())
    else:  # full fine-tuning of the targeted projections only
        params = [m.weight.requires_grad_(True) for m in target_linears(model.requires_grad_(False), targets).values()]
    # every element has the same age here: torch's AdamW (betas 0.9/0.999, eps 1e-8: the trainer's)
    return params, torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False), None


# -----------------------------------------------------------------------------
# one optimizer step: SpIEL's per-step protocol, written once (the tools and the tests take their steps here)


def lr_at(step: int, total: int, peak: float, warmup: float, anchor=None) -> float:
    """linear warmup to the peak in whole steps (rounded up: never above the peak), then linear decay (the
    last step: peak / (total - warm)). anchor (s, lr_s): the run's length changed at step s under
    --extend-lr continue: after s the lr decays linearly from lr_s instead."""
    if anchor and step > anchor[0]:
        return anchor[1] * (total - step + 1) / (total - anchor[0])
    warm = math.ceil(warmup * total - 1e-9) if warmup < 1 else math.ceil(warmup)
    return peak * step / warm if step <= warm else peak * (total - step + 1) / max(total - warm, 1)


def train_step(step: int, losses, n_targets: int, params, optimizer, selector, grad_clip: float = 0.0,
               world: int = 1, grad_scale: float = 1.0) -> tuple:
    """optimizer step `step`. losses: an iterable that runs this process's forward passes and yields each
    micro-batch's loss summed over its answer tokens; n_targets: the answer tokens of the whole step, every
    process's (so N processes x G micro-batches make the same step as 1 x N*G). grad_scale: FSDP averages
    the gradients over the processes (world makes that a sum). -> (the step's mean loss per answer token,
    the gradient norm, (name -> positions that drop-and-regrow moved, its seconds) or None); a loss that is
    not finite returns before the optimizer touches anything."""
    if selector:  # SpIEL-AG: while a window is open, each delta layer's backward also adds the gradient
        selector.begin_step(step)  # at its candidates to layer.window
    loss_sum = 0
    for loss in losses:
        (loss * grad_scale / n_targets).backward()  # gradients accumulate over the micro-batches
        loss_sum = loss_sum + loss.detach()  # (no .item() here: no sync per micro-batch)
    if world > 1:  # data parallel: the step's gradient is the sum of every process's share
        for p in params if grad_scale == 1 else []:  # (FSDP reduced its own)
            dist.all_reduce(p.grad)
        dist.all_reduce(loss_sum)
    train_loss = loss_sum.item() / n_targets
    if not math.isfinite(train_loss):
        return train_loss, math.nan, None
    # measure the gradient norm, and clip (only if asked: the authors do not)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if grad_clip:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    grad_norm = float(norm)
    if selector:  # SpIEL-AG: the window keeps this step's gradient as clipping scaled it
        selector.end_step(min(1.0, grad_clip / (grad_norm + 1e-6)) if grad_clip else 1.0)
    optimizer.step()  # AdamW with a per-element age (AG), SM3 (MA), torch's AdamW (LoRA, full)
    optimizer.zero_grad(set_to_none=True)  # (None: no gradient memory until the next backward)

    # --- drop and regrow (SpIEL section 3): the smallest deltas make room for new positions ---------------
    if selector and selector.schedule.is_reselection(step):
        t0 = time.time()
        changed = selector.reselect(step)  # name -> how many positions moved in that matrix
        return train_loss, grad_norm, (changed, time.time() - t0)
    return train_loss, grad_norm, None


def picks_candidates(selector, t: int) -> bool:
    """does a SpIEL-AG window open at step t (its first micro-batch's dense gradient picks the candidates)?"""
    s = selector.schedule if selector and selector.method == "ag" and selector.regrow == "criterion" else None
    return bool(s) and s.window_open(t) and (t == 1 or not s.window_open(t - 1) or s.is_reselection(t - 1))


# -----------------------------------------------------------------------------
# the run's pieces: base, evaluation (the data: data.load_run)


def load_base(args, layout, device, dtype, verbose, say) -> tuple:
    """(the frozen base, its finetune.Base, its parameter count), reported."""
    t0 = time.time()
    model = load_model(args.ckpt, device=device, dtype=dtype, verbose=verbose,
                       quantize=None if args.quantize == "none" else args.quantize)
    say(f"model: {args.ckpt} ({layout} layout, {model.args.n_layers} layers, dim {model.args.dim}) loaded "
        f"in {time.time() - t0:.1f}s as {dtype}"
        + (f", base quantized to {args.quantize}" if args.quantize != "none" else ""))
    model.grad_checkpoint = args.grad_checkpoint
    n_base = sum(p.numel() for p in model.parameters()) + \
        sum(math.prod(m.weight_shape) for m in model.modules() if hasattr(m, "dequantize"))
    return model, finetune.base_of(model, args.ckpt), n_base  # (before any sharding: the fingerprint)


def report_quality(args, model, template, val_set, device, step, say, log):
    """before fine-tuning (step 0: also the validation loss) or after: held-out exact match."""
    if step == 0:
        val_loss = evaluate(model, val_set, args.batch_size, template.tok.eos_id, device)
        say(f"validation loss before fine-tuning: {val_loss:.4f}")
        log({"event": "eval", "step": 0, "val_loss": val_loss})
    if args.exact_match:
        em = exact_match(model, template, val_set, args.exact_match)
        say(f"exact match {'after' if step else 'before'} fine-tuning: {em:.1%} of "
            f"{min(args.exact_match, len(val_set))} held-out answers")
        log({"event": "exact_match", "step": step, "exact_match": em})


# -----------------------------------------------------------------------------
# a run


def main(argv) -> int:
    args, mode = config.resolve(argv, __doc__)
    lock, memory = runs.RunLock(), system.PeakMemory()  # one writer per run folder; the run's own peak memory
    try:
        return fine_tune(args, mode, argv, lock, memory)
    finally:
        lock.release()
        memory.stop()


def fine_tune(args, mode, argv, lock, memory) -> int:
    if args.quantize != "none" and args.method == "full":
        raise SystemExit("error: full fine-tuning needs a full-precision base (drop --quantize)")
    if args.threads:
        torch.set_num_threads(args.threads)
    procs, device = system.setup_distributed(args.device)
    say = print if procs.rank == 0 else (lambda *a, **k: None)  # only rank 0 prints and writes
    if line := config.describe(args, mode, argv):  # the demo's command, the task, a resume's note
        say(line)
    if args.resume and (done := runs.finished_step(args)) is not None:  # said before anything loads
        say(runs.finished(args.out, done))
        return 0
    layout = check_checkpoint(args.ckpt)  # a missing or broken checkpoint is reported before anything slow
    shapes = read_args(args.ckpt, layout)  # (its config: the shards are not opened twice)
    system.fix_mmap_threshold(shapes)
    if procs.rank == 0:
        runs.claim(args, lock)  # a live run's folder is refused at once, naming its holder
    torch.manual_seed(args.seed + procs.rank)
    dtype = getattr(torch, args.dtype) if args.dtype else system.default_dtype(device)

    # --- data and model ---------------------------------------------------------------------------
    tok = tokenizer.load(args.ckpt)
    check_vocab(args.ckpt, tok)  # (more embedding rows than tokens is fine: a padded vocabulary)
    template = chat.template(tok, args.template)  # the checkpoint's own chat template, else the paper's (Tulu)
    args.template = template.name
    train_set, val_set, total_steps = data.load_run(args, tok, template, procs.world, shapes.max_seq_len, say)
    model, base, n_base = load_base(args, layout, device, dtype, procs.rank == 0, say)

    # --- the trainable part: sparse deltas (SpIEL), low-rank adapters (LoRA) or every weight --------
    if system.full_fsdp(args):  # sharded first: the optimizer must hold the sharded weights
        system.shard(model, [], full=True)
    params, optimizer, selector = add_trainable(model, args, total_steps)
    say_budget(args, model, params, optimizer, selector, n_base, say)
    if args.fsdp and not system.full_fsdp(args):
        system.shard(model, params, full=False)
    if not args.resume and procs.rank == 0:  # the inputs passed their checks: now the run's folder
        runs.prepare(args, lock, total_steps)  # (until its first checkpoint, it can be started over)

    # --- resume, or evaluate the base ---------------------------------------------------------------
    batches, start = data.Batches(train_set, args.batch_size, args.seed), 1
    peak = optimizer.param_groups[0]["lr"]  # (the optimizer's lr is the step's from here on)
    if args.resume:
        start = resume(args, model, optimizer, selector, batches, procs, base, total_steps, peak, say)
        if start is None:  # finished: nothing to add
            return 0
    log = runs.Log(os.path.join(args.out, "log.jsonl") if procs.rank == 0 else None)
    if start == 1 and val_set and (args.eval_every or args.exact_match):
        report_quality(args, model, template, val_set, device, 0, say, log)  # the base's

    # --- the training loop --------------------------------------------------------------------------
    from tqdm import tqdm  # a bar in a terminal; in a log file, a plain line every --log-every steps
    bar = tqdm(total=total_steps, initial=start - 1, dynamic_ncols=True,
               disable=procs.rank > 0 or not sys.stdout.isatty())
    note = bar.write if procs.rank == 0 else (lambda *a: None)
    grad_scale = procs.world if system.full_fsdp(args) else 1  # FSDP averages the gradients: make it a sum
    model.train()
    t_start, tokens_seen, padded_seen, last_saved = time.time(), 0, 0, start - 1
    with system.Stop(quiet=procs.rank > 0) as stop, bar:
        for step in range(start, total_steps + 1):
            t_step = time.time()
            lr_now = lr_at(step, total_steps, peak, args.warmup, args.lr_anchor)  # warmup, then linear decay
            for group in optimizer.param_groups:
                group["lr"] = lr_now  # (set by hand: no scheduler object to save and restore)
            draws = [batches.next() for _ in range(args.grad_accum * procs.world)]  # every process's examples
            micro = data.step_batches(draws, args.batch_size, args.seq_len, tok.eos_id, not args.no_packing,
                                      picks_candidates(selector, step), procs.world)  # packed rows (B, T) each
            n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in micro)
            tokens = sum(len(x) for d in draws for x, _, _ in d)  # real tokens, and the positions processed
            padded = sum(x.numel() for x, _, _ in micro)
            tokens_seen, padded_seen = tokens_seen + tokens, padded_seen + padded
            losses = (model(x.to(device), y.to(device), reduction="sum", segments=s if s is None else s.to(device))[1]
                      for x, y, s in micro[procs.rank::procs.world])
            train_loss, grad_norm, reselected = train_step(step, losses, n_targets, params, optimizer, selector,
                                                           args.grad_clip, procs.world, grad_scale)
            if not math.isfinite(train_loss):
                print(f"\nerror: step {step}: the loss is {train_loss}; stopping. The last checkpoint in "
                      f"{args.out} (step {last_saved}) is intact; try a lower --lr.", file=sys.stderr)
                return 1
            if reselected:  # drop and regrow ended this step (train_step)
                report_reselection(selector, step, *reselected, note, log)

            # --- log, evaluate, save -------------------------------------------------------------------
            elapsed = time.time() - t_start
            log({"step": step, "loss": train_loss, "lr": lr_now, "grad_norm": grad_norm,
                 "step_time": time.time() - t_step, "tokens_per_s": tokens_seen / elapsed, "tokens": tokens,
                 "padded_tokens": padded})
            speed = system.per_second(tokens_seen, elapsed)  # real (non-padding) tokens per second, so far
            bar.update()  # (a no-op outside a terminal, where the line below prints instead)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr_now:.2e}", speed=speed)
            slow = time.time() - t_step > 30  # (a step that slow gets its line: 7B on a CPU)
            if bar.disable and (step % args.log_every == 0 or step == total_steps or slow):
                say(f"step {step}/{total_steps}: loss {train_loss:.4f}, lr {lr_now:.2e}, {speed}", flush=True)
            if args.eval_every and val_set and (step % args.eval_every == 0 or step == total_steps):
                val_loss = evaluate(model, val_set, args.batch_size, tok.eos_id, device)
                _, _, (system_prompt, turns) = val_set[0]
                sample = answer(model, template, system_prompt, turns[0][0], 64)  # one greedy answer to look at
                note(f"step {step}: validation loss {val_loss:.4f} | {turns[0][0][:60]!r} -> {sample[:80]!r}")
                log({"event": "eval", "step": step, "val_loss": val_loss, "sample": sample})
            # Ctrl-C, or asked to stop here (at the last step, the run finishes instead)
            stopping = stop.agree(step == args.stop_at_step, procs.world, device) and step < total_steps
            if step % args.save_every == 0 or step == total_steps or stopping:  # each file whole or not at all
                runs.save_state(args, step, model, optimizer, selector, batches, procs, base, last_saved)
                last_saved = step  # what a NaN message points back to
            if stopping:
                note(f"stopped after step {step}; continue with: {runs.resume_command(args.out, procs)}")
                return 130 if stop.requested else 0  # 130: interrupted, as a shell reports Ctrl-C
    finish(args, model, template, val_set, time.time() - t_start, (tokens_seen, padded_seen), start, total_steps,
           device, procs, base, say, log, memory.report(device))
    if mode == "demo":
        say("to fine-tune LLaMA 2 7B the same way on one GPU:\n  python train.py --ckpt "
            "llama-2-7b --data your.jsonl --quantize int8 --grad-checkpoint   (see README.md)")
    return 0


# -----------------------------------------------------------------------------
# how a run resumes, what it says, and how it ends


def resume(args, model, optimizer, selector, batches, procs, base, total_steps, peak, say):
    """put the run in args.out back in place; -> the step to start from, or None if it has finished. A new
    --max-steps extends or shortens it (with --extend-lr continue, the lr decays from where it is: lr_at)."""
    start = runs.load_state(args, model, optimizer, selector, batches, procs, base.fingerprint) + 1
    exported = args.method != "full" or os.path.isdir(os.path.join(args.out, "model"))
    if start > total_steps and exported:  # (a full fine-tune cut off in its export: redo it)
        say(runs.finished(args.out, start - 1))
        return None
    planned, args.total_steps = args.total_steps, total_steps
    change = "" if planned in (None, total_steps) else \
        f"; --max-steps {'extends' if total_steps > planned else 'shortens'} it from {planned} steps"
    if change and args.extend_lr == "continue":
        args.lr_anchor = [start - 1, lr_at(start - 1, planned, peak, args.warmup, args.lr_anchor)]
        change += f", its learning rate decaying from {args.lr_anchor[1]:.2e}"
    elif change:  # replan: the N-step run's schedule from here on
        args.lr_anchor = None
    say(f"resumed {args.out} at step {start} of {total_steps}{change}")
    if procs.rank == 0:
        runs.write_args(args)  # an extension or a moved input is now the run's
    return start



def say_budget(args, model, params, optimizer, selector, n_base, say):
    """trainable vs total parameters, the optimizer's settings, and a warning for a budget too large."""
    n_trainable = sum(p.numel() for p in params)
    lr, wd = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]
    say(spiel.budget_summary(model) if selector else lora.summary(model) or f"full: {len(params)} tensors train")
    say(f"trainable: {n_trainable:,} of {n_base:,} parameters ({n_trainable / n_base:.3%}); "
        f"lr {lr:g}, weight decay {wd:g}, gradient clipping {args.grad_clip or 'off'}")
    layers = selector.layers if selector else lora.lora_layers(model)
    targeted = sum(math.prod(m.weight_shape) for m in layers.values()) or 1
    if layers and args.density is None and args.num_tunable is None and n_trainable > targeted / 10:
        knob = "--density (e.g. 0.05)" if selector else "--lora-rank (e.g. 4) or --density"
        say(f"warning: this budget trains {n_trainable / targeted:.0%} as many parameters as the targeted weights "
            f"hold (the paper's: 2.5% on 7B); on a small model pass {knob}")


def report_reselection(selector, step, changed, seconds, note, log):
    """the reselection's line: how many deltas moved, and why the rest of those due stayed (due: the number the
    schedule's rate at this step puts up for replacement, the smallest; all of them at the first)."""
    frac = selector.schedule.fraction(step)
    k, n = sum(m.indices.numel() for m in selector.layers.values()), sum(changed.values())
    due = sum(int(m.indices.numel() * frac) for m in selector.layers.values())
    why = "chosen again where they are" if selector.method == "ag" and selector.regrow == "criterion" else \
        "too few candidates"
    note(f"step {step}: reselection replaced {n:,} of {k:,} deltas ({n / k:.1%})" +
         (f"; {due:,} were due (the schedule's rate at this step: {frac:.1%}), {due - n:,} of them stayed ({why})"
          if due > n else "") + f" in {seconds:.1f}s")
    log({"event": "reselect", "step": step, "changed": n, "due": due, "of": k, "by_matrix": changed,
         "seconds": seconds})


def finish(args, model, template, val_set, elapsed, seen, start, total_steps, device, procs, base, say, log, memory):
    """the end of a run: what it cost, what it gave, where it is, and how to sample from it."""
    reserved = f" ({memory['reserved_gb']:.2f} GB reserved)" if "reserved_gb" in memory else ""
    (tokens, padded), packing = seen, "no packing" if args.no_packing else "packed"
    say(f"done: {total_steps - start + 1} steps in {elapsed:.0f}s, {system.per_second(tokens, elapsed)}; padding "
        f"{1 - tokens / max(padded, 1):.1%} of the positions processed ({packing}); peak memory "
        f"{memory['peak_gb']:.2f} GB{reserved}: {memory['what']}")
    log({"event": "end", "seconds": elapsed, "tokens_per_s": tokens / elapsed, "tokens": tokens,
         "padded_tokens": padded, "peak_memory_gb": memory["peak_gb"], "memory_counts": memory["what"]})
    if args.method == "full":  # the fine-tuned model itself, in the HF layout
        runs.export_model(args, model, base, procs)
    if args.exact_match and val_set:
        report_quality(args, model, template, val_set, device, total_steps, say, log)
    artifact = os.path.join(args.out, runs.finetune_file(args.method))
    system_prompt, turns = val_set[0][2] if val_set else (None, [("...", "")])  # a validation prompt, as scored
    ckpt = [artifact] if args.method == "full" else [args.ckpt, "--delta", artifact]
    hint = ["python", "generate.py", "--ckpt", *ckpt, "--chat", "--template", template.name, "--temperature", "0",
            "--prompt", turns[0][0],
            *(["--system", system_prompt] if system_prompt is not None else [])]
    say(f"saved {artifact}; sample with: {shlex.join(hint)}")  # quoted for a shell: newlines, quotes, $


def cli(argv):
    """the command line: a bad input or an interruption ends in one line on stderr."""
    try:
        code = main(argv)
    except (CheckpointError, data.DataError, ValueError, FileExistsError, system.RanksDisagree) as e:
        code = f"error: {e}"
    except KeyboardInterrupt:
        print("interrupted outside the training loop: run the same command again (with --resume "
              "if it saved a checkpoint)", file=sys.stderr)
        code = 130
    system.leave(code)  # (sys.exit, but under torchrun on the CPU)


if __name__ == "__main__":
    cli(sys.argv[1:])
