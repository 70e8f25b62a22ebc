"""Optional: our Hugging Face export loads in transformers' LlamaForCausalLM and gives the same logits.
transformers is not a dependency of spiel; this test runs only where it is installed (pip install
transformers), and is skipped otherwise. It checks the RoPE q/k permutation against the reference code."""

import os

import pytest
import torch

from llama import load_model
from merge import save_hf

transformers = pytest.importorskip("transformers")


def test_export_matches_transformers(tiny, tmp_path):
    ours = load_model(tiny.meta2, dtype=torch.float32)  # Meta layout, two shards, grouped-query attention
    save_hf(ours, tiny.meta2, str(tmp_path / "hf"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    x = torch.randint(0, tiny.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x).logits, atol=1e-5, rtol=1e-5)
    # and transformers reads the test's independently written HF checkpoint the same way we do
    ref2 = transformers.AutoModelForCausalLM.from_pretrained(tiny.hf, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tiny.hf, dtype=torch.float32)(x)[0], ref2(x).logits, atol=1e-5, rtol=1e-5)
    assert os.path.exists(tmp_path / "hf" / "tokenizer.model")
