"""
What a training run asks of the machine: its device and compute dtype, its processes under torchrun (data
parallel, FSDP for the frozen base), a polite stop on Ctrl-C or a job scheduler's SIGTERM, glibc's malloc at 7B
width, and the run's own peak memory.
"""

import os
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# processes: torchrun's environment is read here, and nowhere else


@dataclass
class Processes:
    """this process's place in a torchrun run (one process alone: rank 0 of 1)."""
    rank: int = 0
    world: int = 1  # processes in all
    per_node: int = 1  # processes on each machine (for the resume command)


def under_torchrun() -> bool:
    return "RANK" in os.environ


def setup_distributed(device: str) -> tuple:
    """(Processes, this process's device) from torchrun's environment; NCCL on GPUs, gloo on the CPU."""
    if not under_torchrun():
        return Processes(), device
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    world = dist.get_world_size()
    return Processes(dist.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))), device


def leave(code):
    """sys.exit(code); under torchrun on the CPU without Python's teardown (stdout and stderr flushed): gloo's
    worker threads may still be dropping the last collective's tensors then, and one that needs the interpreter
    as it shuts down aborts the finished process (SIGABRT: 5 of 80 two-process runs here). Ending the
    process group first does not help: once torch has imported its compiler, something there holds the group."""
    if not (dist.is_initialized() and dist.get_backend() == "gloo"):
        sys.exit(code)
    if isinstance(code, str):  # as sys.exit: the message on stderr, exit code 1
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def full_fsdp(args) -> bool:
    """--fsdp on full fine-tuning: the trainable weights themselves are sharded."""
    return args.fsdp and args.method == "full"


def shard(model, params, full: bool):
    """--fsdp: each transformer block's frozen weights sharded across the processes (FSDP2's fully_shard per
    block); the trainable deltas / adapters stay whole on every process. Full fine-tuning shards everything
    (FSDP then averages the gradients: train_step scales the loss). SpIEL's deltas must have been added with
    resident=False: a sharded base has no whole weight to hold W0 + delta (spiel.py section 9)."""
    from torch.distributed.fsdp import fully_shard
    for module in [*model.layers, model]:
        fully_shard(module, ignored_params=None if full else set(params))


def gather(obj, world: int) -> list:
    """obj from every process, in rank order (one process: [obj])."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def usable_device(name: str) -> str:
    """`name` if this torch can compute there (cpu, cuda, cuda:N, mps), else a ValueError saying why."""
    try:
        kind, index = torch.device(name).type, torch.device(name).index
    except (RuntimeError, ValueError):
        raise ValueError(f"{name!r} is not a device: use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"{name}: {why}; use --device cpu")
    if kind == "cuda" and (index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), counted from 0")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: this torch cannot use Apple's GPU here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}: not a device this code runs on: use cpu, cuda or cuda:N")
    return name


def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU that has it (compute capability >= 8.0), else fp32. never fp16 for training: it needs
    loss scaling, which would also scale SpIEL-AG's accumulated gradients."""
    if str(device).startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        print("warning: this GPU has no bf16 (compute capability < 8.0); computing in fp32 "
              "(--quantize int8 or nf4 keeps the stored base small)")
    return torch.float32  # on the CPU bf16 matmuls are slow


class RanksDisagree(Exception):
    """processes of one run hold different sparse indices: their deltas would silently diverge."""


def check_ranks_agree(indices: list, t: int):
    """after SpIEL's reselection at step t: stop the run if any process's sparse indices differ from rank 0's
    (compared by a checksum per matrix)."""
    s = torch.stack([(idx.long() * 2654435761 % 2**31).sum() for idx in indices])  # (matrices,)
    ref = s.clone()
    dist.broadcast(ref, src=0)
    ok = torch.tensor([float(torch.equal(s, ref))], device=s.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise RanksDisagree(f"step {t}: the ranks disagree on the sparse indices after reselection "
                           f"(rank {dist.get_rank()}: checksum {s.sum().item()} vs rank 0's {ref.sum().item()})")


# -----------------------------------------------------------------------------
# a polite stop


class Stop:
    """the first Ctrl-C (or a SIGTERM, as a job scheduler sends before it kills) asks the run to finish its step,
    save and exit; a second Ctrl-C quits at once. Under torchrun, Ctrl-C reaches torchrun, which passes it on to
    every process and kills them 30 s later: the processes agree to stop after the same step (`agree`).
    Use as `with Stop(quiet) as stop:` around the loop; outside it Ctrl-C interrupts as usual."""

    def __init__(self, quiet: bool = False):
        self.requested, self.quiet = False, quiet  # quiet: every process but rank 0 (one message is enough)

    def __enter__(self):
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def on_signal(self, signum, _):
        if self.requested and signum == signal.SIGINT:
            raise SystemExit("quit without saving; the last checkpoint is intact")
        if not self.requested:
            self.requested = True
            if not self.quiet:
                print(f"\n{signal.Signals(signum).name}: finishing this step, saving, exiting "
                      "(Ctrl-C again to quit at once)", file=sys.stderr)

    def agree(self, stop_here: bool, world: int, device) -> bool:
        """stop after this step? Yes where any process was asked to (a signal, or stop_here): one process stopping
        alone would leave the others waiting in a collective. One all-reduce per step under torchrun."""
        stop = self.requested or stop_here
        if world > 1:
            flags = torch.tensor([self.requested, stop], dtype=torch.float32, device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            self.requested, stop = self.requested or bool(flags[0]), bool(flags[1])
        return stop


# -----------------------------------------------------------------------------
# memory


def fix_mmap_threshold(shapes):
    """a large model (a weight matrix of 32 MB or more in fp32): glibc's malloc gives every block from 1 MB up
    its own mmap, returned when freed. By itself glibc keeps freed blocks of up to 32 MB in its heap (its mmap
    threshold rises to that), and at 7B the per-matrix temporaries fragment it: the 4-layer full-size check
    peaked 8% higher that way (docs/fullsize.md). Not for smaller models: there the fresh pages cost speed
    (a LoRA step 13%, a SpIEL-MA step 2% on the bench shape: tools/measure/mmap_threshold.py)."""
    if shapes.dim * max(shapes.dim, shapes.ffn_dim) < 2**23:
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


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
