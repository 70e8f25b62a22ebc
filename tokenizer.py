"""
The tokenizers of the LLaMA family, and which special tokens a model trains and stops with.

- sentencepiece `tokenizer.model` (LLaMA 2, CodeLlama, Mistral): BOS (id 1) before each example and EOS (id 2)
  after each answer, as Meta's reference does.
- Hugging Face `tokenizer.json` (Llama 3.x, Qwen2 / Qwen2.5: byte-level BPE), read with the `tokenizers` library.
  The checkpoint says which special tokens go where: the BOS is what the tokenizer's own post-processor puts
  before a text (Llama 3: <|begin_of_text|>; Qwen: none), the EOS is tokenizer_config.json's eos_token
  (Llama 3.1 Instruct: <|eot_id|>; Qwen2.5 Instruct: <|im_end|>). A special token's text inside a text ("<|eot_id|>")
  is that token, as transformers' tokenizers give it.
Generation stops at the EOS, or at any id that generation_config.json or config.json lists as eos_token_id (Llama
3.1 Instruct lists <|end_of_text|>, <|eom_id|> and <|eot_id|>). The chat template, when the checkpoint has one, is
tokenizer_config.json's chat_template (or chat_template.jinja): data.py renders it.

A checkpoint folder in the Hugging Face layout holds its tokenizer; Meta's layout keeps tokenizer.model one level
up. Meta's own Llama 3 layout ships a tiktoken tokenizer.model, refused by name: use the model's HF layout.
"""

import json
import os
import re

from files import CheckpointError, read_json

# the files a checkpoint's tokenizer and its settings may take: an export (merge.py, a full fine-tune) copies them
FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")


class SentencePiece:
    """sentencepiece with LLaMA's conventions: BOS (id 1) prepended by default, EOS (id 2) on request."""

    def __init__(self, path: str, folder=None):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: tokenizer file not found")
        with open(path, "rb") as f:
            head = f.read(64).split(b"\n")[0]
        if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", head):
            raise CheckpointError(f"{path}: a tiktoken file (Meta's Llama 3 layout), which this repo does not read; "
                                  f"use the model's Hugging Face layout (config.json, tokenizer.json)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from None
        self.path, self.n_words = path, self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.bos_token, self.eos_token = self.sp.IdToPiece(self.bos_id), self.sp.IdToPiece(self.eos_id)
        self.stop_ids, self.chat_template = stops(folder, self.eos_id), chat_template(folder)
        # control pieces in a text (a chat template's "<s>", "</s>") are those tokens, as transformers reads them
        specials = [self.sp.IdToPiece(i) for i in range(self.n_words) if self.sp.IsControl(i)]
        self.split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        parts = self.split.split(text) if self.split else [text]  # (odd parts: the control pieces)
        ids = [i for k, p in enumerate(parts) if p
               for i in ([self.sp.PieceToId(p)] if k % 2 else self.sp.EncodeAsIds(p))]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


class TokenizerJSON:
    """a Hugging Face tokenizer.json with its tokenizer_config.json: the same interface as SentencePiece
    (bos_id None when the model has no BOS, as Qwen)."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        self.path = os.path.join(folder, "tokenizer.json")
        try:
            self.tk = Tokenizer.from_file(self.path)
        except Exception as e:
            raise CheckpointError(f"{self.path}: not a tokenizers file ({e})") from None
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
        self.n_words = self.tk.get_vocab_size(with_added_tokens=True)
        # the BOS: what the post-processor puts before a text (and nothing after it)
        bare, full = self.tk.encode("a", add_special_tokens=False).ids, self.tk.encode("a").ids
        head = full[:len(full) - len(bare)]
        if full[len(head):] != bare or len(head) > 1:
            raise CheckpointError(f"{self.path}: its post-processor adds {full} around {bare}; only a single BOS "
                                  f"before a text is implemented")
        self.bos_id = head[0] if head else None
        if "add_bos_token" in cfg and bool(cfg["add_bos_token"]) != bool(head):
            raise CheckpointError(f"{cfg_path}: add_bos_token {json.dumps(cfg['add_bos_token'])} disagrees with "
                                  f"{self.path}'s post-processor, which {'adds' if head else 'adds no'} BOS")
        if cfg.get("add_eos_token"):
            raise CheckpointError(f"{cfg_path}: add_eos_token true is not implemented (an EOS after every text)")
        eos = cfg.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_id = self.tk.token_to_id(eos) if isinstance(eos, str) else None
        if self.eos_id is None:
            raise CheckpointError(f"{cfg_path}: no eos_token that {self.path} knows ({eos!r})")
        unk = json.loads(self.tk.to_str()).get("model", {}).get("unk_token")
        self.unk_id = self.tk.token_to_id(unk) if unk else None
        self.bos_token = None if self.bos_id is None else self.tk.id_to_token(self.bos_id)
        self.eos_token = eos
        self.stop_ids, self.chat_template = stops(folder, self.eos_id), chat_template(folder)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)


def stops(folder, eos_id: int) -> set:
    """the ids generation stops at: the EOS, and every eos_token_id of generation_config.json and config.json."""
    ids = {eos_id}
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(folder or "", name)
        if folder and os.path.isfile(path):
            given = read_json(path).get("eos_token_id")
            ids |= set(given if isinstance(given, list) else [] if given is None else [given])
    return ids


def chat_template(folder):
    """the checkpoint's chat template (a Jinja2 string), or None: chat_template.jinja, else tokenizer_config.json's
    chat_template (a string, or a list of named templates: the "default" one)."""
    if not folder:
        return None
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    t = read_json(cfg_path).get("chat_template") if os.path.isfile(cfg_path) else None
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if t is not None and not isinstance(t, str):
        raise CheckpointError(f"{cfg_path}: chat_template is neither a string nor a list with a 'default' one")
    return t


def find(ckpt: str) -> str:
    """the tokenizer file of a checkpoint folder: its tokenizer.model (Meta's layout: here or one level up, where
    Meta's download keeps it), else its tokenizer.json."""
    meta = os.path.isfile(os.path.join(ckpt, "params.json"))
    for cand in [os.path.join(ckpt, "tokenizer.model")] + [os.path.join(ckpt, "..", "tokenizer.model")] * meta + \
            [os.path.join(ckpt, "tokenizer.json")] * (not meta):
        if os.path.isfile(cand):
            return os.path.normpath(cand)
    raise CheckpointError(f"{ckpt}: no tokenizer.model " + ("in this folder or its parent" if meta else
                                                             "or tokenizer.json in this folder"))


def files(ckpt: str) -> dict:
    """name -> path of the tokenizer files of a checkpoint folder (FILES, and Meta's tokenizer.model one level up)."""
    found = {n: os.path.join(ckpt, n) for n in FILES if os.path.isfile(os.path.join(ckpt, n))}
    path = find(ckpt)
    return {os.path.basename(path): path} | found


def load(ckpt: str):
    """the tokenizer of a checkpoint folder (SentencePiece or TokenizerJSON), with its special tokens."""
    path = find(ckpt)
    return TokenizerJSON(ckpt) if path.endswith(".json") else SentencePiece(path, ckpt)
