"""
Files, read and written safely: every error is one line naming the file, every write is whole or not at all
(a temporary name, then a rename), written files get the mode the user's umask gives, and a long read or
write reports its progress. Everything that touches the disk goes through here; it imports nothing of the repo.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import torch


class CheckpointError(Exception):
    """a checkpoint, tokenizer, fine-tune or run file that cannot be used; the message names the file."""


# -----------------------------------------------------------------------------
# reading


def read_json(path, hint: str = "") -> dict:
    """a JSON object from `path`; anything else is a CheckpointError naming it (with `hint`: what it should be)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{path}: not found" + (f" ({hint})" if hint else "")) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})" + (f"; {hint}" if hint else "")) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def torch_load(path):
    """plain tensors only, memory-mapped: weights_only=True refuses (never executes) any other pickled object."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
            raise CheckpointError(f"{path}: refusing to unpickle objects that are not plain tensors ({msg})") from None
        raise CheckpointError(f"{path}: cannot read (truncated or not a PyTorch file: {msg})") from None


def sha256(path) -> str:
    """the first 16 hex digits of a file's SHA-256 (a run checks its data by it; a foreign adapter's id)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# writing: whole or not at all


def give_umask_mode(path: str):
    """the mode the user's umask gives a new file (safetensors creates its files 600: colleagues on a shared
    cluster could not read a fine-tune)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_failure(e: BaseException, path: str):
    """the cause of a failed write in words, or None if `e` is no write failure. torch.save and safetensors say a
    full disk their own way ("[enforce fail at inline_container.cc] unexpected pos", SafetensorError): the free
    space says it plainly (measured before the partial file is removed)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if not (isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError"):
        return None
    try:
        full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free == 0
    except OSError:
        full = False
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return "No space left on device" if full or "os error 28" in text else text


def write_whole(path: str, write):
    """write(tmp) to a temporary name beside `path`, then rename it to `path`: an interruption never leaves half
    a file. A failed write (a full disk: an OSError, or torch's and safetensors' own errors for it) removes the
    temporary file and raises one line naming `path`; whatever was at `path` before is untouched."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        give_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        cause = write_failure(e, tmp)
        if os.path.exists(tmp):
            os.remove(tmp)
        if cause is not None:
            raise CheckpointError(f"{path}: not written ({cause})") from None
        raise


def write_json(path, obj):
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_whole(path, dump)


def check_new_folder(out_dir: str):
    """an output folder must be absent or empty: nothing a user has is ever overwritten."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir}: exists and is not empty; choose a new output folder")


def check_writable(path: str, flag: str, folder: bool = True):
    """before anything slow: the output `path` (a folder; folder=False: a file) can be created and written
    there, else one line naming it and why (`flag`: what to change). The folder that would hold it is tried
    with a probe, made and removed at once: no permission bit tells a read-only disk, or root's limits."""
    where = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise CheckpointError(f"{path}: cannot be created ({where} is a file, not a folder); choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=where))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be written ({e.strerror or e}: {where}); choose another "
                              f"{flag}") from None


def write_folder(out_dir: str, write, replace: bool = False):
    """write(tmp) fills a temporary folder beside `out_dir`, renamed to `out_dir` once whole (an existing one is
    swapped out only with `replace`, else it must be absent or empty). A failed or interrupted write leaves
    neither a half-written `out_dir` nor the temporary folder; a full disk is one line."""
    tmp, old = out_dir.rstrip("/") + ".tmp-export", out_dir.rstrip("/") + ".tmp-old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
        for name in os.listdir(tmp):
            give_umask_mode(os.path.join(tmp, name))
    except BaseException as e:
        cause = write_failure(e, os.path.join(tmp, "x"))
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is not None:
            raise CheckpointError(f"{out_dir}: not written ({cause}); nothing was left there") from None
        raise
    shutil.rmtree(old, ignore_errors=True)  # (left by an earlier write killed at the end)
    if os.path.exists(out_dir):  # empty, or the one being replaced
        if not replace:
            check_new_folder(out_dir)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# progress of the long steps (reading, quantizing or writing 7B takes minutes)

PROGRESS_SECONDS = 10.0  # outside a terminal: a plain line at most this often


class Progress:
    """bytes done of `total`: a tqdm bar when stdout is a terminal, else a plain line at most every
    PROGRESS_SECONDS (and one at the start, from 1 GB), so that a log file (or a job scheduler's output) stays
    readable and never looks hung. quiet: say nothing (the processes of a torchrun run other than rank 0)."""

    def __init__(self, what: str, total: int, quiet: bool = False):
        self.what, self.total, self.done, self.t0 = what, max(total, 1), 0, time.time()
        self.last, self.bar, self.quiet = self.t0, None, quiet
        if not quiet and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=what, unit="B", unit_scale=True, leave=False, delay=1,
                            dynamic_ncols=True)
        elif not quiet and total >= 1e9:
            print(f"{what} ({total / 1e9:.1f} GB)", flush=True)

    def update(self, n: int):
        self.done += n
        if self.bar:
            self.bar.update(n)
        elif not self.quiet and time.time() - self.last >= PROGRESS_SECONDS:
            self.last = time.time()
            print(f"{self.what}: {self.done / 1e9:.1f} of {self.total / 1e9:.1f} GB ({self.done / self.total:.0%}), "
                  f"{self.last - self.t0:.0f}s", flush=True)

    def close(self):
        if self.bar:
            self.bar.close()


def what_file(path: str) -> str:
    """what a file given where a checkpoint folder was expected is, and what to pass instead (for the message of
    llama.check_checkpoint)."""
    name, folder = os.path.basename(path), os.path.dirname(os.path.abspath(path))
    fmt = None
    if name.endswith(".safetensors"):
        try:
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception:
            pass  # not readable as safetensors: described by its name below
    if fmt in ("spiel-delta", "spiel-lora"):
        return (f"a {'sparse delta' if fmt == 'spiel-delta' else 'LoRA adapter'} file: pass the base model's folder "
                f"(generate.py and merge.py take this file with --delta)")
    if name == "tokenizer.model":
        return "a tokenizer: pass the checkpoint folder (its tokenizer.model sits in it or one level up)"
    if name.endswith((".safetensors", ".pth", ".bin", ".pt")) or name in ("config.json", "params.json"):
        return f"a file of a checkpoint: pass the folder that holds it ({folder})"
    return "a file"
