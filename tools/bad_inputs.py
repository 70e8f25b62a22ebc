"""
Every bad input a new user may give the scripts, run as a shell runs them: each must end in one line on
stderr (no traceback), a non-zero exit code, and nothing left behind (its working folder and the inputs as
they were). Prints the markdown table of docs/runs.md (Bad inputs): the input, the command, the exit code
and the line, with the temporary folders cut from the paths.

    python tools/bad_inputs.py            # tiny checkpoints built in a temporary folder; every case (2 at a time)
    python tools/bad_inputs.py --jobs 4

Each case runs in a fresh working folder of its own (a relative --out lands there), holding only what its
`setup` puts there. tests/test_bad_inputs.py walks the same CASES against the test fixtures' checkpoints.
"""

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NO_CUDA = not torch.cuda.is_available()  # (where there is a GPU, --device cuda is no bad input)


@dataclass
class Case:
    input: str  # what is wrong, as the table says it
    argv: list  # the script and its arguments; "{key}" is an input's path (good_inputs, bad_inputs)
    says: str  # what its one line must say
    setup: dict = field(default_factory=dict)  # the working folder's files first: name -> text, or "copy:{key}"


def T(text, *extra, says, ckpt="{base}", data="{data}", out="o", setup=None):
    """a case of train.py: a 2-step run of --ckpt on --data into --out, with `extra` flags."""
    argv = ["--ckpt", ckpt, "--data", data, *(["--max-steps", "2"] if "--max-steps" not in extra else []),
            "--out", out, *extra]
    return Case(text, ["train.py", *argv], says, setup or {})


def R(text, *extra, says, setup=None):
    """a case of train.py --resume on r/, a copy of a finished 2-step run (or of `setup`'s)."""
    return Case(text, ["train.py", "--out", "r", "--resume", *extra], says, setup or {"r": "copy:{run}"})


GEN = ["generate.py", "--ckpt", "{base}", "--prompt", "x"]
DELTA, LORA = "{run}/delta.safetensors", "{lora_run}/lora.safetensors"
FILE, MINE = {"f": ""}, {"o/notes.txt": "mine"}  # a regular file where a folder is needed; a folder in use

CASES = [
    T("--ckpt: no such folder", ckpt="nowhere", says="checkpoint folder not found"),
    T("--ckpt: a fine-tune file, not the base's folder", ckpt=DELTA, says="a sparse delta file"),
    T("--ckpt: config.json but no weights", ckpt="{no_weights}", says="config.json found but no"),
    T("--ckpt: config.json not JSON", ckpt="{bad_config}", says="not valid JSON"),
    T("--ckpt: a truncated weight file", ckpt="{truncated}", says="cannot read"),
    T("--ckpt: weights of other shapes than its config.json", ckpt="{misshapen}", says="has shape"),
    T("--ckpt: no tokenizer.model", ckpt="{no_tokenizer}", says="no tokenizer.model"),
    T("--ckpt: a rope scaling the loader does not implement", ckpt="{dynamic_rope}",
      says='config.json: rope_scaling: rope_type "dynamic" is not implemented'),
    T("--ckpt: a model_type the loader does not implement", ckpt="{gemma}",
      says='model_type "gemma" is not implemented'),
    T("--ckpt: Meta's Llama 3.1 layout", ckpt="{meta_llama3}", says="use_scaled_rope true: Meta's Llama 3.1+ layout"),
    T("--ckpt: tokenizer.model not a sentencepiece model", ckpt="{bad_tokenizer}", says="not a sentencepiece model"),
    T("--data: no such file", data="nowhere.jsonl", says="data file not found"),
    T("--data: a line that is not JSON", data="{broken}", says=":2: invalid JSON"),
    T("--data: a record without its answer", data="{missing}", says=":1: Alpaca records need"),
    T("--data: a tool call", data="{tool}", says=":1: messages[1].tool_calls: tool calls are not supported"),
    T("--data: a turn weight other than 0 or 1", data="{weight}", says=":1: messages[1].weight: 0.5"),
    T("--data: an empty file", data="{empty_data}", says="no records"),
    T("--data: one JSON object over several lines", data="{object}", says="one JSON object, not a list"),
    T("--data: a bad record in a JSON array", data="{array}", says=":record 2: Alpaca records need"),
    T("--data: a binary file", data="{run}/state.pt", says="not UTF-8 text"),
    T("--lr -1", "--lr", "-1", says="argument --lr: -1 is not > 0"),
    T("--max-steps 0", "--max-steps", "0", says="argument --max-steps: 0 is not an integer >= 1"),
    T("--method: not a method", "--method", "spiel-xx", says="argument --method: invalid choice"),
    T("--targets: not a projection", "--targets", "q", says="argument --targets: 'q' is not a projection"),
    T("--density 2", "--density", "2", says="argument --density: 2 is not in (0, 1]"),
    T("two budgets", "--density", "0.1", "--match-lora-rank", "2", says="--density and --match-lora-rank are two"),
    T("--num-tunable: fewer deltas than matrices", "--num-tunable", "3", says="--num-tunable 3: a budget of 3"),
    T("--reselect-every not above --first-reselect", "--reselect-every", "3",
      says="--reselect-every 3 must be above --first-reselect 5"),
    *([T("--device cuda on a torch without CUDA", "--device", "cuda", says="argument --device: cuda: ")]
      if NO_CUDA else []),
    T("--device: not a device", "--device", "gpu0", says="argument --device: 'gpu0' is not a device"),
    T("--quantize with full fine-tuning", "--quantize", "int8", "--method", "full",
      says="full fine-tuning needs a full-precision base"),
    T("--fsdp without torchrun", "--fsdp", says="--fsdp shards the base across torchrun's processes"),
    Case("--out under a regular file (the demo)", ["train.py", "--max-steps", "2", "--out", "f/run"],
         "is a file, not a folder); choose another --out", FILE),
    T("--out in a read-only place", out="/sys/spiel-run", says="/sys/spiel-run: cannot be written"),
    T("--out: a folder that holds other files", setup=MINE, says="exists and is not empty"),
    Case("--resume without --out", ["train.py", "--resume"], "--resume needs --out"),
    R("--resume: not a run folder", setup={"r/notes.txt": "mine"}, says="args.json: not found"),
    R("--resume with a flag that changes the math", "--lr", "1", says="--lr cannot change when resuming"),
    R("--resume: state.pt damaged", "--max-steps", "9", setup={"r": "copy:{damaged_run}"}, says="state.pt: damaged"),
    R("--resume: a finished run whose state.pt was deleted", setup={"r": "copy:{no_state_run}"},
      says="state.pt: not found (deleted?), so this run cannot continue"),
    R("--resume with another base of the same shapes", "--max-steps", "9", "--ckpt", "{other}",
      says="not the base this run trained on"),
    R("--resume with other data", "--max-steps", "9", "--data", "{missing}", says="not the data this run trained on"),
    Case("--temperature -1", [*GEN, "--temperature", "-1"], "argument --temperature: -1 is not >= 0"),
    Case("--top-p 0", [*GEN, "--top-p", "0"], "argument --top-p: 0 is not in (0, 1]"),
    Case("--max-new-tokens 0", [*GEN, "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not an integer"),
    Case("--system without --chat", [*GEN, "--system", "be brief"], "--system and --template need --chat"),
    Case("--template model: the checkpoint has no chat template", [*GEN, "--chat", "--template", "model"],
         "comes with no chat template"),
    *([Case("--device cuda on a torch without CUDA", [*GEN, "--device", "cuda"], "argument --device: cuda: ")]
      if NO_CUDA else []),
    Case("--ckpt: no such folder", ["generate.py", "--ckpt", "nowhere", "--prompt", "x"],
         "checkpoint folder not found"),
    Case("--delta: no such file", [*GEN, "--delta", "nowhere.safetensors"], "fine-tune file not found"),
    Case("--delta: a safetensors file that is not a fine-tune", [*GEN, "--delta", "{weights}"],
         "neither a spiel delta nor a LoRA adapter"),
    Case("--delta: a fine-tune of another base (same shapes)", [*GEN[:2], "{other}", *GEN[3:], "--delta", DELTA],
         "trained on another base model"),
    Case("--delta: a fine-tune of a model of other shapes", [*GEN[:2], "{small}", *GEN[3:], "--delta", DELTA],
         "(another model"),
    Case("--delta: the same fine-tune twice", [*GEN, "--delta", DELTA, "--delta", DELTA], "given twice"),
    Case("--delta: already merged into --ckpt", [*GEN[:2], "{merged}", *GEN[3:], "--delta", DELTA],
         "already merged into this model"),
    Case("--out under a regular file", ["merge.py", "--ckpt", "{base}", "--delta", DELTA, "--out", "f/m"],
         "is a file, not a folder); choose another --out", FILE),
    Case("--out in a read-only place", ["merge.py", "--ckpt", "{base}", "--out", "/sys/spiel-m"],
         "/sys/spiel-m: cannot be written"),
    Case("--out: a folder that holds other files", ["merge.py", "--ckpt", "{base}", "--out", "o"],
         "exists and is not empty", MINE),
    Case("--delta: a fine-tune of another base", ["merge.py", "--ckpt", "{other}", "--delta", DELTA, "--out", "m"],
         "trained on another base model"),
    Case("--delta: no such file", ["merge.py", "--ckpt", "{base}", "--delta", "nowhere", "--out", "m"],
         "fine-tune file not found"),
    Case("--dtype: not a dtype", ["merge.py", "--ckpt", "{base}", "--out", "m", "--dtype", "float8"],
         "argument --dtype: invalid choice"),
    Case("--to sft with the --ckpt of another base (same shapes)",
         ["convert.py", DELTA, "--to", "sft", "--ckpt", "{other}", "s"], "trained on another base model"),
    Case("--to peft with the --ckpt of another base (same shapes)",
         ["convert.py", LORA, "--to", "peft", "--ckpt", "{other}", "p"], "trained on another base model"),
    Case("--to peft with a sparse delta", ["convert.py", DELTA, "--to", "peft", "--ckpt", "{base}", "p"],
         "a sparse delta has no PEFT LoRA form"),
    Case("--to sft with a LoRA adapter", ["convert.py", LORA, "--to", "sft", "--ckpt", "{base}", "s"],
         "a LoRA adapter has no SFT form"),
    Case("--to spiel with this repo's file", ["convert.py", DELTA, "--to", "spiel", "--ckpt", "{base}", "d"],
         "already this repo's format"),
    Case("--ckpt of other shapes", ["convert.py", DELTA, "--to", "sft", "--ckpt", "{small}", "s"],
         "in the file but absent in"),
    Case("the fine-tune: no such file", ["convert.py", "nowhere", "--to", "sft", "--ckpt", "{base}", "s"],
         "fine-tune file not found"),
    Case("the output folder under a regular file", ["convert.py", DELTA, "--to", "sft", "--ckpt", "{base}", "f/s"],
         "is a file, not a folder); choose another output folder", FILE),
    Case("the output folder holds other files", ["convert.py", DELTA, "--to", "sft", "--ckpt", "{base}", "o"],
         "exists and is not empty", MINE),
    Case("--to: not a format", ["convert.py", DELTA, "--to", "gguf", "--ckpt", "{base}", "s"],
         "argument --to: invalid choice"),
    Case("a run folder without log.jsonl", ["plot.py", "{empty}", "--out", "x.png"], "log.jsonl: not found"),
    Case("log.jsonl with a broken line", ["plot.py", "{broken_log_run}", "--out", "x.png"], ": not JSON (Expecting"),
    Case("--mask: not a delta file", ["plot.py", "--mask", "{weights}", "--out", "x.png"], "not a spiel delta file"),
    Case("--quality: no such file", ["plot.py", "--quality", "nowhere.json", "--out", "x.png"],
         "not a tools/quality.py result"),
    Case("--out under a regular file", ["plot.py", "{run}", "--out", "f/x.png"], "is a file, not a folder", FILE),
    Case("--out: a name matplotlib cannot write", ["plot.py", "{run}", "--out", "x.txt"],
         "names no format matplotlib writes"),
    Case("no run folder, --mask or --quality", ["plot.py", "--out", "x.png"], "give one of"),
    Case("--preset: not a model size", ["tools/memory.py", "--preset", "99B"], "argument --preset: invalid choice"),
    Case("--ckpt: no such folder", ["tools/memory.py", "--ckpt", "nowhere"], "checkpoint folder not found"),
    Case("--seq-len 0", ["tools/memory.py", "--seq-len", "0"], "argument --seq-len: 0 is not an integer >= 1"),
    Case("--density 2", ["tools/memory.py", "--density", "2"], "argument --density: 2 is not in (0, 1]"),
    *([Case("--measure without a GPU", ["tools/memory.py", "--measure"], "--measure needs a CUDA GPU")]
      if NO_CUDA else []),
    Case("--json under a regular file", ["tools/memory.py", "--measure", "--device", "cpu", "--json", "f/m.json"],
         "is a file, not a folder); choose another --json", FILE),
]

# -----------------------------------------------------------------------------
# the inputs: good ones (built here, or the tests' fixtures) and the bad ones made from them


def good_inputs(folder: str) -> dict:
    """tiny checkpoints of their own (random weights, the demo's tokenizer; two of one shape, one of another),
    a little of the demo's data, and a finished SpIEL-AG and LoRA run on the first: name -> path."""
    import merge
    import train
    from llama import ModelArgs, Transformer
    from tokenizer import SentencePiece

    demo = os.path.join(ROOT, "demo", "base")
    vocab = SentencePiece(os.path.join(demo, "tokenizer.model")).n_words
    shape = dict(dim=64, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32, max_seq_len=128)
    good = {name: os.path.join(folder, name) for name in ("base", "other", "small", "run", "lora_run")}
    for name, seed, layers in (("base", 0, 2), ("other", 1, 2), ("small", 0, 1)):
        torch.manual_seed(seed)
        merge.save_hf(Transformer(ModelArgs(**shape, n_layers=layers)), None, good[name], verbose=False)
        shutil.copyfile(os.path.join(demo, "tokenizer.model"), os.path.join(good[name], "tokenizer.model"))
    with open(os.path.join(ROOT, "demo", "train.jsonl")) as src, open(os.path.join(folder, "data.jsonl"), "w") as f:
        f.writelines(src.readlines()[:64])
    good["data"] = os.path.join(folder, "data.jsonl")
    for name, method in (("run", "spiel-ag"), ("lora_run", "lora")):
        assert train.main(["--ckpt", good["base"], "--data", good["data"], "--method", method, "--max-steps", "2",
                           "--batch-size", "4", "--grad-accum", "1", "--seq-len", "64", "--density", "0.05",
                           "--eval-every", "0", "--device", "cpu", "--out", good[name]]) == 0
    return good


def bad_inputs(good: dict, folder: str) -> dict:
    """the good inputs and, made from them in `folder`, the bad ones the cases name: name -> path."""
    import merge

    paths = dict(good, empty=os.path.join(folder, "empty"))
    os.makedirs(paths["empty"])
    paths["weights"] = next(os.path.join(good["base"], n) for n in sorted(os.listdir(good["base"]))
                            if n.endswith(".safetensors"))

    def copy(name, of):
        paths[name] = shutil.copytree(good[of], os.path.join(folder, name))
        return paths[name]

    def write(path, text):
        with open(path, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)

    os.makedirs(paths.setdefault("no_weights", os.path.join(folder, "no_weights")))
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(good["base"], name), paths["no_weights"])
    write(os.path.join(copy("bad_config", "base"), "config.json"), '{"hidden_size": 64,')
    weights = os.path.join(copy("truncated", "base"), os.path.basename(paths["weights"]))
    os.truncate(weights, os.path.getsize(weights) // 2)
    config = json.load(open(os.path.join(good["base"], "config.json")))
    write(os.path.join(copy("misshapen", "base"), "config.json"),
          json.dumps(config | {"intermediate_size": config["intermediate_size"] + 32}))
    os.remove(os.path.join(copy("no_tokenizer", "base"), "tokenizer.model"))
    write(os.path.join(copy("dynamic_rope", "base"), "config.json"),
          json.dumps(config | {"rope_scaling": {"type": "dynamic", "factor": 2.0}}))
    write(os.path.join(copy("gemma", "base"), "config.json"), json.dumps(config | {"model_type": "gemma"}))
    os.makedirs(paths.setdefault("meta_llama3", os.path.join(folder, "meta_llama3")))
    write(os.path.join(paths["meta_llama3"], "params.json"), json.dumps(
        {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 128256, "rope_theta": 500000.0,
         "use_scaled_rope": True}))
    write(os.path.join(paths["meta_llama3"], "consolidated.00.pth"), "")
    write(os.path.join(copy("bad_tokenizer", "base"), "tokenizer.model"), "not a sentencepiece model\n")
    for name, text in (("broken.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n'),
                       ("missing.jsonl", '{"instruction": "a"}\n'), ("empty_data.jsonl", "\n"),
                       ("tool.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                                      '"content": "", "tool_calls": [{"id": "1"}]}]}\n'),
                       ("weight.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                                        '"content": "b", "weight": 0.5}]}\n'),
                       ("object.json", '{\n  "instruction": "a",\n  "output": "b"\n}\n'),
                       ("array.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a"}]\n')):
        write(paths.setdefault(name.partition(".")[0], os.path.join(folder, name)), text)
    state = os.path.join(copy("damaged_run", "run"), "state.pt")
    os.truncate(state, os.path.getsize(state) // 2)
    os.remove(os.path.join(copy("no_state_run", "run"), "state.pt"))
    with open(os.path.join(copy("broken_log_run", "run"), "log.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": \n')
    paths["merged"] = os.path.join(folder, "merged")
    merge.main(["--ckpt", good["base"], "--delta", os.path.join(good["run"], "delta.safetensors"), "--out",
                paths["merged"]])
    return paths


# -----------------------------------------------------------------------------
# running a case, and what it must do


def command(case: Case, paths: dict) -> list:
    script = os.path.join(ROOT, case.argv[0])
    return [sys.executable, script, *(arg.format(**paths) for arg in case.argv[1:])]


def prepare(case: Case, paths: dict, cwd: str):
    """the case's working folder, holding what its setup says."""
    os.makedirs(cwd)
    for name, what in case.setup.items():
        path = os.path.join(cwd, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if what.startswith("copy:"):
            shutil.copytree(what[len("copy:"):].format(**paths), path)
        else:
            with open(path, "w") as f:
                f.write(what)


def snapshot(folder: str) -> dict:
    """relative path -> (size, modification time) of everything under `folder` (folders: None)."""
    seen = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(top, name)
            seen[os.path.relpath(path, folder)] = None if name in dirs else \
                (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return seen


def problems(case: Case, p: subprocess.CompletedProcess, before: dict, after: dict) -> list:
    """what the case's process did wrong: [] if it ended in one line saying `case.says`, non-zero, and left its
    working folder as it found it."""
    lines, wrong = p.stderr.strip().splitlines(), []
    if p.returncode in (0, None):
        wrong.append(f"exit code {p.returncode}")
    if "Traceback" in p.stderr or len(lines) != 1:
        wrong.append(f"{len(lines)} lines on stderr")
    elif case.says not in lines[0] and "plot.py needs matplotlib" not in lines[0]:
        wrong.append(f"does not say {case.says!r}")
    if after != before:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        wrong.append(f"left or changed {', '.join(changed)}")
    return wrong


def run_case(case: Case, paths: dict, cwd: str, run=None) -> tuple:
    """-> (the finished process, what it did wrong). run: how to run it (default: subprocess.run with pipes)."""
    prepare(case, paths, cwd)
    before = snapshot(cwd)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = run or (lambda argv, **kw: subprocess.run(argv, capture_output=True, text=True, **kw))
    p = run(command(case, paths), cwd=cwd, env=env)
    return p, problems(case, p, before, snapshot(cwd))


def walk(paths: dict, folder: str, jobs: int = 2, run=None) -> list:
    """every case, `jobs` at a time, each in folder/<number>: [(case, process, what it did wrong)]; the inputs
    must be as they were afterwards (a case that changed one is reported)."""
    before = {path: snapshot(path) if os.path.isdir(path) else os.path.getsize(path) for path in paths.values()}
    with ThreadPoolExecutor(jobs) as pool:
        done = list(pool.map(lambda ic: run_case(ic[1], paths, os.path.join(folder, f"{ic[0]:02d}"), run),
                             enumerate(CASES)))
    results = [(case, p, wrong) for case, (p, wrong) in zip(CASES, done)]
    for name, path in paths.items():
        if (snapshot(path) if os.path.isdir(path) else os.path.getsize(path)) != before[path]:
            results.append((Case(f"the input {name}", [], ""), None, ["changed by a case"]))
    return results


def table(results: list, paths: dict, inputs: str, folder: str) -> str:
    """the markdown table: input, command, exit code, stderr's line; paths shown relative to the inputs' folder,
    the case's working folder and the repository."""
    def plain(text):
        for i in range(len(CASES)):
            text = text.replace(os.path.join(folder, f"{i:02d}") + os.sep, "")
        return text.replace(inputs + os.sep, "").replace(ROOT + os.sep, "").replace("|", "\\|")

    rows = ["| input | command | exit | message (stderr) |", "|---|---|---:|---|"]
    for case, p, wrong in results:
        if p is None:
            rows.append(f"| {case.input} | | | {'; '.join(wrong)} |")
            continue
        line = (p.stderr.strip().splitlines() or [""])[0]
        cmd = shlex.join(["python", case.argv[0], *(plain(a.format(**paths)) for a in case.argv[1:])])
        rows.append(f"| {case.input} | `{cmd}` | {p.returncode} | {plain(line)}"
                    + (f" **({'; '.join(wrong)})**" if wrong else "") + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="cases run at a time")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        inputs, cases = os.path.join(tmp, "in"), os.path.join(tmp, "cases")
        os.makedirs(inputs)
        with contextlib.redirect_stdout(io.StringIO()):  # (what the runs and the merge building them say)
            paths = bad_inputs(good_inputs(inputs), inputs)
        results = walk(paths, cases, args.jobs)
        print(table(results, paths, inputs, cases))
    bad = [case.input for case, _, wrong in results if wrong]
    print(f"\n{len(results)} bad inputs; " + (f"{len(bad)} broke the promise: {', '.join(bad)}" if bad else
                                                 "each ended in one line, a non-zero exit, nothing left behind"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
