"""
Fine-tune LLaMA 2 with SpIEL (Ansell et al. 2024, arXiv 2401.16405), or with LoRA or full
fine-tuning as baselines: the same data, loop, schedule and logging for all four methods.

    python train.py                             # the demo: a tiny LLaMA on a CPU, no download
    python train.py --ckpt llama-2-7b --data my.jsonl --quantize int8 --grad-checkpoint
    python train.py --out runs/x --resume       # continue an interrupted run exactly
    torchrun --nproc_per_node 4 train.py --ckpt llama-2-13b --data my.jsonl --fsdp

The loop (section 3 of the paper): every step, update the trainable part; every --reselect-every
steps, drop the smallest deltas and regrow as many new positions (SpIEL-AG: by gradients
accumulated over a short window; SpIEL-MA: by SM3's row x column accumulators). Look for "drop and
regrow" below.
Every knob and its default: runs.get_parser (python train.py --help).
"""

import math
import os
import shlex
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
from llama import (IGNORE_INDEX, CheckpointError, Tokenizer, base_fingerprint, check_checkpoint,
                   check_vocab, default_dtype, find_tokenizer, load_model, matrix_shape, read_args, target_linears)
from sm3 import SM3

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")
# `python train.py` with no arguments: demo.py's tiny base, fine-tuned on a new task (on a CPU)
DEMO_ARGS = ["--ckpt", os.path.join(DEMO, "base"), "--data", os.path.join(DEMO, "train.jsonl"),
             "--val-data", os.path.join(DEMO, "val.jsonl"), "--method", "spiel-ag",
             "--density", "0.05", "--lr", "3e-3", "--seq-len", "96", "--batch-size", "16",
             "--grad-accum", "1", "--max-steps", "400", "--eval-every", "100",
             "--exact-match", "100", "--device", "cpu", "--threads", "1"]

# `python train.py --ckpt DIR` without --data: the demo's task (shift each letter by one) on that model, with
# held-out exact match before and after: SpIEL teaching it something new. 100 steps of 8 examples; the
# learning rate is the top of the paper's grid for a short run (the user's own flags win)
TASK_ARGS = ["--data", os.path.join(DEMO, "train.jsonl"), "--val-data", os.path.join(DEMO, "val.jsonl"),
             "--max-steps", "100", "--batch-size", "8", "--grad-accum", "1", "--seq-len", "64",
             "--eval-every", "50", "--exact-match", "50"]
TASK_LR = {"spiel-ag": 1e-4, "spiel-ma": 2e-3}  # (LoRA 1e-4 and full 2e-5: their defaults)


def with_default_task(argv: list) -> list:
    """argv, or (--ckpt without --data) the default task's flags followed by the user's."""
    a = runs.get_parser().parse_args(argv)
    if a.resume or a.data or not a.ckpt:
        return argv
    lr = ["--lr", str(TASK_LR[a.method])] if a.method in TASK_LR else []
    return TASK_ARGS + lr + argv


# -----------------------------------------------------------------------------
# the trainable part: one setup for train.py, memory.py and bench.py


def add_trainable(model, a, total_steps: int = 1) -> tuple:
    """the trainable part of `model` for a.method, its optimizer, and (SpIEL) the Selector that
    moves the deltas. -> (params, optimizer, selector or None)"""
    lr, wd = runs.lr_and_decay(a.method, a.lr, a.weight_decay)
    budget = {"density": a.density, "num_tunable": a.num_tunable, "lora_rank": a.match_lora_rank}
    if a.method in ("spiel-ag", "spiel-ma"):
        if all(v is None for v in budget.values()):
            budget["lora_rank"] = 64  # the paper's budget: as many deltas as LoRA rank 64 trains
            n, size = spiel.lora_param_count(model, 64), sum(math.prod(matrix_shape(m)) for m in
                                                             target_linears(model).values())
            if n > size:
                raise ValueError(f"the default budget (as many deltas as LoRA rank 64 trains: {n:,}) does not "
                                 f"fit this model's {size:,} targeted weights; pass --density (e.g. 0.05)")
        layers = spiel.add_sparse_deltas(model, **budget, seed=a.seed)
        spiel.set_grad_path(model, a.grad_path)
        params = [layer.values for layer in layers.values()]
        if a.method == "spiel-ag":
            optimizer = spiel.AdamW(params, lr=lr, weight_decay=wd)
        else:  # SM3 needs each delta's positions: its cover sets are their rows and columns
            positions = {m.values: (m.indices, m.weight_shape) for m in layers.values()}
            optimizer = SM3(params, lr=lr, momentum=a.sm3_momentum, weight_decay=wd,
                            positions=positions)
        schedule = spiel.Schedule(total_steps, a.reselect_every, a.first_reselect, a.reselect_rate,
                                  a.reselect_decay)
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
    # every element has the same age here: torch's AdamW (betas 0.9/0.999, eps 1e-8: the trainer's)
    return params, torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False), None


# -----------------------------------------------------------------------------
# helpers: the learning rate, evaluation, processes, interruption


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """linear warmup to the peak in whole steps (rounded up: never above the peak), then linear
    decay (the last step: peak / (total - warm))."""
    warm = math.ceil(warmup * total - 1e-9) if warmup < 1 else math.ceil(warmup)
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


def report_quality(args, model, tok, val_set, device, step, say, log):
    """before fine-tuning (step 0: also the validation loss) or after: held-out exact match."""
    if step == 0:
        val_loss = evaluate(model, val_set, args.batch_size, tok.eos_id, device)
        say(f"validation loss before fine-tuning: {val_loss:.4f}")
        log({"event": "eval", "step": 0, "val_loss": val_loss})
    if args.exact_match:
        em = exact_match(model, tok, val_set, args.exact_match)
        say(f"exact match {'after' if step else 'before'} fine-tuning: {em:.1%} of "
            f"{min(args.exact_match, len(val_set))} held-out answers")
        log({"event": "exact_match", "step": step, "exact_match": em})


def setup_distributed(device: str) -> tuple:
    """torchrun's environment -> (rank, world size, this process's device); NCCL / gloo."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard(model, params, full: bool):
    """--fsdp: each transformer block's frozen weights sharded across the processes (FSDP2's
    fully_shard per block); the trainable deltas / adapters stay whole on every process. Full
    fine-tuning shards everything (FSDP then averages the gradients: the loop scales the loss)."""
    from torch.distributed.fsdp import fully_shard
    for layer in spiel.delta_layers(model).values():  # a sharded base cannot hold W0 + delta
        layer.resident = False  # (spiel.py section 9)
    for module in [*model.layers, model]:
        fully_shard(module, ignored_params=None if full else set(params))


def load_data(args, tok, world, say) -> tuple:
    """(training examples, validation examples, the number of optimizer steps), reported."""
    if args.resume and args.data_sha256 and runs.sha256(args.data) != args.data_sha256:
        raise CheckpointError(f"{args.data}: not the data this run trained on (its hash differs)")
    train_set, val_set, dropped = data.load_splits(args.data, args.val_data, args.val_frac, tok,
                                                   args.seq_len, args.seed)
    if dropped:
        say(f"data: dropped {dropped} examples left with no answer token after truncation to "
            f"{args.seq_len}")
    warning = data.unknown_warning(tok, train_set)  # text the tokenizer can only write as <unk>
    if warning:
        say(warning)
    per_step = args.batch_size * args.grad_accum * world
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(train_set) / per_step))
    n_label = sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in train_set)
    say(f"data: {len(train_set)} training / {len(val_set)} validation examples, "
        f"{n_label / len(train_set):.1f} answer tokens per example; {per_step} examples per step "
        f"({world} process{'es' * (world > 1)}), {total_steps} steps")
    return train_set, val_set, total_steps


def fix_mmap_threshold(shapes):
    """a large model (a weight matrix of 32 MB or more in fp32): glibc's malloc gives every block from 1 MB up
    its own mmap, returned when freed. By itself glibc keeps freed blocks of up to 32 MB in its heap (its mmap
    threshold rises to that), and at 7B the per-matrix temporaries fragment it: the 4-layer full-size check
    peaked at 3.69 GB that way, 3.43 GB with the fixed threshold (docs/fullsize.md). Not for smaller models:
    there the fresh pages cost speed (LoRA 13%, SpIEL-MA 2% slower a step on bench.py's CPU shape:
    docs/measure/mmap_threshold.py)."""
    if shapes.dim * max(shapes.dim, shapes.ffn_dim) < 2**23:
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def load_base(args, device, dtype, say) -> tuple:
    """(the frozen base, its fingerprint, its parameter count), reported."""
    t0 = time.time()
    model = load_model(args.ckpt, device=device, dtype=dtype,
                       quantize=None if args.quantize == "none" else args.quantize)
    say(f"model: {args.ckpt} ({model.layout} layout, {model.args.n_layers} layers, dim "
        f"{model.args.dim}) loaded in {time.time() - t0:.1f}s as {dtype}"
        + (f", base quantized to {args.quantize}" if args.quantize != "none" else ""))
    model.grad_checkpoint = args.grad_checkpoint
    n_base = sum(p.numel() for p in model.parameters()) + \
        sum(math.prod(m.weight_shape) for m in model.modules() if hasattr(m, "dequantize"))
    return model, base_fingerprint(model), n_base  # (of weights fine-tuning never changes)


STOP = []  # the first Ctrl-C (or a SIGTERM) finishes the step, saves and exits; a second Ctrl-C
# exits at once. Under torchrun, Ctrl-C reaches torchrun, which passes it on to every process and
# kills them 30 s later: the processes agree to stop after the same step (see the loop).


def on_signal(signum, _):
    if STOP and signum == signal.SIGINT:
        raise SystemExit("quit without saving; the last checkpoint is intact")
    if not STOP:
        STOP.append(1)
        if os.environ.get("RANK", "0") == "0":  # (under torchrun every process gets it: one line is enough)
            print(f"\n{signal.Signals(signum).name}: finishing this step, saving, exiting "
                  "(Ctrl-C again to quit at once)", file=sys.stderr)


# -----------------------------------------------------------------------------


def main(argv):
    lock = runs.RunLock()  # one writer per run folder: rank 0 holds it while the run lives
    memory = runs.PeakMemory()  # the run's own peak memory, from here on
    try:
        return fine_tune(argv, lock, memory)
    finally:
        lock.release()
        memory.stop()


def fine_tune(argv, lock, memory):
    demo, task = not argv, with_default_task(argv) != argv
    args = runs.resolve_args(runs.get_parser(__doc__), DEMO_ARGS if demo else with_default_task(argv))
    if args.quantize != "none" and args.method == "full":
        raise SystemExit("error: full fine-tuning needs a full-precision base (drop --quantize)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)  # only rank 0 prints and writes
    if demo:
        shown = [os.path.relpath(x, HERE) if x.startswith(HERE) else x for x in DEMO_ARGS]
        say("demo: python train.py " + " ".join(shown))
    if task:
        say(f"no --data: fine-tuning {args.ckpt} on the demo's task (shift each letter by one, "
            f"{runs.shown(args.data)}), {args.max_steps} steps, held-out exact match before and after. "
            "Your own data: --data your.jsonl (README.md, Data)")
    if args.resume and (done := runs.finished_step(args)) is not None:  # said before anything loads
        say(runs.finished(args.out, done))
        return 0
    layout = check_checkpoint(args.ckpt)  # a missing or broken checkpoint is reported before anything slow
    fix_mmap_threshold(read_args(args.ckpt, layout))  # (its config: the shards are not opened twice)
    if rank == 0:
        runs.claim(args, lock)  # a live run's folder is refused at once, naming its holder
    torch.manual_seed(args.seed + rank)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)

    # --- data and model ------------------------------------------------------------------------
    tok = Tokenizer(find_tokenizer(args.ckpt))
    check_vocab(args.ckpt, tok)  # (more embedding rows than pieces is fine: a padded vocabulary)
    train_set, val_set, total_steps = load_data(args, tok, world, say)
    model, fingerprint, n_base = load_base(args, device, dtype, say)

    # --- the trainable part: sparse deltas (SpIEL), low-rank adapters (LoRA) or every weight ---
    if runs.full_fsdp(args):  # sharded first: the optimizer must hold the sharded weights
        shard(model, [], full=True)
    params, optimizer, selector = add_trainable(model, args, total_steps)
    n_trainable = sum(p.numel() for p in params)
    lr, wd = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]
    say(spiel.budget_summary(model) if selector else f"{args.method}: {len(params)} tensors train")
    say(f"trainable: {n_trainable:,} of {n_base:,} parameters ({n_trainable / n_base:.3%}); "
        f"lr {lr:g}, weight decay {wd:g}, gradient clipping {args.grad_clip or 'off'}")
    targeted = sum(math.prod(m.weight_shape) for m in selector.layers.values()) if selector else 1
    default_budget = args.density is None and args.num_tunable is None
    if selector and default_budget and n_trainable > targeted / 10:
        say(f"warning: this budget is {n_trainable / targeted:.0%} of the targeted weights (the "
            "paper's: 2.5% on 7B); on a small model pass --density (e.g. 0.05)")
    if args.fsdp and not runs.full_fsdp(args):
        shard(model, params, full=False)
    if not args.resume and rank == 0:  # the inputs passed their checks: now the run's folder
        runs.prepare(args, lock, total_steps)  # (until its first checkpoint, it can be started over)

    # --- resume, or evaluate the base ------------------------------------------------------------
    batches = data.Batches(train_set, args.batch_size, args.seed)
    start = 1
    if args.resume:
        last = runs.load_state(args, model, optimizer, selector, batches, rank, world, fingerprint)
        start = last + 1
        exported = args.method != "full" or os.path.isdir(os.path.join(args.out, "model"))
        if start > total_steps and exported:  # (a full fine-tune cut off in its export: redo it)
            say(runs.finished(args.out, start - 1))
            return 0
        planned, args.total_steps = args.total_steps, total_steps
        change = "" if planned in (None, total_steps) else \
            f"; --max-steps {'extends' if total_steps > planned else 'shortens'} it from {planned} steps"
        say(f"resumed {args.out} at step {start} of {total_steps}{change}")
        if rank == 0:
            runs.write_args(args)  # an extension or a moved input is now the run's
    log = runs.Log(os.path.join(args.out, "log.jsonl") if rank == 0 else None)
    if start == 1 and val_set and (args.eval_every or args.exact_match):
        report_quality(args, model, tok, val_set, device, 0, say, log)  # the base's

    # --- the training loop -----------------------------------------------------------------------
    STOP.clear()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)  # a job scheduler's (or torchrun's) polite stop
    from tqdm import tqdm  # a bar in a terminal; in a log file, a plain line every --log-every
    bar = tqdm(total=total_steps, initial=start - 1, dynamic_ncols=True,
               disable=rank > 0 or not sys.stdout.isatty())
    note = bar.write if rank == 0 else (lambda *a: None)
    model.train()
    t_start, tokens_seen, last_saved, code = time.time(), 0, start - 1, None  # code: ended early
    for step in range(start, total_steps + 1):
        t_step = time.time()
        lr_now = lr_at(step, total_steps, lr, args.warmup)  # warmup, then linear decay to 0
        for group in optimizer.param_groups:
            group["lr"] = lr_now  # (set by hand: no scheduler object to save and restore)
        if selector:  # SpIEL-AG: while a window is open, each delta layer's backward also
            selector.begin_step(step)  # adds the gradient at its candidates to layer.window
        # the step's micro-batches, every process's: the loss is normalised by all their answer
        # tokens, so N processes x G micro-batches make the same step as 1 x N*G
        micro = [batches.next() for _ in range(args.grad_accum * world)]
        n_targets = sum(int((y != IGNORE_INDEX).sum()) for mb in micro for _, y, _ in mb)
        tokens_seen += sum(len(x) for mb in micro for x, _, _ in mb)  # non-padding tokens
        scale = world if runs.full_fsdp(args) else 1  # FSDP averages the gradients: make it a sum
        loss_sum = torch.zeros((), device=device)  # summed over the step's answer tokens
        for examples in micro[rank * args.grad_accum:(rank + 1) * args.grad_accum]:  # our share
            x, y = data.collate(examples, tok.eos_id)  # (B, T) right-padded, -100 off the answers
            _, loss = model(x.to(device), y.to(device), reduction="sum")  # summed: answer tokens
            (loss * scale / n_targets).backward()  # gradients accumulate over the micro-batches
            loss_sum += loss.detach()  # (no .item() here: no sync per micro-batch)
        if world > 1:  # data parallel: the step's gradient is the sum of every process's share
            for p in params if not runs.full_fsdp(args) else []:  # (FSDP reduced its own)
                dist.all_reduce(p.grad)
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / n_targets  # the mean loss per answer token of the step
        if not math.isfinite(train_loss):
            print(f"\nerror: step {step}: the loss is {train_loss}; stopping. The last checkpoint "
                  f"in {args.out} (step {last_saved}) is intact; try a lower --lr.",
                  file=sys.stderr)
            code = 1
            break
        # clip (only if asked: the authors do not), and measure the gradient norm either way
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf))
        if selector:  # SpIEL-AG: the window keeps this step's gradient as clipping scaled it
            clip = min(1.0, args.grad_clip / (grad_norm + 1e-6)) if args.grad_clip else 1.0
            selector.end_step(clip)
        optimizer.step()  # AdamW with a per-element age (AG), SM3 (MA), torch's AdamW (LoRA, full)
        optimizer.zero_grad(set_to_none=True)  # (None: no gradient memory until the next backward)

        # --- drop and regrow (SpIEL section 3): the smallest deltas make room for new positions --
        if selector and selector.schedule.is_reselection(step):
            t_reselect = time.time()
            changed = selector.reselect(step)  # name -> how many positions moved in that matrix
            k, n = sum(m.indices.numel() for m in selector.layers.values()), sum(changed.values())
            note(f"step {step}: reselection replaced {n:,} of {k:,} deltas ({n / k:.1%}; "
                 f"scheduled {selector.schedule.fraction(step):.1%}) in {time.time() - t_reselect:.1f}s")
            log({"event": "reselect", "step": step, "changed": n, "of": k, "by_matrix": changed,
                 "seconds": time.time() - t_reselect})

        # --- log, evaluate, save ---------------------------------------------------------------
        elapsed = time.time() - t_start
        log({"step": step, "loss": train_loss, "lr": lr_now, "grad_norm": grad_norm,
             "step_time": time.time() - t_step, "tokens_per_s": tokens_seen / elapsed})
        bar.update()  # (a no-op outside a terminal, where the line below prints instead)
        speed = runs.per_second(tokens_seen, elapsed)  # non-padding tokens per second, so far
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr_now:.2e}", speed=speed)
        slow = time.time() - t_step > 30  # (a step that slow gets its line: 7B on a CPU)
        if bar.disable and (step % args.log_every == 0 or step == total_steps or slow):
            say(f"step {step}/{total_steps}: loss {train_loss:.4f}, lr {lr_now:.2e}, {speed}",
                flush=True)
        if args.eval_every and val_set and (step % args.eval_every == 0 or step == total_steps):
            val_loss = evaluate(model, val_set, args.batch_size, tok.eos_id, device)
            _, _, (system, turns) = val_set[0]
            sample = answer(model, tok, system, turns[0][0], 64)  # one greedy answer to look at
            note(f"step {step}: validation loss {val_loss:.4f} | {turns[0][0][:60]!r} -> "
                 f"{sample[:80]!r}")
            log({"event": "eval", "step": step, "val_loss": val_loss, "sample": sample})
        # Ctrl-C, or asked to stop here (at the last step, the run finishes instead)
        stop = (bool(STOP) or step == args.stop_at_step) and step < total_steps
        if world > 1:  # one process stopping alone would leave the others waiting in a collective
            flags = torch.tensor([len(STOP), stop], dtype=torch.float32, device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # any process stops: all stop here
            STOP.extend([1] * (bool(flags[0]) and not STOP))
            stop = bool(flags[1])
        if step % args.save_every == 0 or step == total_steps or stop:  # each file whole or not at all
            try:
                runs.save_state(args, step, model, optimizer, selector, batches, rank, world,
                                fingerprint)
            except CheckpointError as e:  # a full disk: say what is left and how to go on
                raise CheckpointError(f"{e}; " + (f"the checkpoint of step {last_saved} is intact: free "
                                      f"some space, then {runs.resume_command(args.out, world)}"
                                      if last_saved else "free some space and start again")) from None
            last_saved = step  # what a NaN message points back to
        if stop:
            note(f"stopped after step {step}; continue with: {runs.resume_command(args.out, world)}")
            code = 130 if STOP else 0  # 130: interrupted, as a shell reports Ctrl-C
            break
    bar.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C interrupts
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if code is not None:
        return code
    finish(args, model, tok, val_set, time.time() - t_start, tokens_seen, start, total_steps,
           device, rank, say, log, memory.report(device))
    if demo:
        say("to fine-tune LLaMA 2 7B the same way on one GPU:\n  python train.py --ckpt "
            "llama-2-7b --data your.jsonl --quantize int8 --grad-checkpoint   (see README.md)")
    return 0


def finish(args, model, tok, val_set, elapsed, tokens_seen, start, total_steps, device, rank, say,
           log, memory):
    """the end of a run: what it cost, what it gave, where it is, and how to sample from it."""
    reserved = f" ({memory['reserved_gb']:.2f} GB reserved)" if "reserved_gb" in memory else ""
    say(f"done: {total_steps - start + 1} steps in {elapsed:.0f}s, "
        f"{runs.per_second(tokens_seen, elapsed)}; peak memory {memory['peak_gb']:.2f} GB{reserved}: "
        f"{memory['what']}")
    log({"event": "end", "seconds": elapsed, "tokens_per_s": tokens_seen / elapsed,
         "peak_memory_gb": memory["peak_gb"], "memory_counts": memory["what"]})
    if args.method == "full":
        from merge import save_hf
        sd = None
        if runs.full_fsdp(args):  # the whole model, gathered on rank 0
            from torch.distributed.checkpoint import state_dict as dcp
            sd = dcp.get_model_state_dict(model, options=dcp.StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
        if rank == 0:
            save_hf(model, tok.path, os.path.join(args.out, "model"), state_dict=sd, replace=True)
    if args.exact_match and val_set:
        report_quality(args, model, tok, val_set, device, total_steps, say, log)
    name = {"lora": "lora.safetensors", "full": "model"}.get(args.method, "delta.safetensors")
    artifact = os.path.join(args.out, name)
    system, turns = val_set[0][2] if val_set else (None, [("...", "")])  # a validation prompt, as scored
    ckpt = [artifact] if args.method == "full" else [args.ckpt, "--delta", artifact]
    hint = ["python", "generate.py", "--ckpt", *ckpt, "--chat", "--temperature", "0", "--prompt", turns[0][0],
            *(["--system", system] if system is not None else [])]
    say(f"saved {artifact}; sample with: {shlex.join(hint)}")  # quoted for a shell: newlines, quotes, $


def cli(argv):
    """the command line: a bad input or an interruption ends in one line on stderr."""
    try:
        sys.exit(main(argv))
    except (CheckpointError, data.DataError, ValueError, FileExistsError,
            spiel.RanksDisagree) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted outside the training loop: run the same command again (with --resume "
              "if it saved a checkpoint)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli(sys.argv[1:])
