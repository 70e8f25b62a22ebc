"""
`--ckpt ORG/NAME`: a Hugging Face Hub id, resolved to the model's folder in the local Hugging Face cache, offline.
The cache is the Hub's own layout: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub, with
models--ORG--NAME/refs/main naming the snapshot folder under snapshots/ (its files link into blobs/). A model that
is not there is downloaded where huggingface_hub is installed (a gated one with the token `hf auth login` saved;
only what a checkpoint folder needs: configs, safetensors, tokenizer files); without huggingface_hub, one line says
how to get it. Every script that takes --ckpt resolves it here; a folder that exists is always taken as it is.
"""

import os
import re

from files import CheckpointError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# what a download fetches: the config, the weights (safetensors) and the tokenizer's files
PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "merges.txt"]


def cache_dir() -> str:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def resolve(ckpt):
    """a --ckpt value -> a folder: an existing path (or anything not shaped ORG/NAME) as it is, a Hub id as the
    snapshot folder of its cached copy (downloaded first if absent and huggingface_hub is installed)."""
    if ckpt is None or os.path.exists(ckpt) or not HUB_ID.fullmatch(ckpt):
        return ckpt
    repo = os.path.join(cache_dir(), "models--" + ckpt.replace("/", "--"))
    ref = os.path.join(repo, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            snapshot = os.path.join(repo, "snapshots", f.read().strip())
        if os.path.isdir(snapshot):
            return snapshot
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{ckpt}: no such folder, and no such model in the Hugging Face cache ({cache_dir()}); "
                              f"pip install huggingface_hub to download it, or pass a local folder") from None
    try:
        return snapshot_download(ckpt, allow_patterns=PATTERNS)
    except Exception as e:  # offline, unknown, gated: the Hub's own words
        why = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{ckpt}: no such folder, and not in the Hugging Face cache ({cache_dir()}); downloading "
                              f"it failed: {type(e).__name__}: {why}") from None
