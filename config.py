"""
train.py's knobs: every flag with its one default (get_parser, which the tools read too), the
demo's and the default task's settings, and which flags --resume may change.

    python train.py                    the demo: demo/base fine-tuned on a task it has never seen
    python train.py --ckpt DIR         the same task on that model (no --data): something checkable at once
    python train.py --ckpt DIR --data my.jsonl ...      a run of your own
    python train.py --out runs/x --resume [--max-steps N]   continue one (the flags that may change: RESUME_FLAGS)
"""

import argparse
import contextlib
import os
import shlex

import hub
from files import CheckpointError, read_json
from llama import HF_TO_META, PROJECTIONS
from system import default_device, under_torchrun, usable_device

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")

# -----------------------------------------------------------------------------
# values that cannot make sense are one line, at parse time


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


def device(text: str) -> str:
    """--device: one this torch can compute on (system.usable_device), or argparse's one line."""
    try:
        return usable_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    """train.py's arguments: the one place each default is set (tools/memory.py and tools/bench.py read them here)."""
    ap = Parser(prog="train.py", description=description)
    a = ap.add_argument
    # model and data
    a("--ckpt", help="checkpoint folder (Meta or Hugging Face layout), or a Hub id ORG/NAME (the Hugging Face "
                     "cache's copy; omit all arguments for the demo)")
    a("--data", help="training data: .jsonl, .json, .parquet or a datasets save_to_disk folder, of Alpaca, "
                     "prompt/completion, chat 'messages' or ShareGPT 'conversations' records (default: the demo's "
                     "task, a short run)")
    a("--val-data", help="validation data; default: --val-frac of --data")
    a("--val-frac", type=BELOW_1, default=0.05, help="fraction of --data held out when --val-data is not given")
    a("--seq-len", type=COUNT, default=2048, help="examples are truncated to this many tokens; with packing, the "
                                                  "length of a packed row")
    a("--template", choices=["model", "tulu"], help="chat template: the checkpoint's own (model), or the paper's "
                                                    "(tulu); default: model where the checkpoint has one, else tulu")
    a("--no-packing", action="store_true", help="one example a row, right-padded (default: a step's examples packed "
                                                "into rows of --seq-len tokens, each attending only to itself)")
    # method and budget
    a("--method", default="spiel-ag", choices=["spiel-ag", "spiel-ma", "lora", "full"])
    a("--targets", type=parse_targets, default="all", help="the projections that train (SpIEL, LoRA; full: the "
      "weights unfrozen besides): all, attention, mlp, or a list such as wq,wv or q_proj,v_proj")
    a("--density", type=FRACTION, help="SpIEL budget as a fraction of the targeted weights")
    a("--num-tunable", type=COUNT, help="SpIEL budget as a number of deltas")
    a("--match-lora-rank", type=COUNT, help="SpIEL budget: as many deltas as LoRA at this rank trains (default "
                                            "when no budget is given: 64, the paper's)")
    a("--lora-rank", type=COUNT, default=64, help="LoRA rank (--density/--num-tunable set one to match instead)")
    a("--lora-alpha", type=POSITIVE, default=16.0)
    a("--lora-dropout", type=BELOW_1, default=0.1)
    # reselection (SpIEL)
    a("--reselect-every", type=NONNEG_INT, default=20, help="steps between drop-and-regrow (0: only the first "
      "reselection, then the support stays fixed: an ablation)")
    a("--first-reselect", type=COUNT, default=5, help="step of the first reselection, where every delta is due (those "
      "the criterion chooses again stay where they are); also the AG accumulation window length")
    a("--reselect-rate", type=FRACTION, default=0.2, help="fraction replaced at a reselection, decaying to 0")
    a("--reselect-decay", default="linear", choices=["linear", "cosine"])
    a("--regrow", default="criterion", choices=["criterion", "random"], help="what grows at a reselection: the "
      "method's criterion (AG: accumulated gradients, MA: SM3's row x column), or random inactive positions "
      "(an ablation; no AG window is opened)")
    a("--grad-path", default="auto", choices=["auto", "dense", "sparse"],
      help="SpIEL value gradient: dense dW then gather, or only the needed entries (auto: the faster, measured)")
    a("--sm3-momentum", type=BELOW_1, default=0.0, help="SpIEL-MA: SM3 momentum (0 keeps SM3's memory small)")
    # optimization
    a("--lr", type=POSITIVE, help=f"peak learning rate (default by method: {DEFAULT_LR})")
    a("--weight-decay", type=NONNEG, help=f"decoupled weight decay (default: {AG_DECAY_PER_STEP:g} / lr for "
                                          "spiel-ag, the authors' 30 at lr 1e-5; 0 for the others)")
    a("--warmup", type=NONNEG, default=0.03, help="linear warmup: a fraction of the steps if < 1, else steps")
    a("--grad-clip", type=NONNEG, default=0.0, help="clip the gradient norm (0: off, as the authors)")
    a("--batch-size", type=COUNT, default=1, help="examples drawn per micro-batch (a step: batch-size x grad-accum "
      "per process); packed, a micro-batch holds up to this many rows of --seq-len tokens (its memory bound), "
      "without packing this many examples")
    a("--grad-accum", type=COUNT, default=128, help="micro-batches per step and process (paper: 128 sequences)")
    a("--epochs", type=POSITIVE, default=2.0)
    a("--max-steps", type=COUNT,
      help="optimizer steps (overrides --epochs; with --resume: extends or shortens the run)")
    a("--extend-lr", default="replan", choices=["replan", "continue"], help="with --resume --max-steps N: the "
      "learning rate from then on follows an N-step run's schedule (replan), or decays linearly from where it is "
      "over the remaining steps, as the schedule's own decay does (continue)")
    # system
    a("--quantize", default="none", choices=["none", "int8", "nf4"], help="store the frozen base quantized")
    a("--dtype", choices=["float32", "bfloat16"], help="base and compute dtype (default: bf16 on a GPU that has "
                                                      "it, else fp32); deltas and optimizer state stay fp32")
    a("--device", type=device, default=default_device(), help="cpu, cuda or cuda:N (default: cuda where torch "
                                                              "sees a GPU)")
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
# --targets: which projections train, in this repo's names or Hugging Face's, or a preset

TARGET_PRESETS = {"all": PROJECTIONS, "attention": ("wq", "wk", "wv", "wo"), "mlp": ("w1", "w2", "w3")}
HF_NAMES = {k.split(".")[-2]: v.split(".")[-2] for k, v in HF_TO_META.items() if v.split(".")[-2] in PROJECTIONS}


def parse_targets(text: str) -> str:
    """"all", "attention", "mlp", or a comma-separated list of projections (wq or q_proj, ...): -> the
    projections, comma-separated in model order (what args.json stores, so a resume compares like with like)."""
    names = set()
    for name in text.split(","):
        name = name.strip()
        ours = TARGET_PRESETS.get(name) or ([name] if name in PROJECTIONS else [HF_NAMES[name]] if name in HF_NAMES
                                            else None)
        if ours is None:
            raise argparse.ArgumentTypeError(
                f"{name!r} is not a projection: use {', '.join(TARGET_PRESETS)}, or names from "
                f"{', '.join(PROJECTIONS)} or {', '.join(HF_NAMES)}")
        names |= set(ours)
    return ",".join(p for p in PROJECTIONS if p in names)


# -----------------------------------------------------------------------------
# the demo (no arguments) and the default task (--ckpt without --data)

# `python train.py` with no arguments: the tiny base tools/build_demo.py made, fine-tuned on a new task (on a CPU)
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


BUDGET_FLAGS = ("density", "num_tunable", "match_lora_rank")  # SpIEL's budget: one of them, or the default


def budget(a) -> tuple:
    """(SpIEL's budget as spiel.add_sparse_deltas takes it, the flag that set it, as its errors name it)."""
    given = [(key, getattr(a, key)) for key in BUDGET_FLAGS if getattr(a, key) is not None]
    key, value = given[0] if given else ("match_lora_rank", 64)  # the paper's: as many deltas as LoRA rank 64 trains
    flag = f"--{key.replace('_', '-')} {value}" if given else "the default budget (--match-lora-rank 64, the paper's)"
    return {"lora_rank" if key == "match_lora_rank" else key: value}, flag


@contextlib.contextmanager
def naming(flag: str, hint: str = ""):
    """a ValueError inside names the flag it is about (the library's own words name its arguments)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{flag}: {e}{hint}") from None


def given_flags(parser: argparse.ArgumentParser, argv: list) -> set:
    """the arguments (dest names) that argv sets itself (--flag value, or --flag=value)."""
    options = {s: action.dest for action in parser._actions for s in action.option_strings}
    return {options[t.split("=")[0]] for t in argv if t.split("=")[0] in options}


def demo_args(argv: list) -> list:
    """DEMO_ARGS less the flags argv sets itself, so each flag is given once, with the user's value; a budget of
    the user's (or --lora-rank for LoRA) replaces the demo's --density."""
    parser = get_parser()
    given = given_flags(parser, argv)
    if given & set(BUDGET_FLAGS) or ("lora_rank" in given and parser.parse_args(argv).method == "lora"):
        given.add("density")
    pairs = zip(DEMO_ARGS[::2], DEMO_ARGS[1::2])
    return [x for flag, value in pairs if flag[2:].replace("-", "_") not in given for x in (flag, value)]


def resolve(argv: list, description: str = "") -> tuple:
    """the command line -> (the run's arguments, what it is: "demo" (no --ckpt, --data or --resume: the demo, with
    any other flags given, e.g. --out), "task" (--ckpt without --data: the demo's task on that model), "resume"
    or "run")."""
    parser = get_parser(description)
    a = parser.parse_args(argv)
    if not (a.ckpt or a.data or a.resume):
        return resolve_args(parser, demo_args(argv) + argv), "demo"
    if a.resume or a.data or not a.ckpt:
        return resolve_args(parser, argv), "resume" if a.resume else "run"
    lr = ["--lr", str(TASK_LR[a.method])] if a.method in TASK_LR else []
    return resolve_args(parser, TASK_ARGS + lr + argv), "task"


def describe(args, mode: str, argv: list) -> str:
    """the first line of the demo (its command), of the default task (what it does), or of a resume that cannot
    be bit-identical (the run's threads or device changed); "" for the others."""
    if mode == "demo":
        shown = [os.path.relpath(x, HERE) if x.startswith(HERE) else x for x in demo_args(argv)]
        return "demo: python train.py " + shlex.join(shown + argv)
    if mode == "resume":  # (args.json still holds the run's own values)
        stored = read_json(os.path.join(args.out, "args.json"))
        was = {key: stored.get(key) or "torch's default" for key in ("threads", "device")}
        changed = [f"--{key} {getattr(args, key)} (the run used {was[key]})" for key in was
                   if stored.get(key) != getattr(args, key)]
        return f"note: {', '.join(changed)}: the run continues correctly, but not bit for bit" if changed else ""
    if mode == "run":
        return ""
    return (f"no --data: fine-tuning {args.ckpt} on the demo's task (shift each letter by one, "
            f"{os.path.relpath(args.data)}), {args.max_steps} steps, held-out exact match before and after. "
            "Your own data: --data your.jsonl (README.md, Data)")


# -----------------------------------------------------------------------------
# --resume: the stored arguments, and the flags that may change

# flags --resume accepts: what extends the run, or does not change its math; the inputs may have moved
RESUME_FLAGS = {"max_steps", "extend_lr", "save_every", "eval_every", "exact_match", "stop_at_step", "log_every",
                "threads", "device", "ckpt", "data", "val_data"}
PATHS = ("ckpt", "data", "val_data")
# what a run records beside its flags (runs.prepare fills them; a resume reads them back): its id, the data's hash,
# its planned length, and where --extend-lr continue anchored its learning rate
RUN_FACTS = {"finetune_id": None, "data_sha256": None, "total_steps": None, "lr_anchor": None}


def resolve_args(parser: argparse.ArgumentParser, argv: list) -> argparse.Namespace:
    """a new run's arguments with absolute input paths, or (--resume) the stored arguments of the run in --out
    updated by the flags that may change; a flag that would change the math is refused, naming it."""
    args = parser.parse_args(argv)
    if args.fsdp and not under_torchrun():
        parser.error("--fsdp shards the base across torchrun's processes: launch it with torchrun --nproc_per_node "
                     "N train.py ...")
    if not args.resume:
        if args.ckpt is None or args.data is None:
            parser.error("--ckpt is required (no arguments at all: the demo; --ckpt alone: the demo's task on "
                         "that model)")
        args.ckpt = hub.resolve(args.ckpt)  # (a Hub id: its folder in the Hugging Face cache)
        budgets = [f"--{key.replace('_', '-')}" for key in BUDGET_FLAGS if getattr(args, key) is not None]
        if len(budgets) > 1:
            parser.error(f"{' and '.join(budgets)} are two budgets: give one")
        if args.reselect_every and args.reselect_every <= args.first_reselect:
            parser.error(f"--reselect-every {args.reselect_every} must be above --first-reselect "
                         f"{args.first_reselect} (or 0: reselect once)")
        for key in PATHS:
            setattr(args, key, getattr(args, key) and os.path.abspath(getattr(args, key)))
        return argparse.Namespace(**vars(args), **RUN_FACTS)
    if not args.out:
        parser.error("--resume needs --out, the folder of the run to continue")
    given = given_flags(parser, argv) - {"resume", "out"}
    stored = read_json(os.path.join(args.out, "args.json"), "not a run folder, or its args.json is damaged")
    for key in given:
        value = os.path.abspath(hub.resolve(getattr(args, key))) if key in PATHS else getattr(args, key)
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
    try:  # (another machine: the run's GPU may be missing)
        usable_device(stored.get("device") or "cpu")
    except ValueError as e:
        parser.error(f"argument --device (the run's, in {args.out}/args.json): {e}")
    return argparse.Namespace(**{**vars(parser.parse_args([])), **RUN_FACTS, **stored,
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
