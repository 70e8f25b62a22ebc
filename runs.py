"""
A train.py run's folder, and how --resume continues it exactly.

    runs/x/args.json          the run's arguments, input paths absolute (--resume reads them back)
    runs/x/log.jsonl          one JSON record per step, reselection, evaluation (plot.py draws them)
    runs/x/state.pt           the resume state: trainable tensors, optimizer, open AG windows, step, data
                              position, every process's RNG (plain tensors: torch.load(weights_only=True))
    runs/x/delta.safetensors  SpIEL's deltas (lora.safetensors for LoRA; model/ after full fine-tuning)
    runs/x/lock               while a run lives: who writes the folder (pid, host); one writer per folder

Every file is written to a temporary name and renamed (files.py), so an interruption never leaves half a file,
and a failed write (a full disk) leaves the previous one intact. The folder is created once the inputs have
passed their checks; until its first checkpoint it holds only args.json and log.jsonl: starting the same run
again reuses it.
"""

import fcntl
import json
import os
import shlex
import socket
import time
import uuid

import torch

import finetune
import spiel
from files import CheckpointError, Progress, check_writable, sha256, write_json, write_whole
from merge import save_hf
from system import Processes, full_fsdp, gather

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
    second train.py on a live run stops at once; one that could not be created or written is refused now too.
    Nothing is left here."""
    args.out = os.path.abspath(args.out or os.path.join("runs", f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"{args.out}: exists and is not a folder; choose another --out")
    check_writable(args.out, "--out")
    if os.path.isdir(args.out):
        lock.acquire(args.out)
        if not args.resume and set(os.listdir(args.out)) - RESTARTABLE - {"lock"}:
            lock.release()
            raise FileExistsError(f"{args.out}: exists and is not empty; use --resume or another --out")


def prepare(args, lock: RunLock, total_steps: int):
    """a new run's folder, once its inputs have passed their checks: created (or a run stopped before its first
    checkpoint cleared), locked, and its args.json written."""
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:  # (claim checked it could be: the disk changed since)
        raise CheckpointError(f"{args.out}: cannot be created ({e.strerror or e})") from None
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


def write_args(args):
    write_json(os.path.join(args.out, "args.json"),
               {k: v for k, v in vars(args).items() if k not in ("resume", "stop_at_step")})


def shown(path: str) -> str:
    """a path as a user types it here: relative to the working directory when inside it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def resume_command(out: str, procs: Processes) -> str:
    """the command that continues the run in `out`, ready to paste into a shell: torchrun with the same number
    of processes (and machines) when it ran under torchrun."""
    script = shlex.quote(shown(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")))
    world, local = procs.world, procs.per_node
    launch = "python" if world == 1 else f"torchrun --nproc_per_node {world}" if local == world else \
        f"torchrun --nnodes {world // local} --nproc_per_node {local}"
    return f"{launch} {script} --out {shlex.quote(shown(out))} --resume"


def trainable_state(model, method) -> dict:
    sd = model.state_dict()
    return sd if method == "full" else {k: v for k, v in sd.items() if k.endswith((".values", ".indices", ".A", ".B"))}


def save_state(args, step, model, optimizer, selector, batches, procs: Processes, base: finetune.Base,
               last_saved: int = 0):
    """the resume state (and SpIEL's delta / LoRA's adapter, trained on `base`), written by rank 0; every process
    takes part (its RNG state, and with --fsdp on full fine-tuning, its shard of the weights and the optimizer).
    Each file is written whole or not at all: a failed write (a full disk) is one line naming it, saying that the
    checkpoint of step `last_saved` is intact and how to go on."""
    try:
        write_state(args, step, model, optimizer, selector, batches, procs, base)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; " + (f"the checkpoint of step {last_saved} is intact: free some space, then "
                                          f"{resume_command(args.out, procs)}" if last_saved else
                                          "free some space and start again")) from None


def write_state(args, step, model, optimizer, selector, batches, procs: Processes, base: finetune.Base):
    if full_fsdp(args):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        trainable, opt = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    else:
        trainable, opt = trainable_state(model, args.method), optimizer.state_dict()
    rngs = gather(torch.get_rng_state(), procs.world)
    cuda_rngs = gather(torch.cuda.get_rng_state() if torch.cuda.is_available() else None, procs.world)
    if procs.rank:
        return
    meta = {"method": args.method, "step": step, "finetune_id": args.finetune_id}
    state = {"step": step, "world_size": procs.world, "base_fingerprint": base.fingerprint, "optimizer": opt,
             "data": {"epoch": batches.epoch, "index": batches.index}, "trainable": trainable,
             "selector": selector.state_dict() if selector else {}, "rng": rngs, "cuda_rng": cuda_rngs}
    size = tensor_bytes(state)  # (2.6 GB with the delta at 7B: a bar in a terminal, a line in a log)
    progress = Progress(f"saving step {step} to {args.out}", size + tensor_bytes(trainable) * (args.method != "full"))
    if args.method != "full":
        finetune.save(model, os.path.join(args.out, finetune_file(args.method)), base, meta)
    progress.update(tensor_bytes(trainable) * (args.method != "full"))
    # last: a failed write of the delta leaves the previous checkpoint whole, and state.pt is what --resume reads
    write_whole(os.path.join(args.out, "state.pt"), lambda tmp: torch.save(state, tmp))
    progress.update(size)
    progress.close()


def export_model(args, model, base: finetune.Base, procs: Processes):
    """after full fine-tuning: the model in the HF layout in <out>/model (with the base's config and tokenizer
    files; gathered on rank 0 under --fsdp),
    replacing the one an earlier (extended) run exported once the new one is whole."""
    sd = None
    if full_fsdp(args):
        from torch.distributed.checkpoint import state_dict as dcp
        sd = dcp.get_model_state_dict(model, options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if procs.rank == 0:
        save_hf(model, args.ckpt, os.path.join(args.out, "model"), base.merged, state_dict=sd, replace=True)


def tensor_bytes(obj) -> int:
    """bytes of the tensors in nested dicts and lists."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(v) for v in items)


def finished_step(args):
    """the last step of a finished run that --resume has nothing to add to, read without loading the data or
    the model (state.pt memory-mapped, log.jsonl's end record); None if it is not finished or cannot tell. A
    run without state.pt is refused here, before anything loads."""
    if not os.path.isfile(os.path.join(args.out, "state.pt")):
        raise CheckpointError(no_state(args.out))
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


def no_state(out: str) -> str:
    """why the run in `out` without a state.pt cannot continue, and what to do instead."""
    path, kept = os.path.join(out, "state.pt"), sorted(set(os.listdir(out)) - RESTARTABLE - {"lock"})
    if not kept:
        return (f"{path}: not found; the run stopped before its first checkpoint: run the command that started it "
                f"again, without --resume, to start it over")
    return (f"{path}: not found (deleted?), so this run cannot continue; what it made ({', '.join(kept)}) is "
            f"usable as it is; to train further, start a new run with another --out")


def finished(out, step) -> str:
    return f"{out} already finished at step {step}; extend it with --resume --max-steps N (N > {step})"


STATE_KEYS = ("step", "world_size", "optimizer", "data", "trainable", "selector", "rng", "cuda_rng")


def finetune_file(method: str) -> str:
    """where a run keeps its fine-tune: delta.safetensors (SpIEL), lora.safetensors, or model/ (full)."""
    return {"lora": "lora.safetensors", "full": "model"}.get(method, "delta.safetensors")


def load_state(args, model, optimizer, selector, batches, procs: Processes, fingerprint: str) -> int:
    """put a run's resume state back in place; -> the last step it finished. Errors name state.pt."""
    path = os.path.join(args.out, "state.pt")
    if not os.path.isfile(path):
        raise CheckpointError(no_state(args.out))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: damaged ({first}); it is written atomically, so this is a copy or disk "
                              f"fault: restore the folder, or start a new run") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["dict"]
    if missing or not len(state["rng"]) == len(state["cuda_rng"]) == state["world_size"] or \
            not {"epoch", "index"} <= set(state["data"]):
        raise CheckpointError(f"{path}: not a resume state of this train.py (no {', '.join(missing) or 'rank data'}); "
                              f"start a new run")
    trainable, step = state["trainable"], state["step"]
    if state.get("base_fingerprint", fingerprint) != fingerprint:
        raise CheckpointError(f"{args.ckpt}: not the base this run trained on (its fingerprint differs from {path}'s)")
    if state["world_size"] != procs.world:
        per_node = procs.per_node if procs.world > 1 else state["world_size"]
        saved = Processes(world=state["world_size"], per_node=per_node)
        raise CheckpointError(f"{path}: saved by {state['world_size']} process(es), resumed by {procs.world}; resume "
                              f"with: {resume_command(args.out, saved)}")
    if full_fsdp(args):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=trainable, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
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
    torch.set_rng_state(state["rng"][procs.rank])
    if state["cuda_rng"][procs.rank] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"][procs.rank])
    batches.epoch, batches.index = state["data"]["epoch"], state["data"]["index"]
    return step
