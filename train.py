"""
Fine-tune LLaMA 2 with SpIEL (Ansell et al. 2024, arXiv 2401.16405), or with LoRA or full fine-tuning as
baselines, on instruction data. Same data, loop, schedule and logging for all four methods.

    python train.py                      # the embedded demo: a tiny LLaMA on CPU, nothing downloaded
    python train.py --ckpt llama-2-7b --data my.jsonl --quantize int8 --grad-checkpoint
    python train.py --out runs/x --resume    # continue an interrupted run exactly

The loop (section 3 of the paper): every step, update the active deltas; every --reselect-every steps,
drop the smallest deltas and regrow as many new positions (SpIEL-AG: by gradients accumulated over a
short window; SpIEL-MA: by SM3's row x column accumulators). Look for "drop and regrow" below.
"""

import argparse
import json
import math
import os
import resource
import signal
import sys
import time

import torch

import data
import spiel
from llama import (IGNORE_INDEX, CheckpointError, Tokenizer, checkpoint_layout, default_device, default_dtype, find_tokenizer,
                   generate, load_model, save_hf)

HERE = os.path.dirname(os.path.abspath(__file__))
# `python train.py` with no arguments runs exactly this (a tiny base pre-trained on some string tasks by
# demo.py, fine-tuned on another one); it takes under a minute on 2 CPU cores.
DEMO_ARGS = ["--ckpt", os.path.join(HERE, "demo", "base"), "--data", os.path.join(HERE, "demo", "train.jsonl"),
             "--val-data", os.path.join(HERE, "demo", "val.jsonl"), "--method", "spiel-ag", "--density", "0.05",
             "--lr", "3e-3", "--weight-decay", "0", "--seq-len", "96", "--batch-size", "16", "--grad-accum", "1",
             "--max-steps", "600", "--reselect-every", "20", "--eval-every", "100", "--exact-match", "100",
             "--device", "cpu"]
# learning rates by method when --lr is not given (the paper's settings for LLaMA 2, section 4.2 and the notes)
DEFAULT_LR = {"spiel-ag": 1e-5, "spiel-ma": 1e-3, "lora": 1e-4, "full": 2e-5}
DEFAULT_WD = {"spiel-ag": 30.0, "spiel-ma": 0.0, "lora": 0.0, "full": 0.0}


def get_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    # model and data
    a("--ckpt", help="LLaMA 2 checkpoint folder, Meta or Hugging Face layout (omit all arguments for the demo)")
    a("--data", help="training data, .jsonl or .json, Alpaca or chat 'messages' records (see data.py)")
    a("--val-data", help="validation data; default: --val-frac of --data")
    a("--val-frac", type=float, default=0.05, help="fraction of --data held out when --val-data is not given")
    a("--seq-len", type=int, default=2048, help="examples are truncated to this many tokens")
    # method and budget
    a("--method", default="spiel-ag", choices=["spiel-ag", "spiel-ma", "lora", "full"])
    a("--density", type=float, help="SpIEL budget as a fraction of the targeted weights")
    a("--num-tunable", type=int, help="SpIEL budget as a number of deltas")
    a("--match-lora-rank", type=int, help="SpIEL budget = parameters of LoRA at this rank (default when no "
                                             "budget is given: 64, as in the paper)")
    a("--lora-rank", type=int, default=64, help="LoRA rank (unless --density/--num-tunable set a budget to match)")
    a("--lora-alpha", type=float, default=16.0)
    a("--lora-dropout", type=float, default=0.1)
    # reselection (SpIEL)
    a("--reselect-every", type=int, default=20, help="steps between drop-and-regrow")
    a("--first-reselect", type=int, default=5, help="step of the first reselection (replaces all deltas); "
                                                     "also the AG accumulation window length")
    a("--reselect-rate", type=float, default=0.2, help="fraction replaced at a reselection, decaying to 0")
    a("--reselect-decay", default="linear", choices=["linear", "cosine"])
    a("--grad-path", default="auto", choices=["auto", "dense", "sparse"],
      help="SpIEL value gradient: dense dW then gather, or only the active entries (auto: the faster, measured)")
    a("--sm3-momentum", type=float, default=0.0, help="SpIEL-MA: SM3 momentum (0 keeps SM3's memory small)")
    # optimization
    a("--lr", type=float, help=f"peak learning rate (default by method: {DEFAULT_LR})")
    a("--weight-decay", type=float, help=f"decoupled weight decay (default by method: {DEFAULT_WD})")
    a("--warmup", type=float, default=0.03, help="linear warmup: a fraction of the steps if < 1, else steps")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    a("--batch-size", type=int, default=1, help="examples per micro-batch")
    a("--grad-accum", type=int, default=128, help="micro-batches per optimizer step (paper: 128 sequences)")
    a("--epochs", type=float, default=2.0)
    a("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    # system
    a("--quantize", default="none", choices=["none", "int8", "nf4"], help="store the frozen base quantized")
    a("--dtype", choices=["float32", "bfloat16"], help="base and compute dtype (default: bf16 on a GPU that has "
      "it, else fp32); deltas and optimizer state are always fp32")
    a("--device", default=default_device())
    a("--grad-checkpoint", action="store_true", help="recompute each block in backward (less activation memory)")
    a("--seed", type=int, default=0)
    # output, evaluation, resume
    a("--out", help="output folder (default runs/<method>-<time>); an existing run is never overwritten")
    a("--resume", action="store_true", help="continue the run in --out with its saved arguments")
    a("--save-every", type=int, default=200, help="steps between checkpoints (and at the end)")
    a("--eval-every", type=int, default=100, help="steps between validation loss + one sample (0: off)")
    a("--exact-match", type=int, default=0, help="score this many validation answers by greedy exact match "
                                                 "before and after training (single-turn data)")
    a("--stop-at-step", type=int, help="stop after this step as if interrupted (resumable)")
    args = ap.parse_args(argv)
    if not args.resume and (args.ckpt is None or args.data is None):
        ap.error("--ckpt and --data are required (run with no arguments at all for the demo)")
    return args


def main(argv):
    demo = not argv
    args = get_args(DEMO_ARGS if demo else argv)
    if demo:
        print("demo: python train.py " + " ".join(os.path.relpath(x, HERE) if x.startswith(HERE) else x
                                                 for x in DEMO_ARGS))
    # --- output folder and resume -----------------------------------------------------------------------
    if args.resume:
        if not args.out or not os.path.isfile(os.path.join(args.out, "state.pt")):
            raise SystemExit(f"error: --resume needs --out pointing at a run with state.pt ({args.out})")
        stop_at = args.stop_at_step
        with open(os.path.join(args.out, "args.json")) as f:
            args = argparse.Namespace(**json.load(f))  # the run's own arguments, so it continues exactly
        args.resume, args.stop_at_step = True, stop_at
    else:
        args.out = args.out or os.path.join("runs", f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.exists(args.out) and os.listdir(args.out):
            raise SystemExit(f"error: {args.out} exists and is not empty; use --resume or another --out")
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    wd = args.weight_decay if args.weight_decay is not None else DEFAULT_WD[args.method]
    spiel_method = {"spiel-ag": "ag", "spiel-ma": "ma"}.get(args.method)
    if args.quantize != "none" and args.method == "full":
        raise SystemExit("error: full fine-tuning needs a full-precision base (drop --quantize)")
    torch.manual_seed(args.seed)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)

    # --- data ---------------------------------------------------------------------------------------------
    checkpoint_layout(args.ckpt)  # a missing or unrecognised folder is reported before anything else
    tok = Tokenizer(find_tokenizer(args.ckpt))
    train_set, dropped = data.load_examples(args.data, tok, args.seq_len)
    if args.val_data:
        val_set, dropped_val = data.load_examples(args.val_data, tok, args.seq_len)
        dropped += dropped_val
    else:
        train_set, val_set = data.split_train_val(train_set, args.val_frac, args.seed)
    if dropped:
        print(f"data: dropped {dropped} examples left with no answer token after truncation to {args.seq_len}")
    per_step = args.batch_size * args.grad_accum
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(train_set) / per_step))
    n_label = sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in train_set)
    print(f"data: {len(train_set)} training / {len(val_set)} validation examples, {n_label / len(train_set):.1f} "
          f"answer tokens per example; {per_step} examples per step, {total_steps} steps")

    # --- model and the trainable part ---------------------------------------------------------------------
    t0 = time.time()
    model = load_model(args.ckpt, device=device, dtype=dtype, quantize=None if args.quantize == "none" else args.quantize)
    print(f"model: {args.ckpt} ({model.layout} layout, {model.args.n_layers} layers, dim {model.args.dim}) "
          f"loaded in {time.time() - t0:.1f}s as {dtype}" + (f", base quantized to {args.quantize}" if args.quantize != "none" else ""))
    model.grad_checkpoint = args.grad_checkpoint
    n_base = sum(p.numel() for p in model.parameters()) + \
        sum(math.prod(m.weight_shape) for m in model.modules() if hasattr(m, "dequantize"))  # quantized weights
    budget = dict(density=args.density, num_tunable=args.num_tunable, lora_rank=args.match_lora_rank)
    if all(v is None for v in budget.values()):
        budget["lora_rank"] = 64
    selector = None
    if spiel_method:
        layers = spiel.add_sparse_deltas(model, **budget, seed=args.seed)
        spiel.set_grad_path(model, args.grad_path)
        params = [layer.values for layer in layers.values()]
        if spiel_method == "ag":
            optimizer = spiel.AdamW(params, lr=lr, weight_decay=wd)
        else:
            from sm3 import SM3
            optimizer = SM3(params, lr=lr, momentum=args.sm3_momentum, weight_decay=wd)
        schedule = spiel.Schedule(total_steps, args.reselect_every, args.first_reselect, args.reselect_rate,
                                  args.reselect_decay)
        selector = spiel.Selector(model, spiel_method, schedule, grad_accum=args.grad_accum)
    elif args.method == "lora":
        import lora
        rank = args.lora_rank
        if args.density is not None or args.num_tunable is not None:  # match SpIEL's budget
            n_targeted = sum(math.prod(spiel.matrix_shape(m)) for m in spiel.target_linears(model).values())
            rank = lora.rank_for_budget(model, args.num_tunable or round(args.density * n_targeted))
        layers = lora.add_lora(model, rank, args.lora_alpha, args.lora_dropout, seed=args.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = spiel.AdamW(params, lr=lr, weight_decay=wd)
    else:  # full fine-tuning
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = spiel.AdamW(params, lr=lr, weight_decay=wd)
    n_trainable = sum(p.numel() for p in params)
    if n_trainable == 0 or not all(p.requires_grad for p in params):
        raise SystemExit("error: nothing to train (check the budget and the method)")
    print(f"trainable: {n_trainable:,} parameters ({args.method}), {n_trainable / n_base:.3%} of the base's "
          f"{n_base:,}; lr {lr:g}, weight decay {wd:g}")

    # --- saving and resuming -------------------------------------------------------------------------------
    os.makedirs(args.out, exist_ok=True)
    trainable_keys = [k for k, _ in model.state_dict(keep_vars=True).items()
                      if args.method == "full" or k.endswith((".values", ".indices", ".A", ".B"))]
    pos = {"epoch": 0, "index": 0}  # where the data stream stands
    log_path = os.path.join(args.out, "log.jsonl")

    def log(record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(step):
        """the small artifact (delta / adapter) and the resume state, each written to a temp file and renamed."""
        extra = {"method": args.method, "step": step, "base": os.path.abspath(args.ckpt)}
        if spiel_method:
            spiel.save_delta(model, os.path.join(args.out, "delta.safetensors"), extra=extra)
        elif args.method == "lora":
            lora.save_lora(model, os.path.join(args.out, "lora.safetensors"), extra=extra)
        sd = model.state_dict()
        state = {"step": step, "data": dict(pos), "optimizer": optimizer.state_dict(),
                 "selector": selector.state_dict() if selector else {},
                 "trainable": {k: sd[k] for k in trainable_keys}, "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save(state, os.path.join(args.out, "state.pt.tmp"))
        os.replace(os.path.join(args.out, "state.pt.tmp"), os.path.join(args.out, "state.pt"))

    start = 1
    if args.resume:
        state = torch.load(os.path.join(args.out, "state.pt"), map_location=device, weights_only=True)
        sd = model.state_dict()
        if set(state["trainable"]) != set(trainable_keys):
            raise SystemExit(f"error: {args.out}/state.pt does not match this model's trainable tensors")
        with torch.no_grad():
            for k, v in state["trainable"].items():
                sd[k].copy_(v)  # in place: the optimizer keeps pointing at the same tensors
        optimizer.load_state_dict(state["optimizer"])
        if selector:
            selector.load_state_dict(state["selector"])
        torch.set_rng_state(state["rng"].cpu())  # RNG states are CPU byte tensors (map_location moved them)
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        pos.update(state["data"])
        start = state["step"] + 1
        print(f"resumed {args.out} at step {start}")
    else:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)

    # --- evaluation ---------------------------------------------------------------------------------------
    def batches_of(examples):
        for i in range(0, len(examples), args.batch_size):
            yield data.collate(examples[i:i + args.batch_size], tok.eos_id)

    @torch.no_grad()
    def evaluate():
        model.eval()
        tot, n = 0.0, 0
        for x, y in batches_of(val_set[:500]):
            _, loss = model(x.to(device), y.to(device), reduction="sum")
            tot, n = tot + loss.item(), n + int((y != IGNORE_INDEX).sum())
        model.train()
        return tot / max(n, 1)

    def answer(system, turns, max_new):
        ids = data.prompt_ids(tok, turns[0][0], system)
        g = torch.Generator(device=device).manual_seed(0)
        return tok.decode(generate(model, ids, max_new, temperature=0, eos_id=tok.eos_id, generator=g))

    def exact_match(n):
        """greedy answers of the first n validation examples compared with the reference, stripped."""
        rng_state = torch.get_rng_state()
        hits = 0
        for _, _, (system, turns) in val_set[:n]:
            ref = turns[0][1]
            hits += answer(system, turns, len(tok.encode(ref, bos=False)) + 8).strip() == ref.strip()
        torch.set_rng_state(rng_state)
        return hits / min(n, len(val_set))

    if args.eval_every and val_set and start == 1:
        val_loss = evaluate()
        print(f"validation loss before fine-tuning: {val_loss:.4f}")
        log({"event": "eval", "step": 0, "val_loss": val_loss})
    if args.exact_match and val_set and start == 1:
        em = exact_match(args.exact_match)
        print(f"exact match before fine-tuning: {em:.1%} of {min(args.exact_match, len(val_set))} held-out answers")
        log({"event": "exact_match", "step": 0, "exact_match": em})

    # --- the training loop -------------------------------------------------------------------------------
    epoch_cache = {}

    def next_batch():
        """the next micro-batch in a fixed per-epoch order (so a resumed run sees the same data)."""
        if epoch_cache.get("epoch") != pos["epoch"]:  # one permutation per epoch, not per micro-batch
            epoch_cache.update(epoch=pos["epoch"], order=data.epoch_order(len(train_set), args.seed, pos["epoch"]))
        order = epoch_cache["order"]
        take = order[pos["index"]:pos["index"] + args.batch_size]
        pos["index"] += len(take)
        if pos["index"] >= len(order):
            pos["epoch"], pos["index"] = pos["epoch"] + 1, 0
        examples = [train_set[i] for i in take]
        return (*data.collate(examples, tok.eos_id), sum(len(x) for x, _, _ in examples))

    def lr_at(t):  # linear warmup to the peak, then linear decay (the last step gets peak / (T - warmup))
        warm = args.warmup * total_steps if args.warmup < 1 else args.warmup
        if t <= warm:
            return lr * t / warm
        return lr * (total_steps - t + 1) / max(total_steps - warm, 1)

    interrupted = []  # the first Ctrl-C finishes the step, saves and exits; a second one exits at once
    old_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1) if not interrupted else sys.exit(130))

    def finish(code):
        signal.signal(signal.SIGINT, old_handler)
        return code

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    from tqdm import tqdm
    bar = tqdm(range(start, total_steps + 1), initial=start - 1, total=total_steps, dynamic_ncols=True)
    model.train()
    t_start, tokens_seen, last_saved = time.time(), 0, start - 1
    for step in bar:
        t_step = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if selector:
            selector.begin_step(step)  # SpIEL-AG: this step's gradients also feed the accumulation window
        micro = [next_batch() for _ in range(args.grad_accum)]
        n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in micro)
        loss_sum = 0.0
        for x, y, n_tokens in micro:
            _, loss = model(x.to(device), y.to(device), reduction="sum")
            (loss / n_targets).backward()  # normalised per target token over the whole step
            loss_sum += loss.item()
            tokens_seen += n_tokens  # non-padding tokens
        train_loss = loss_sum / n_targets
        if not math.isfinite(train_loss):
            print(f"\nerror: step {step}: the loss is {train_loss}; stopping. The last checkpoint in {args.out} "
                  f"(step {last_saved}) is intact; try a lower --lr.", file=sys.stderr)
            return finish(1)
        # clips if > 0; an open AG window has already summed these gradients, unclipped
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # --- drop and regrow (SpIEL section 3): the smallest deltas make room for new positions ----------
        if selector and selector.schedule.is_reselection(step):
            changed = selector.reselect(step, optimizer)
            k = sum(layer.indices.numel() for layer in selector.layers.values())
            n = sum(changed.values())
            tqdm.write(f"step {step}: reselection replaced {n:,} of {k:,} deltas ({n / k:.1%}; scheduled "
                       f"{selector.schedule.fraction(step):.1%})")
            log({"event": "reselect", "step": step, "changed": n, "of": k, "by_matrix": changed})

        dt = time.time() - t_step
        tok_s = tokens_seen / (time.time() - t_start)
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr_at(step):.2e}", tok_s=f"{tok_s:.0f}")
        log({"step": step, "loss": train_loss, "lr": lr_at(step), "grad_norm": grad_norm, "step_time": dt,
             "tokens_per_s": tok_s})
        if args.eval_every and val_set and (step % args.eval_every == 0 or step == total_steps):
            val_loss = evaluate()
            _, _, (system, turns) = val_set[0]
            sample = answer(system, turns, 64)
            tqdm.write(f"step {step}: validation loss {val_loss:.4f} | {turns[0][0][:60]!r} -> {sample[:80]!r}")
            log({"event": "eval", "step": step, "val_loss": val_loss, "sample": sample})
        stop = interrupted or step == args.stop_at_step
        if step % args.save_every == 0 or step == total_steps or stop:
            save(step)
            last_saved = step
        if stop:
            bar.close()
            print(f"stopped after step {step}; continue with: python train.py --out {args.out} --resume")
            return finish(130 if interrupted else 0)
    bar.close()
    finish(0)

    # --- the end: what it cost, what it gave -------------------------------------------------------------
    elapsed = time.time() - t_start
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(f"done: {total_steps - start + 1} steps in {elapsed:.0f}s, {tokens_seen / elapsed:.0f} tokens/s, peak "
          f"{'GPU memory allocated' if device.startswith('cuda') else 'RSS'} {peak:.2f} GB")
    log({"event": "end", "seconds": elapsed, "tokens_per_s": tokens_seen / elapsed, "peak_memory_gb": peak})
    if args.method == "full":
        save_hf(model, tok.path, os.path.join(args.out, "model"))
    if args.exact_match and val_set:
        em = exact_match(args.exact_match)
        print(f"exact match after fine-tuning: {em:.1%} of {min(args.exact_match, len(val_set))} held-out answers")
        log({"event": "exact_match", "step": total_steps, "exact_match": em})
    artifact = {"lora": "lora.safetensors", "full": "model/"}.get(args.method, "delta.safetensors")
    print(f"saved {os.path.join(args.out, artifact)}; sample with: python generate.py --ckpt {args.ckpt} "
          + (f"--delta {os.path.join(args.out, artifact)} " if args.method != "full" else "") + '--chat --prompt "..."')
    if demo:
        print("to fine-tune LLaMA 2 7B the same way on one GPU:\n  python train.py --ckpt llama-2-7b "
              "--data your.jsonl --quantize int8 --grad-checkpoint   (see README.md)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (CheckpointError, data.DataError, ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
