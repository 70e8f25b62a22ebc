"""Shared fixtures: a tiny sentencepiece tokenizer trained here, tiny random LLaMA checkpoints written in both
layouts by code independent of llama.py (Meta: params.json + tensor-parallel consolidated.NN.pth shards; Hugging
Face: config.json + safetensors shards + index, q/k rows in "rotate_half" order), a copy task in both data
formats, and one short finished train.py run per method that many tests share. Nothing is downloaded.

Two tiers: `python -m pytest -q -rf tests -m "not slow"` (the fast one, minutes), and the slow one
(`-m slow`: torchrun launches, the tools' own runs and the walk through every bad input, multi-process or
long by construction)."""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # tools/bench.py, tools/memory.py, ... import as bench, memory

from llama import ModelArgs  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long by construction (torchrun, the tools' runs)")

torch.set_num_threads(1)  # tiny models gain nothing from a second thread; CI's 2 cores run one test at a time


# -----------------------------------------------------------------------------
# subprocesses without wall-clock limits: a test fails when its processes hang, never because the machine is slow
# (a fixed timeout made the suite fail at random on a loaded machine: bench.py's speed test, 23 s alone, passed
# its 120 s limit with four other processes on the two cores)

IDLE_SECONDS = 60  # a process tree that uses no CPU for this long is hung (e.g. processes waiting on each other)


def cpu_seconds(root: int) -> float:
    """user + system CPU seconds of process `root` and its live descendants (Linux /proc)."""
    stats = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # (after the command name, which may hold spaces)
            stats[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
        except (OSError, ValueError, IndexError):
            continue
    tree, new = {root}, {root}
    while new:
        new = {pid for pid, (ppid, _) in stats.items() if ppid in new} - tree
        tree |= new
    return sum(stats[pid][1] for pid in tree if pid in stats) / os.sysconf("SC_CLK_TCK")


class Watchdog:
    """check() fails (and kills the process group) once `p` and its children have used less than 0.2 s of CPU in
    IDLE_SECONDS: a hang. Any amount of progress, however slow, resets it."""

    def __init__(self, p: subprocess.Popen):
        self.p, self.used, self.since, self.last = p, 0.0, time.time(), 0.0

    def check(self):
        if time.time() - self.last < 1:  # (a scan of /proc a second is enough)
            return
        self.last, used = time.time(), cpu_seconds(self.p.pid)
        if used > self.used + 0.2:
            self.used, self.since = used, time.time()
        elif time.time() - self.since > IDLE_SECONDS and self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            raise AssertionError(f"hung: no CPU used for {IDLE_SECONDS} s by {self.p.args}")


def popen(args, **kw) -> subprocess.Popen:
    """subprocess.Popen in a new process group (a hung tree can be killed whole), text pipes."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kw)


def communicate(p: subprocess.Popen) -> tuple:
    """(stdout, stderr) of p once it ends, watched for hangs instead of timed."""
    out, dog = {}, Watchdog(p)
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), p.communicate())))
    reader.start()
    while reader.is_alive():
        reader.join(2)
        dog.check()
    return out["stdout"], out["stderr"]


def wait_until(p: subprocess.Popen, ready, what: str):
    """poll ready() while p runs, watched for hangs instead of timed; an error if p ends first."""
    dog = Watchdog(p)
    while not ready():
        if p.poll() is not None:
            raise AssertionError(f"{p.args} ended before {what}: {p.communicate()}")
        dog.check()
        time.sleep(0.05)


def run_watched(args, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(args, capture_output=True, text=True, **kw), watched for hangs instead of timed."""
    p = popen(args, **kw)
    stdout, stderr = communicate(p)
    return subprocess.CompletedProcess(args, p.returncode, stdout, stderr)


def ranks_said(p, n=3000) -> str:
    """a torchrun's stderr up to its own failure report (which hides what the processes said): the last n chars."""
    text = p.stderr
    if (cut := text.find("] failed (exitcode")) >= 0:
        text = text[:text.rfind("\n", 0, cut) + 1]
    return text[-n:]


WORDS = ("the a cat dog sat on mat one two three four five six seven eight nine ten plus minus is what "
         "user assistant answer question reverse copy sort list add number red green blue hello world").split()


def train_tokenizer(path, vocab_size=256, seed=0):
    """train a small sentencepiece BPE model with LLaMA's special ids (unk 0, bos 1, eos 2, no pad)."""
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    lines += ["".join(rng.choice("0123456789+-=<>|:,.?! ") for _ in range(20)) for _ in range(500)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, num_threads=1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=128)


def random_state_dict(args: ModelArgs, seed=0, dtype=torch.float32):
    """random weights with Meta key names (norm weights near 1 so they matter but stay sane)."""
    g = torch.Generator().manual_seed(seed)
    hd, f = args.dim // args.n_heads, args.ffn_dim

    def w(*shape, scale=0.08):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd = {"tok_embeddings.weight": w(args.vocab_size, args.dim, scale=1.0),
          "norm.weight": 1 + w(args.dim, scale=0.1), "output.weight": w(args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd |= {p + "attention.wq.weight": w(args.n_heads * hd, args.dim),
               p + "attention.wk.weight": w(args.n_kv_heads * hd, args.dim),
               p + "attention.wv.weight": w(args.n_kv_heads * hd, args.dim),
               p + "attention.wo.weight": w(args.dim, args.n_heads * hd),
               p + "feed_forward.w1.weight": w(f, args.dim), p + "feed_forward.w2.weight": w(args.dim, f),
               p + "feed_forward.w3.weight": w(f, args.dim),
               p + "attention_norm.weight": 1 + w(args.dim, scale=0.1),
               p + "ffn_norm.weight": 1 + w(args.dim, scale=0.1)}
    return sd


def tokens(seed=0, B=2, T=12):
    return torch.randint(TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def set_random_values(model, seed=0, scale=0.05):
    """random values for every sparse delta of the model (seeded), so that a fine-tune changes the logits."""
    from spiel import delta_layers
    g = torch.Generator().manual_seed(seed)
    for layer in delta_layers(model).values():
        layer.values.copy_(torch.randn(layer.values.shape, generator=g) * scale)


def train_peft_adapter(tiny, folder, peft, transformers, **lora_config):
    """a LoRA adapter PEFT trains for 3 steps on the tiny HF model (so B is not 0), saved in `folder`:
    -> (the PEFT model in eval mode, the input ids it trained on)."""
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny.hf, dtype=torch.float32)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                   **lora_config))
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, tiny.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        ref(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    ref.save_pretrained(str(folder))
    return ref.eval(), x


def write_meta(sd, args: ModelArgs, folder, n_shards=1):
    """Meta layout: params.json + consolidated.NN.pth, tensor-parallel shards (see llama-formats.md)."""
    os.makedirs(folder, exist_ok=True)
    split_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    shards = [{} for _ in range(n_shards)]
    for k, t in sd.items():
        d = split_dim.get(k.split(".")[-2]) if t.dim() == 2 else None
        for i in range(n_shards):
            shards[i][k] = t.chunk(n_shards, dim=d)[i].clone() if d is not None else t.clone()
    for i in range(n_shards):
        shards[i]["rope.freqs"] = torch.zeros(args.dim // args.n_heads // 2)  # present in real files, ignored
        torch.save(shards[i], os.path.join(folder, f"consolidated.{i:02d}.pth"))
    params = {"dim": args.dim, "multiple_of": args.multiple_of, "n_heads": args.n_heads, "n_layers": args.n_layers,
              "norm_eps": args.norm_eps, "vocab_size": -1, "n_kv_heads": args.n_kv_heads}
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    return folder


def to_hf(sd, args: ModelArgs):
    """Meta names and RoPE row order -> Hugging Face names and "rotate_half" row order."""
    hd = args.dim // args.n_heads

    def perm(w, heads):  # (a weight (out, in) or a bias (out,))
        return w.reshape(heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)

    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {}
    for k, t in sd.items():
        if k == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif k == "norm.weight":
            out["model.norm.weight"] = t
        elif k == "output.weight":
            out["lm_head.weight"] = t
        else:
            _, i, mod, *rest = k.split(".")
            sub = mod + "." + rest[0] if mod in ("attention", "feed_forward") else mod
            if sub == "attention.wq":
                t = perm(t, args.n_heads)
            elif sub == "attention.wk":
                t = perm(t, args.n_kv_heads)
            out[f"model.layers.{i}.{names[sub]}.{rest[-1]}"] = t
    return out


def write_hf(sd, args: ModelArgs, folder, n_shards=2, tokenizer=None, config=None):
    """Hugging Face layout: config.json + sharded safetensors + index (+ tokenizer.model); config: fields that
    replace or add to the LLaMA 2 ones (a tied embedding: no lm_head.weight)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    hf = to_hf(sd, args)
    if (config or {}).get("tie_word_embeddings"):
        del hf["lm_head.weight"]
    keys = list(hf)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: hf[k].contiguous() for k in keys[i::n_shards]}
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg = {"hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_attention_heads": args.n_heads,
           "num_key_value_heads": args.n_kv_heads, "num_hidden_layers": args.n_layers, "vocab_size": args.vocab_size,
           "rms_norm_eps": args.norm_eps, "rope_theta": 10000.0, "max_position_embeddings": args.max_seq_len,
           "tie_word_embeddings": False, "model_type": "llama"} | (config or {})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    if tokenizer:
        with open(tokenizer, "rb") as src, open(os.path.join(folder, "tokenizer.model"), "wb") as dst:
            dst.write(src.read())
    return folder


# -----------------------------------------------------------------------------
# the family: tiny checkpoints of each LLaMA-architecture model, as their Hub repos ship them (config fields,
# tokenizer files), with weights written by the code above (transformers reads them in tests/test_families.py)

LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                  "<|eot_id|>"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# the chat templates of Llama 3 (8B Instruct's) and Qwen2 (without its tool calls)
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN_TEMPLATE = ("{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
                 "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
                 "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                 "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


def train_bpe(folder, style: str, vocab_size=300):
    """a byte-level BPE tokenizer.json as Llama 3 ("llama3": <|begin_of_text|> before each text by its
    post-processor) or Qwen2 ("qwen": NFC, no BOS) ship theirs, with tokenizer_config.json (eos, chat template)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    special = LLAMA3_SPECIAL if style == "llama3" else QWEN_SPECIAL
    tk = Tokenizer(models.BPE())
    if style == "qwen":
        tk.normalizer = normalizers.NFC()
    split = Regex(LLAMA3_SPLIT if style == "llama3" else QWEN_SPLIT)
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    tk.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size - len(special), show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens(special)  # (ids after the BPE's, as in the real files)
    if style == "llama3":
        bos = "<|begin_of_text|>"
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tk.token_to_id(bos))])])
        cfg = {"bos_token": bos, "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast",
               "chat_template": LLAMA3_TEMPLATE}
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "tokenizer_class": "Qwen2Tokenizer", "chat_template": QWEN_TEMPLATE}
    cfg["added_tokens_decoder"] = {str(tk.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                                             "rstrip": False, "normalized": False, "single_word": False}
                                   for t in special}
    os.makedirs(folder, exist_ok=True)
    tk.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return tk


# name -> (model_type and the config fields that differ from LLaMA 2, tokenizer: "sp" (the tiny sentencepiece),
# "llama3" or "qwen"); the real values where a tiny model allows (Mistral's window: 16 of 48 tokens, not 4,096)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
FAMILIES = {
    "codellama": ({"rope_theta": 1e6}, "sp"),
    "llama3.1": ({"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 131072,
                  "bos_token_id": 294, "eos_token_id": [295, 298, 299]}, "llama3"),
    "llama3.2": ({"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE | {"factor": 32.0},
                  "max_position_embeddings": 131072, "tie_word_embeddings": True}, "llama3"),
    "mistral": ({"model_type": "mistral", "sliding_window": 16, "max_position_embeddings": 32768}, "sp"),
    "qwen2.5": ({"model_type": "qwen2", "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                 "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
                 "max_position_embeddings": 32768, "vocab_size": 320}, "qwen"),
    "qwen2.5-7b": ({"model_type": "qwen2", "rope_theta": 1e6, "rms_norm_eps": 1e-6, "vocab_size": 320}, "qwen"),
    "yarn": ({"model_type": "qwen2", "rope_theta": 1e6, "vocab_size": 320,
              "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}, "qwen"),
}


def write_family(folder, name: str, sp_tokenizer: str, seed=0):
    """a tiny random checkpoint of family `name` (FAMILIES) in the HF layout, with its tokenizer files."""
    fields, tok_style = FAMILIES[name]
    if tok_style == "sp":
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(sp_tokenizer, os.path.join(folder, "tokenizer.model"))
        vocab = 256
    else:
        vocab = fields.get("vocab_size", train_bpe(folder, tok_style).get_vocab_size())
    args = ModelArgs(**(TINY | {"vocab_size": vocab}))
    sd = random_state_dict(args, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if fields.get("model_type") == "qwen2":  # biases on q, k, v
        for i in range(args.n_layers):
            for n, rows in (("wq", args.dim), ("wk", args.n_kv_heads * args.dim // args.n_heads),
                            ("wv", args.n_kv_heads * args.dim // args.n_heads)):
                sd[f"layers.{i}.attention.{n}.bias"] = torch.randn(rows, generator=g) * 0.5
    if fields.get("tie_word_embeddings"):
        sd["output.weight"] = sd["tok_embeddings.weight"]
    write_hf(sd, args, folder, config={"vocab_size": vocab, **fields})
    if tok_style == "llama3":
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 294, "eos_token_id": [295, 298, 299]}, f)
    return folder


@pytest.fixture(scope="session")
def family(tiny, tmp_path_factory):
    """name -> the folder of that family's tiny checkpoint (FAMILIES), written on first use."""
    root, made = tmp_path_factory.mktemp("family"), {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = write_family(str(root / name), name, tiny.tokenizer)
        return made[name]
    return get


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """one set of tiny random weights saved as Meta (1 and 2 shards) and as Hugging Face (2 shards + index)."""
    root = tmp_path_factory.mktemp("ckpt")
    args = ModelArgs(**TINY)
    sd = random_state_dict(args)
    tok = train_tokenizer(str(root / "tokenizer.model"))  # one level above the Meta folders, as Meta ships it
    return types.SimpleNamespace(
        args=args, sd=sd, tokenizer=tok,
        meta1=write_meta(sd, args, str(root / "meta1")), meta2=write_meta(sd, args, str(root / "meta2"), n_shards=2),
        hf=write_hf(sd, args, str(root / "hf"), tokenizer=tok), root=root)


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="session")
def task(tiny, tmp_path_factory):
    """a copy task in both formats over the tiny tokenizer's words: (train.jsonl, val.jsonl)."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)

    def rec(i):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        if i % 2:
            return {"instruction": "copy", "input": words, "output": words}
        return {"messages": [{"role": "user", "content": "copy " + words}, {"role": "assistant", "content": words}]}

    return write_jsonl(d / "train.jsonl", [rec(i) for i in range(160)]), write_jsonl(d / "val.jsonl", [rec(i) for i in range(16)])


TRAIN_ARGS = ["--seq-len", "48", "--batch-size", "4", "--grad-accum", "2", "--device", "cpu", "--dtype", "float32",
              "--weight-decay", "0", "--warmup", "2", "--density", "0.1", "--first-reselect", "2", "--reselect-every",
              "5", "--eval-every", "0", "--save-every", "1000", "--lora-rank", "4"]
TRAIN_LR = {"spiel-ag": "3e-2", "spiel-ma": "1e-1", "lora": "3e-2", "full": "3e-3"}


def train_run(tiny, task, out, *extra, method="spiel-ag") -> int:
    """train.main in this process on the tiny HF base and the copy task (every flag after `extra` wins)."""
    import train
    return train.main(["--ckpt", tiny.hf, "--data", task[0], "--val-data", task[1], "--out", str(out),
                       "--method", method, "--lr", TRAIN_LR[method], *TRAIN_ARGS, *extra])


@pytest.fixture(scope="session")
def trained(tiny, task, tmp_path_factory):
    """method -> the folder of one finished 8-step run of that method (a SpIEL run passes reselections at steps 2
    and 7), made once per session. Read it; copy it (shutil.copytree) before changing or resuming it."""
    root, done = tmp_path_factory.mktemp("trained"), {}

    def get(method: str) -> str:
        if method not in done:
            out = root / method
            assert train_run(tiny, task, out, "--max-steps", "8", method=method) == 0
            done[method] = str(out)
        return done[method]
    return get
