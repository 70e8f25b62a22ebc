"""llama.py: layouts agree, logits match independent references, KV cache, tokenizer, export, bad input.
(A fine-tune for another base: test_finetune.py.)"""

import json
import os
import shutil
import sys

import pytest
import torch

from conftest import run_watched, write_meta
from generate import generate
from files import CheckpointError
from llama import IGNORE_INDEX, load_model
from tokenizer import SentencePiece as Tokenizer, find as find_tokenizer
from merge import save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- independent references --------------------------------------------------------------------------

def reference_logits(sd, args, tokens, rope="meta"):
    """a naive LLaMA forward: explicit per-head attention loops, complex-number RoPE as in Meta's code
    (rope="meta", weights in Meta order) or rotate_half as in HF's code (rope="hf", HF-permuted q/k)."""
    hd, T = args.dim // args.n_heads, tokens.shape[0]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(T).float(), freqs)  # (T, hd/2)

    def rope_meta(x):  # (T, hd): pairs (2i, 2i+1) as complex numbers
        xc = torch.view_as_complex(x.reshape(T, hd // 2, 2))
        return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).reshape(T, hd)

    def rope_hf(x):  # rotate_half: dim i pairs with i + hd/2
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        rot = torch.cat([-x[:, hd // 2:], x[:, :hd // 2]], -1)
        return x * cos + rot * sin

    rot = rope_meta if rope == "meta" else rope_hf

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w

    h = sd["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = norm(h, sd[p + "attention_norm.weight"])
        q, k, v = (x @ sd[p + f"attention.{n}.weight"].T for n in ("wq", "wk", "wv"))
        heads = []
        for hq in range(args.n_heads):
            hk = hq // (args.n_heads // args.n_kv_heads)  # grouped-query: heads share kv heads
            qh, kh, vh = rot(q[:, hq * hd:(hq + 1) * hd]), rot(k[:, hk * hd:(hk + 1) * hd]), v[:, hk * hd:(hk + 1) * hd]
            out = torch.zeros(T, hd)
            for t in range(T):
                scores = torch.stack([qh[t] @ kh[s] for s in range(t + 1)]) / hd ** 0.5
                out[t] = torch.softmax(scores, 0) @ vh[:t + 1]
            heads.append(out)
        h = h + torch.cat(heads, -1) @ sd[p + "attention.wo.weight"].T
        x = norm(h, sd[p + "ffn_norm.weight"])
        gate, up = x @ sd[p + "feed_forward.w1.weight"].T, x @ sd[p + "feed_forward.w3.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ sd[p + "feed_forward.w2.weight"].T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


def hf_permuted_sd(sd, args):
    """the Meta-named dict with q/k rows in HF order (for the rotate_half reference)."""
    from conftest import to_hf
    hf = to_hf(sd, args)
    out = dict(sd)
    for i in range(args.n_layers):
        out[f"layers.{i}.attention.wq.weight"] = hf[f"model.layers.{i}.self_attn.q_proj.weight"]
        out[f"layers.{i}.attention.wk.weight"] = hf[f"model.layers.{i}.self_attn.k_proj.weight"]
    return out


TOKENS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 7, 64, 128, 5, 200]])


def test_ffn_hidden_sizes_match_meta():
    from llama import PRESETS
    assert [PRESETS[n].ffn_dim for n in ("7B", "13B", "70B")] == [11008, 13824, 28672]


def test_all_layouts_give_identical_logits(tiny):
    outs = [load_model(p, dtype=torch.float32)(TOKENS)[0] for p in (tiny.meta1, tiny.meta2, tiny.hf)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_logits_match_naive_references(tiny):
    model = load_model(tiny.meta1, dtype=torch.float32)
    logits, _ = model(TOKENS)
    ref = reference_logits(tiny.sd, tiny.args, TOKENS[0])
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=1e-5)
    # the HF reference (rotate_half on permuted weights) agrees: the permutation and both RoPEs are consistent
    ref_hf = reference_logits(hf_permuted_sd(tiny.sd, tiny.args), tiny.args, TOKENS[0], rope="hf")
    torch.testing.assert_close(ref_hf, ref, atol=1e-5, rtol=1e-5)


def test_loss_ignores_masked_targets(tiny):
    model = load_model(tiny.meta1, dtype=torch.float32)
    targets = TOKENS.roll(-1, 1).clone()
    targets[0, :5] = IGNORE_INDEX
    logits, loss = model(TOKENS)[0], model(TOKENS, targets)[1]
    manual = torch.nn.functional.cross_entropy(logits[0, 5:], targets[0, 5:])
    torch.testing.assert_close(loss, manual)
    _, loss_sum = model(TOKENS, targets, reduction="sum")
    torch.testing.assert_close(loss_sum, manual * (TOKENS.shape[1] - 5))


def test_the_loss_in_chunks_equals_the_whole_loss_and_its_gradient(tiny, monkeypatch):
    """a large vocabulary's logits are computed a chunk of positions at a time, each recomputed in backward: the
    loss and every gradient equal the unchunked ones (here 3 positions a chunk, 14 labelled positions)."""
    import llama
    targets = TOKENS.roll(-1, 1).clone()
    targets[0, :5] = IGNORE_INDEX
    got = {}
    for chunk in (llama.LOSS_CHUNK, 3 * tiny.args.vocab_size):
        monkeypatch.setattr(llama, "LOSS_CHUNK", chunk)
        model = load_model(tiny.meta1, dtype=torch.float32).requires_grad_(True)
        loss = model(TOKENS, targets, reduction="sum")[1]
        loss.backward()
        got[chunk] = loss, {n: p.grad for n, p in model.named_parameters()}
    (whole, g1), (chunked, g2) = got.values()
    torch.testing.assert_close(chunked, whole)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-6)


def test_kv_cache_generation_equals_full_forward(tiny):
    model = load_model(tiny.hf, dtype=torch.float32)
    prompt = [1, 17, 42, 99]
    new = generate(model, prompt, max_new_tokens=20, temperature=0)
    assert len(new) == 20
    seq = list(prompt)
    for _ in range(20):  # step by step, full forward each time, no cache
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert new == seq[len(prompt):]


def test_sampling_is_seeded_and_stops_at_eos(tiny):
    model = load_model(tiny.hf, dtype=torch.float32)
    a = generate(model, [1, 5], 15, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(model, [1, 5], 15, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert a == b
    greedy = generate(model, [1, 5], 15, temperature=0)
    stop = greedy[3]  # pretend the 4th greedy token is EOS: generation must stop right after it
    assert generate(model, [1, 5], 15, temperature=0, stop_ids={stop}) == greedy[:greedy.index(stop) + 1]


def test_tokenizer_bos_eos_and_lookup(tiny):
    assert find_tokenizer(tiny.meta1) == os.path.normpath(tiny.tokenizer)  # one level up, as Meta ships it
    assert find_tokenizer(tiny.hf) == os.path.join(tiny.hf, "tokenizer.model")
    tok = Tokenizer(tiny.tokenizer)
    ids = tok.encode("the cat sat on the mat")
    assert ids[0] == tok.bos_id == 1 and tok.eos_id == 2 and ids[-1] != 2 and 2 not in ids
    assert tok.encode("the cat", bos=False, eos=True)[-1] == 2
    assert tok.encode("the cat", bos=False)[0] != 1
    assert tok.decode(ids) == "the cat sat on the mat"
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        find_tokenizer(str(tiny.root / "nowhere"))


def test_save_hf_round_trip(tiny, tmp_path, monkeypatch):
    import merge
    model = load_model(tiny.meta2, dtype=torch.float32)
    out = tmp_path / "export"
    monkeypatch.setattr(merge, "MAX_SHARD_BYTES", 100_000)  # small shards: exercises the index
    save_hf(model, tiny.meta1, str(out))
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.model").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2
    back = load_model(str(out), dtype=torch.float32)
    assert torch.equal(back(TOKENS)[0], model(TOKENS)[0])
    with pytest.raises(FileExistsError):  # never overwrites
        save_hf(model, tiny.meta1, str(out))


def test_hf_export_matches_reference_layout(tiny, tmp_path):
    """the exported q/k rows equal the layout the test writes independently from the notes."""
    from safetensors.torch import load_file
    from conftest import to_hf
    save_hf(load_model(tiny.meta1, dtype=torch.float32), None, str(tmp_path / "x"))
    got = load_file(str(tmp_path / "x" / "model.safetensors"))
    want = to_hf(tiny.sd, tiny.args)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_bf16_load_and_pytorch_bin_layout(tiny, tmp_path):
    from conftest import to_hf
    folder = tmp_path / "bin"
    shutil.copytree(tiny.hf, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    torch.save(to_hf(tiny.sd, tiny.args), folder / "pytorch_model.bin")
    a = load_model(str(folder), dtype=torch.float32)(TOKENS)[0]
    b = load_model(tiny.meta1, dtype=torch.float32)(TOKENS)[0]
    assert torch.equal(a, b)
    m16 = load_model(tiny.meta1)  # default dtype bf16
    assert m16.output.weight.dtype == torch.bfloat16 and not any(p.requires_grad for p in m16.parameters())


# --- bad input: each gets a CheckpointError naming the file ----------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_unknown_folders(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a Meta"):
        load_model(str(tmp_path / "empty"))


def test_malformed_configs(tiny, tmp_path):
    meta = _copy(tiny.meta1, tmp_path / "m")
    (meta / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="params.json: not valid JSON"):
        load_model(str(meta))
    hf = _copy(tiny.hf, tmp_path / "h")
    cfg = json.loads((hf / "config.json").read_text())
    del cfg["hidden_size"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: missing field 'hidden_size'"):
        load_model(str(hf))


def test_truncated_and_unsafe_weight_files(tiny, tmp_path):
    meta = _copy(tiny.meta1, tmp_path / "m")
    f = meta / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot read"):
        load_model(str(meta))
    hf = _copy(tiny.hf, tmp_path / "h")
    f = hf / "model-00001-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: cannot read"):
        load_model(str(hf))
    # a pickle that would run code when unpickled is refused, never executed
    evil = _copy(tiny.meta1, tmp_path / "e")
    marker = tmp_path / "pwned"
    torch.save({"x": Exploit(str(marker))}, evil / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model(str(evil))
    assert not marker.exists()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_shard_count_and_key_mismatches(tiny, tmp_path):
    bad = _copy(tiny.meta2, tmp_path / "s")
    os.remove(bad / "consolidated.01.pth")  # one of two shards: every split weight is half its size
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: .* has shape .*number of shards"):
        load_model(str(bad))
    extra = _copy(tiny.meta1, tmp_path / "x")
    sd = dict(tiny.sd, **{"layers.0.attention.bogus.weight": torch.zeros(2)})
    write_meta(sd, tiny.args, str(extra))
    with pytest.raises(CheckpointError, match="unexpected key layers.0.attention.bogus.weight"):
        load_model(str(extra))
    missing = _copy(tiny.meta1, tmp_path / "y")
    sd = {k: v for k, v in tiny.sd.items() if k != "layers.1.ffn_norm.weight"}
    write_meta(sd, tiny.args, str(missing))
    with pytest.raises(CheckpointError, match="missing key layers.1.ffn_norm.weight"):
        load_model(str(missing))


def test_generate_cli(tiny, capsys):
    """generate.main in this process: the prompt and its continuation; a bad --ckpt is one line naming it (the
    `python generate.py` process, its "error: " line and exit status: the test below)."""
    import generate
    generate.main(["--ckpt", tiny.hf, "--prompt", "the cat", "--max-new-tokens", "5", "--temperature", "0",
                   "--device", "cpu"])
    assert capsys.readouterr().out.startswith("the cat")
    missing = str(tiny.root / "missing")
    with pytest.raises(CheckpointError, match="checkpoint folder not found") as e:
        generate.main(["--ckpt", missing, "--prompt", "x"])
    assert str(e.value).startswith(missing) and "\n" not in str(e.value)


def test_a_file_given_as_the_checkpoint_folder_says_what_it_is(tiny, tmp_path):
    """--ckpt runs/x/delta.safetensors (or a weights file, or the tokenizer): a folder is expected, and the
    message says what the file is and what to pass instead, in one line. A real `python generate.py` process
    here (these tests' one): its `__main__` path prints that one line, "error: " first, and exits with 1."""
    from safetensors.torch import save_file
    from llama import check_checkpoint
    delta, adapter = str(tmp_path / "delta.safetensors"), str(tmp_path / "lora.safetensors")
    save_file({"x": torch.zeros(1)}, delta, metadata={"format": "spiel-delta"})
    save_file({"x": torch.zeros(1)}, adapter, metadata={"format": "spiel-lora"})
    weights = os.path.join(tiny.hf, sorted(f for f in os.listdir(tiny.hf) if f.endswith(".safetensors"))[0])
    for path, what in ((delta, "a sparse delta file: pass the base model's folder (generate.py and merge.py take "
                               "this file with --delta)"),
                       (adapter, "a LoRA adapter file: pass the base model's folder"),
                       (weights, f"a file of a checkpoint: pass the folder that holds it ({tiny.hf})"),
                       (os.path.join(tiny.hf, "config.json"), f"pass the folder that holds it ({tiny.hf})"),
                       (tiny.tokenizer, "a tokenizer: pass the checkpoint folder")):
        with pytest.raises(CheckpointError) as e:
            check_checkpoint(path)
        assert str(e.value).startswith(f"{path}: a checkpoint folder is expected, and this is ") and \
            what in str(e.value), str(e.value)
    p = run_watched([sys.executable, os.path.join(ROOT, "generate.py"), "--ckpt", delta, "--prompt", "x"], cwd=ROOT)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"error: {delta}: a checkpoint folder is expected, and this is a sparse delta file: pass the base model's "
        f"folder (generate.py and merge.py take this file with --delta)"], p.stderr
