"""
A train.py run: its arguments (every knob and its one default), the folder it writes, and how --resume
continues it exactly.

    runs/x/args.json          the run's arguments, input paths absolute (--resume reads them back)
    runs/x/log.jsonl          one JSON record per step, reselection, evaluation (plot.py draws them)
    runs/x/state.pt           the resume state: trainable tensors, optimizer, open AG windows, step, data
                              position, every process's RNG (plain tensors: torch.load(weights_only=True))
    runs/x/delta.safetensors  SpIEL's deltas (lora.safetensors for LoRA; model/ after full fine-tuning)
    runs/x/lock               while a run lives: who writes the folder (pid, host); one writer per folder

Every file is written to a temporary name and renamed, so an interruption never leaves half a file, and a
failed write (a full disk) leaves the previous one intact. The folder is created once the inputs have
passed their checks; until its first checkpoint it holds only args.json and log.jsonl: starting the same
run again reuses it.
"""

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid

import torch
import torch.distributed as dist

from llama import CheckpointError, Progress, default_device, read_json, write_whole

# -----------------------------------------------------------------------------
# the arguments: one-line errors for values that cannot make sense; --resume's rules


def checked(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    return parse


POSITIVE, COUNT = checked(float, lambda v: v > 0, "> 0"), checked(int, lambda v: v >= 1, "an integer >= 1")
NONNEG, NONNEG_INT = checked(float, lambda v: v >= 0, ">= 0"), checked(int, lambda v: v >= 0, "an integer >= 0")
FRACTION, BELOW_1 = checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no abbreviated flags."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def error(self, message):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


# peak learning rates by method when --lr is not given: the paper's for LLaMA 2 (section 4.2)
DEFAULT_LR = {"spiel-ag": 1e-5, "spiel-ma": 1e-3, "lora": 1e-4, "full": 2e-5}
# SpIEL-AG's weight decay: the authors' 30 at their lr 1e-5 shrinks every delta by lr x wd = 3e-4 per step at
# the peak. when --weight-decay is not given, any --lr keeps that shrink (wd = 3e-4 / lr); the others: 0
AG_DECAY_PER_STEP = 3e-4


def lr_and_decay(method: str, lr=None, weight_decay=None) -> tuple:
    """the peak learning rate and weight decay a run uses: the given ones, else the method's defaults."""
    lr = lr or DEFAULT_LR[method]
    return lr, weight_decay if weight_decay is not None else AG_DECAY_PER_STEP / lr if method == "spiel-ag" else 0.0


def get_parser(description: str = "") -> Parser:
    """train.py's arguments: the one place each default is set (memory.py and bench.py read them here)."""
    ap = Parser(prog="train.py", description=description)
    a = ap.add_argument
    # model and data
    a("--ckpt", help="LLaMA 2 checkpoint folder, Meta or Hugging Face layout (omit all arguments for the demo)")
    a("--data", help="training data, .jsonl or .json: Alpaca, prompt/completion or chat 'messages' records "
                     "(default: the demo's task, a short run)")
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


# flags --resume accepts: what extends the run, or does not change its math; the inputs may have moved
RESUME_FLAGS = {"max_steps", "save_every", "eval_every", "exact_match", "stop_at_step", "log_every", "threads",
                "device", "ckpt", "data", "val_data"}
PATHS = ("ckpt", "data", "val_data")


def resolve_args(parser: argparse.ArgumentParser, argv: list) -> argparse.Namespace:
    """a new run's arguments with absolute input paths, or (--resume) the stored arguments of the run in --out
    updated by the flags that may change; a flag that would change the math is refused, naming it."""
    args = parser.parse_args(argv)
    if not args.resume:
        if args.ckpt is None or args.data is None:
            parser.error("--ckpt is required (no arguments at all: the demo; --ckpt alone: the demo's task on "
                         "that model)")
        for key in PATHS:
            setattr(args, key, getattr(args, key) and os.path.abspath(getattr(args, key)))
        return args
    if not args.out:
        parser.error("--resume needs --out, the folder of the run to continue")
    options = {s: action.dest for action in parser._actions for s in action.option_strings}
    given = {options[t.split("=")[0]] for t in argv if t.split("=")[0] in options} - {"resume", "out"}
    stored = read_json(os.path.join(args.out, "args.json"), "not a run folder, or its args.json is damaged")
    for key in given:
        value = os.path.abspath(getattr(args, key)) if key in PATHS else getattr(args, key)
        was, named = run_value(stored, key)
        if value != was and key not in RESUME_FLAGS:
            parser.error(f"--{key.replace('_', '-')} cannot change when resuming (the run has {named}); start a new "
                         f"run with another --out")
        stored[key] = value
    for key in PATHS:
        if stored.get(key) and not os.path.exists(stored[key]):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"{stored[key]}: not found ({flag} stored in {args.out}/args.json); pass {flag} "
                                  f"with its new place")
    return argparse.Namespace(**{**vars(parser.parse_args([])), "finetune_id": None, "data_sha256": None,
                                 "total_steps": None, **stored,
                                 "out": os.path.abspath(args.out), "resume": True, "stop_at_step": args.stop_at_step})


def run_value(stored: dict, key: str) -> tuple:
    """(the value a run used for an argument, how a resume refusal names it): a default that depends on the
    method (--lr, --weight-decay) is worked out."""
    if stored.get(key) is None and key in ("lr", "weight_decay"):
        method = stored.get("method", "spiel-ag")
        lr, wd = lr_and_decay(method, stored.get("lr"), stored.get("weight_decay"))
        value = float(f"{lr if key == 'lr' else wd:.12g}")  # (3e-4 / 1e-5 is 29.999999999999996; one types 30)
        return value, f"{value:g}, the default for {method}" + (f" at lr {lr:g}" if key != "lr" and wd else "")
    return stored.get(key), "its default" if stored.get(key) is None else repr(stored[key])


# -----------------------------------------------------------------------------
# the folder: args.json, log.jsonl, state.pt


class Log:
    """log.jsonl: one JSON record per line (rank 0 writes; the others pass path None). A line that cannot be
    written whole (a full disk) is taken back, so the log stays readable, and the error names the file."""

    def __init__(self, path):
        self.path, self.file = path, open(path, "a") if path else None

    def __call__(self, record: dict):
        if self.file:
            end = self.file.tell()
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:
                self.file = open(self.path, "a")  # (the old handle may still hold the unwritten line)
                self.file.truncate(end)
                raise CheckpointError(f"{self.path}: not written ({e.strerror or e})") from None


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class RunLock:
    """one writer per run folder: an exclusive flock on <folder>/lock, whose text names the holder (pid, host).
    The OS drops a flock when its process ends, however it ends, so a lock left by a killed process never
    blocks a resume. (Under torchrun only rank 0 takes it.)"""

    def __init__(self):
        self.file = None

    def acquire(self, folder: str):
        path = os.path.join(folder, "lock")
        while True:
            f = open(path, "a+")  # (creates it, leaving a holder's text alone)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "a process that is starting"
                f.close()
                raise CheckpointError(f"{folder}: in use by another train.py ({holder}); wait for it to end or "
                                      f"stop it, or choose another --out") from None
            try:  # the lock file we hold must still be the one at `path` (a holder removes it when it ends)
                if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = f

    def release(self):
        if self.file:
            os.remove(self.file.name)
            self.file.close()
            self.file = None


RESTARTABLE = {"args.json", "log.jsonl"}  # all a run holds before its first checkpoint


def claim(args, lock: RunLock):
    """before anything slow: --out of a new run (default runs/<method>-<time>) must be new, or hold only a run
    stopped before its first checkpoint; a folder that exists (a resume's always does) is locked now, so a
    second train.py on a live run stops at once. Nothing is created here."""
    args.out = os.path.abspath(args.out or os.path.join("runs", f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if os.path.isdir(args.out):
        lock.acquire(args.out)
        if not args.resume and set(os.listdir(args.out)) - RESTARTABLE - {"lock"}:
            lock.release()
            raise FileExistsError(f"{args.out}: exists and is not empty; use --resume or another --out")
    elif os.path.exists(args.out):
        raise FileExistsError(f"{args.out}: exists and is not a folder; choose another --out")


def prepare(args, lock: RunLock, total_steps: int):
    """a new run's folder, once its inputs have passed their checks: created (or a run stopped before its first
    checkpoint cleared), locked, and its args.json written."""
    os.makedirs(args.out, exist_ok=True)
    if not lock.file:
        claim(args, lock)
    files = set(os.listdir(args.out)) & RESTARTABLE
    if files:
        print(f"note: {args.out} holds a run stopped before its first checkpoint; starting it over")
        for name in files:
            os.remove(os.path.join(args.out, name))
    args.finetune_id = uuid.uuid4().hex[:16]  # recorded in the delta, and by merge.py in what it merges into
    args.data_sha256 = sha256(args.data) if os.path.isfile(args.data) else None  # a resume checks the data
    args.total_steps = total_steps  # what --resume --max-steps extends (or shortens)
    write_args(args)


def write_json(path, obj):
    """obj as JSON at path, written whole (a temporary name, renamed)."""
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_whole(path, dump)


def write_args(args):
    write_json(os.path.join(args.out, "args.json"),
               {k: v for k, v in vars(args).items() if k not in ("resume", "stop_at_step")})


# -----------------------------------------------------------------------------
# what a run costs: its own peak memory


def anon_rss() -> int:
    """bytes of this process's anonymous resident memory (what it allocated itself; Linux), else 0."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


class PeakMemory:
    """the peak of this process's own memory from now on. CUDA: torch's peaks of allocated and reserved memory.
    CPU (Linux): the anonymous resident memory (RssAnon), sampled every 10 ms by a thread. The usual peak RSS
    (ru_maxrss) also counts the pages of an mmap'ed checkpoint read while loading: page cache the OS drops when
    it needs the room, which would make 7B look twice its size."""

    def __init__(self):
        self.peak, self.done = anon_rss(), threading.Event()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if self.peak:
            threading.Thread(target=self.sample, daemon=True).start()

    def sample(self):
        while not self.done.wait(0.01):
            self.peak = max(self.peak, anon_rss())

    def stop(self):
        self.done.set()

    def report(self, device) -> dict:
        """-> {"peak_gb": ..., "what": ...} (CUDA: also "reserved_gb")"""
        if str(device).startswith("cuda"):
            return {"peak_gb": torch.cuda.max_memory_allocated() / 1e9, "reserved_gb":
                    torch.cuda.max_memory_reserved() / 1e9, "what": "GPU memory allocated by torch"}
        if self.peak:
            return {"peak_gb": self.peak / 1e9, "what": "the process's own memory (anonymous RSS; the page cache "
                                                       "of the mmap'ed checkpoint not counted)"}
        import resource  # (no /proc: the plain peak RSS, page cache included; bytes on macOS)
        return {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e9 * (1 if sys.platform ==
                "darwin" else 1024), "what": "peak RSS (includes the mmap'ed checkpoint's page cache)"}


def per_second(count: float, seconds: float, unit: str = "tokens") -> str:
    """a rate that reads right at any speed: 1,234 tokens/s, 12.3 tokens/s, 0.421 tokens/s."""
    rate = count / max(seconds, 1e-9)
    return f"{rate:,.0f} {unit}/s" if rate >= 100 else f"{rate:.3g} {unit}/s"


def shown(path: str) -> str:
    """a path as a user types it here: relative to the working directory when inside it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def resume_command(out: str, world: int) -> str:
    """the command that continues the run in `out`, ready to paste into a shell: torchrun with the same number
    of processes when it ran under torchrun."""
    script = shlex.quote(shown(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    launch = "python" if world == 1 else f"torchrun --nproc_per_node {world}" if local == world else \
        f"torchrun --nnodes {world // local} --nproc_per_node {local}"
    return f"{launch} {script} --out {shlex.quote(shown(out))} --resume"


def gather(obj, world: int) -> list:
    """obj from every process, in rank order (one process: [obj])."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def full_fsdp(args) -> bool:
    return args.fsdp and args.method == "full"  # the trainable weights themselves are sharded


def trainable_state(model, method) -> dict:
    sd = model.state_dict()
    return sd if method == "full" else {k: v for k, v in sd.items() if k.endswith((".values", ".indices", ".A", ".B"))}


def save_state(args, step, model, optimizer, selector, batches, rank, world, fingerprint):
    """the resume state (and SpIEL's delta / LoRA's adapter), written by rank 0; every process takes part
    (its RNG state, and with --fsdp on full fine-tuning, its shard of the weights and the optimizer). Each
    file is written whole or not at all (a full disk: one line naming it, the last checkpoint intact)."""
    if full_fsdp(args):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        trainable, opt = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    else:
        trainable, opt = trainable_state(model, args.method), optimizer.state_dict()
    rngs = gather(torch.get_rng_state(), world)
    cuda_rngs = gather(torch.cuda.get_rng_state() if torch.cuda.is_available() else None, world)
    if rank:
        return
    import lora
    import spiel
    meta = {"method": args.method, "step": step, "finetune_id": args.finetune_id}
    state = {"step": step, "world_size": world, "base_fingerprint": fingerprint, "optimizer": opt,
             "data": {"epoch": batches.epoch, "index": batches.index}, "trainable": trainable,
             "selector": selector.state_dict() if selector else {}, "rng": rngs, "cuda_rng": cuda_rngs}
    size = tensor_bytes(state)  # (2.6 GB with the delta at 7B: a bar in a terminal, a line in a log)
    progress = Progress(f"saving step {step} to {args.out}", size + tensor_bytes(trainable) * (args.method != "full"))
    if args.method in ("spiel-ag", "spiel-ma"):
        spiel.save_delta(model, os.path.join(args.out, "delta.safetensors"), meta)
    elif args.method == "lora":
        lora.save_lora(model, os.path.join(args.out, "lora.safetensors"), meta)
    progress.update(tensor_bytes(trainable) * (args.method != "full"))
    # last: a failed write of the delta leaves the previous checkpoint whole, and state.pt is what --resume reads
    write_whole(os.path.join(args.out, "state.pt"), lambda tmp: torch.save(state, tmp))
    progress.update(size)
    progress.close()


def tensor_bytes(obj) -> int:
    """bytes of the tensors in nested dicts and lists."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(v) for v in items)


def finished_step(args):
    """the last step of a finished run that --resume has nothing to add to, read without loading the data or
    the model (state.pt memory-mapped, log.jsonl's end record); None if it is not finished or cannot tell."""
    try:
        step = torch.load(os.path.join(args.out, "state.pt"), mmap=True, weights_only=True)["step"]
        with open(os.path.join(args.out, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        last = max((i for i, r in enumerate(records) if r.get("step") == step and "loss" in r), default=len(records))
        ended = any(r.get("event") == "end" for r in records[last:])  # finish() ran after the saved step
    except Exception:
        return None  # missing or damaged: load_state says which
    if not (step >= args.max_steps if args.max_steps else ended):  # (--epochs: the length needs the data)
        return None
    exported = args.method != "full" or os.path.isdir(os.path.join(args.out, "model"))
    return step if exported else None  # (a full fine-tune cut off in its export: redo it)


def finished(out, step) -> str:
    return f"{out} already finished at step {step}; extend it with --resume --max-steps N (N > {step})"


STATE_KEYS = ("step", "world_size", "optimizer", "data", "trainable", "selector", "rng", "cuda_rng")


def load_state(args, model, optimizer, selector, batches, rank, world, fingerprint) -> int:
    """put a run's resume state back in place; -> the last step it finished. Errors name state.pt."""
    path = os.path.join(args.out, "state.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not found; the run stopped before its first checkpoint: run the same "
                              f"command without --resume to start it over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: damaged ({(str(e).splitlines() or [type(e).__name__])[0]}); it is written "
                              f"atomically, so this is a copy or disk fault: restore the folder, or start a new run") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["dict"]
    if missing or not len(state["rng"]) == len(state["cuda_rng"]) == state["world_size"] or \
            not {"epoch", "index"} <= set(state["data"]):
        raise CheckpointError(f"{path}: not a resume state of this train.py (no {', '.join(missing) or 'rank data'}); "
                              f"start a new run")
    trainable, step = state["trainable"], state["step"]
    if state.get("base_fingerprint", fingerprint) != fingerprint:
        raise CheckpointError(f"{args.ckpt}: not the base this run trained on (its fingerprint differs from {path}'s)")
    if state["world_size"] != world:
        raise CheckpointError(f"{path}: saved by {state['world_size']} process(es), resumed by {world}; resume "
                              f"with: {resume_command(args.out, state['world_size'])}")
    if full_fsdp(args):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=trainable, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        import spiel
        for layer in spiel.delta_layers(model).values():
            spiel.release(layer)  # the positions are about to be overwritten (spiel.py section 9)
        want = trainable_state(model, args.method)
        if set(trainable) != set(want) or any(trainable[k].shape != want[k].shape for k in want):
            raise CheckpointError(f"{path}: does not match this model's trainable tensors (another model or method?)")
        with torch.no_grad():
            for k, v in trainable.items():
                want[k].copy_(v)  # in place: the optimizer keeps pointing at the same tensors
        optimizer.load_state_dict(state["optimizer"])
    if selector:
        selector.load_state_dict(state["selector"])
    torch.set_rng_state(state["rng"][rank])
    if state["cuda_rng"][rank] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"][rank])
    batches.epoch, batches.index = state["data"]["epoch"], state["data"]["index"]
    return step
