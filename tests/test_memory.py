"""
Tests for tools/memory.py: the estimate against the bytes real tensors hold after a real training step on a tiny
LLaMA and a tiny Qwen2.5-like checkpoint (weights, deltas, gradients, optimizer state, the AG window; AdamW and
SM3, with and without a quantized base), the activation model and the chunked loss against what autograd
actually saves (also with a large vocabulary, biases and a tied head), the 7B sanity bounds of tools/memory.py's
docstring, the Llama 3.1 and Qwen2.5 presets, and its command line and --measure path run on the CPU (in this
process). About ten seconds.
"""

import functools
import json
import math

import pytest
import torch

import config
import llama
import lora
import memory
import spiel
import train
from conftest import TINY, random_state_dict
from llama import PRESETS, PROJECTIONS, ModelArgs, Transformer, load_model, matrix_shape, read_shapes, target_linears
from sm3 import SM3

PERSISTENT = ("base weights", "other weights", "trainable", "gradients", "optimizer state", "AG window")


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def real_step(model, method, density=0.05, lora_rank=4, sm3_momentum=0.0):
    """set up `method` on a loaded model as the design says (built here by hand, not by train.add_trainable,
    which memory.py uses) and take one step (AG: window open); gradients are left in place, as at the peak.
    Returns the optimizer."""
    selector = None
    if method.startswith("spiel"):
        layers = spiel.add_sparse_deltas(model, PROJECTIONS, density=density)
        values = [m.values for m in layers.values()]
        positions = {m.values: (m.indices, m.weight_shape) for m in layers.values()}  # SM3's sparse deltas
        optimizer = spiel.AdamW(values) if method == "spiel-ag" else \
            SM3(values, momentum=sm3_momentum, positions=positions)
        selector = spiel.Selector(model, method[-2:], spiel.Schedule(10, interval=4, first=2), optimizer)
        selector.begin_step(1)
    elif method == "lora":  # LoRA and full fine-tuning: torch's AdamW
        lora.add_lora(model, PROJECTIONS, lora_rank)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
    else:
        optimizer = torch.optim.AdamW(list(model.requires_grad_(True).parameters()), foreach=False)
    model.train()
    tokens = torch.randint(model.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    if selector:
        selector.end_step()
    optimizer.step()
    return optimizer


def window_tensors(w) -> list:
    """an AG window's own tensors (its `indices` are the layer's, counted with the model)."""
    return [t for t in (w.candidates, w.step_sum, w.grad_sum, w.sq_sum) if t is not None]


def real_bytes(model, optimizer) -> dict:
    """what the tensors hold, counted independently of memory.py."""
    windows = [t for m in spiel.delta_layers(model).values() if m.window for t in window_tensors(m.window)]
    return {"model": nbytes(list(model.parameters()) + list(model.buffers())),
            "gradients": nbytes(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer state": nbytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)),
            "AG window": nbytes(windows)}


CASES = [("spiel-ag", None, {}), ("spiel-ag", "int8", {}), ("spiel-ag", "nf4", {}),
         ("spiel-ma", None, {}), ("spiel-ma", "int8", {"sm3_momentum": 0.9}), ("spiel-ma", "nf4", {}),
         ("lora", None, {}), ("lora", "nf4", {}), ("full", None, {})]


# and a Qwen2.5-like checkpoint (conftest.FAMILIES): q/k/v biases (kept in full precision on a quantized base),
# the head tied to the embedding
@pytest.mark.parametrize("ckpt,method,quantize,extra", [("tiny", *case) for case in CASES] + [
    ("qwen2.5", "spiel-ag", "int8", {}), ("qwen2.5", "spiel-ma", "nf4", {}), ("qwen2.5", "full", None, {})])
def test_estimate_matches_real_tensors_after_a_step(tiny, family, ckpt, method, quantize, extra):
    model = load_model(tiny.meta1 if ckpt == "tiny" else family(ckpt), dtype=torch.float32, quantize=quantize)
    assert ckpt == "tiny" or (model.args.bias and model.output.weight is model.tok_embeddings.weight)
    optimizer = real_step(model, method, **extra)
    real = real_bytes(model, optimizer)
    # LoRA at rank 4: with a density, train.py (and so memory.py) would set LoRA's rank to match it instead
    budget = dict(density=None if method == "lora" else 0.05, lora_rank=4)
    est = memory.estimate(model.args, method, quantize, seq_len=16, batch_size=2, dtype=torch.float32, **budget,
                          **extra)
    assert real["AG window"] > 0 if method == "spiel-ag" else real["AG window"] == 0
    assert real["optimizer state"] > 0 and real["gradients"] > 0
    # the layout the estimate's byte counts rest on
    for p, st in optimizer.state.items():
        if method == "spiel-ag":  # spiel.AdamW: per-element age, all fp32
            assert set(st) == {"exp_avg", "exp_avg_sq", "age"} and all(v.dtype == torch.float32 for v in st.values())
        elif method == "spiel-ma":  # SM3 on a sparse delta: row and column accumulators (+ momentum per delta)
            assert set(st) == {"row", "col"} | ({"momentum_buffer"} if extra else set())
        else:  # torch's AdamW: m and v in the parameter's dtype, and a scalar step
            assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and st["step"].numel() == 1
            assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == p.dtype
    if method == "spiel-ag":  # per delta: a candidate (the indices' int32) + fp32 step, grad and square sums
        k = sum(m.indices.numel() for m in spiel.delta_layers(model).values())
        for m in spiel.delta_layers(model).values():
            w = m.window
            assert w.candidates.dtype == m.indices.dtype == torch.int32
            assert all(t.dtype == torch.float32 and t.numel() == m.indices.numel()
                       for t in (w.step_sum, w.grad_sum, w.sq_sum))
        assert real["AG window"] == 16 * k
    model_est = est["base weights"] + est["other weights"] + est["trainable"]
    # the counts come from tensors on both sides, so they agree to the byte; "a few percent" is the promise
    for key, e in (("model", model_est), ("gradients", est["gradients"]),
                   ("optimizer state", est["optimizer state"]), ("AG window", est["AG window"])):
        assert e == pytest.approx(real[key], rel=0.02, abs=8), key
    if quantize:  # and the quantized base is smaller than the same model in fp32
        dense = memory.estimate(model.args, method, None, seq_len=16, batch_size=2, density=0.05, lora_rank=4,
                                dtype=torch.float32, **extra)
        assert est["base weights"] < dense["base weights"] / (3.5 if quantize == "int8" else 6)


@pytest.mark.slow  # (scripts in a shell, or a tool's own run: the slow tier)
def test_7b_sanity_bounds():
    """the 7B numbers of tools/memory.py's docstring: LLaMA-2-7B at LoRA-rank-64's budget."""
    k = 159_907_840
    ag = memory.estimate(PRESETS["7B"], "spiel-ag", None, seq_len=16)
    ma = memory.estimate(PRESETS["7B"], "spiel-ma", None, seq_len=16)
    # the whole base in bf16: 6.74e9 parameters x 2 bytes (projections + embeddings, norms, head, rope tables)
    assert ag["base weights"] + ag["other weights"] == pytest.approx(6.74e9 * 2, rel=0.01)
    assert ag["trainable"] == 8 * k  # fp32 value + int32 index
    assert ag["trainable"] + ag["gradients"] + ag["optimizer state"] == 24 * k  # 3.84 GB
    assert ag["AG window"] == 16 * k  # int32 candidates (as the indices) + fp32 step, grad and square sums
    d, f, L = 4096, 11008, 32
    sm3_acc = 4 * L * (4 * (d + d) + 3 * (f + d))  # row + col accumulators of the 224 matrices, fp32
    assert ma["trainable"] + ma["gradients"] + ma["optimizer state"] == 12 * k + sm3_acc  # 1.92 GB + 5.4 MB
    assert ma["AG window"] == 0
    int8 = memory.estimate(PRESETS["7B"], "spiel-ma", "int8", seq_len=16)
    nf4 = memory.estimate(PRESETS["7B"], "spiel-ma", "nf4", seq_len=16)
    assert 6.9e9 < int8["base weights"] + int8["other weights"] < 7.1e9  # "about 7 GB"
    assert 3.7e9 < nf4["base weights"] + nf4["other weights"] < 4.0e9  # "about 3.8 GB"
    # LoRA rank 64 (k parameters) and full fine-tuning train with torch's AdamW: m and v in the parameter's
    # dtype (LoRA fp32, full bf16) and a 4-byte step per tensor; no per-element age
    lora64 = memory.estimate(PRESETS["7B"], "lora", None, seq_len=16)
    assert lora64["trainable"] == lora64["gradients"] == 4 * k
    assert lora64["optimizer state"] == 8 * k + 4 * 2 * 224
    full = memory.estimate(PRESETS["7B"], "full", None, seq_len=16)
    with torch.device("meta"):
        params = list(Transformer(PRESETS["7B"]).parameters())
    n = sum(p.numel() for p in params)
    assert full["gradients"] == 2 * n and full["optimizer state"] == 4 * n + 4 * len(params)
    assert full["optimizer step"] == 2 * 2 * 32000 * d  # sqrt(v) and sqrt(v) / c of the embedding, bf16


def test_estimate_orders_and_options():
    tiny = ModelArgs(**TINY)
    e = {m: memory.estimate(tiny, m, None, 64, 2, True, density=0.05, lora_rank=4, dtype=torch.float32)
         for m in memory.METHODS}
    assert e["spiel-ma"]["total"] < e["spiel-ag"]["total"] < e["full"]["total"]
    no_ckpt = memory.estimate(tiny, "spiel-ag", None, 64, 2, False, density=0.05, dtype=torch.float32)
    assert no_ckpt["activations"] > e["spiel-ag"]["activations"]
    closed = memory.estimate(tiny, "spiel-ag", None, 64, 2, True, density=0.05, window_open=False, dtype=torch.float32)
    assert closed["AG window"] == 0 and closed["total"] < e["spiel-ag"]["total"]
    with pytest.raises(ValueError, match="full-precision"):
        memory.estimate(tiny, "full", "int8")


def test_an_ag_window_choosing_candidates_is_counted_per_matrix():
    """while SpIEL-AG's window picks a matrix's candidates, its merged weight, dense gradient, |gradient| and
    top_k's mask (3 x 4 + 1 B per weight in fp32) and top_k's work per delta (memory.CHOOSE_BYTES) are alive."""
    args = ModelArgs(**TINY)
    est = memory.estimate(args, "spiel-ag", "int8", 64, 1, True, density=0.05, dtype=torch.float32, device="cpu")
    closed = memory.estimate(args, "spiel-ag", "int8", 64, 1, True, density=0.05, dtype=torch.float32, device="cpu",
                             window_open=False)
    model, _ = memory.meta_model(args, "spiel-ag", "int8", torch.float32, density=0.05)
    want = max(13 * math.prod(m.weight_shape) + memory.CHOOSE_BYTES * m.indices.numel()
               for m in spiel.delta_layers(model).values())
    assert est["weight transient"] == want > closed["weight transient"]
    assert est["total"] - est["AG window"] > closed["total"]


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'adapters'"):
        memory.estimate(ModelArgs(**TINY), "adapters")


def test_lora_rank_follows_a_density_budget():
    # as in train.py, a SpIEL budget (density) sets LoRA's rank; the whole estimate is that rank's
    tiny = ModelArgs(**TINY)
    with torch.device("meta"):
        model = Transformer(tiny)
    targeted = sum(math.prod(matrix_shape(m)) for m in target_linears(model, PROJECTIONS).values())
    r = lora.rank_for_budget(model, PROJECTIONS, round(0.05 * targeted))
    assert r != 4
    est = memory.estimate(tiny, "lora", None, 64, 2, False, density=0.05, lora_rank=4, dtype=torch.float32)
    assert est["trainable"] == 4 * spiel.lora_param_count(model, PROJECTIONS, r)
    assert est == memory.estimate(tiny, "lora", None, 64, 2, False, lora_rank=r, dtype=torch.float32)


# -----------------------------------------------------------------------------
# the activation model against autograd's saved tensors


def saved_bytes(model, run):
    """bytes of the distinct storages autograd saves while `run()` runs, minus the model's own tensors."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,quantize,dropout,targets", [
    ("spiel-ag", None, 0.1, "all"), ("spiel-ag", "int8", 0.1, "all"), ("full", None, 0.1, "all"),
    ("lora", None, 0.1, "all"), ("lora", None, 0.0, "all"), ("lora", "int8", 0.1, "all"),
    ("spiel-ag", None, 0.1, "attention"), ("spiel-ma", None, 0.1, "mlp"), ("lora", None, 0.1, "attention"),
    ("lora", None, 0.0, "wq,wv"), ("full", None, 0.1, "mlp")])
def test_saved_activations_match_autograd(method, quantize, dropout, targets, dtype):
    args = ModelArgs(**(TINY | {"n_layers": 3}))  # grouped-query attention, as TINY
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args))
    check_saved_activations(model, method, quantize, dropout, targets, dtype)


# Llama 3 / Qwen2.5-like: a vocabulary large against the tokens (scaled down with llama.LOSS_CHUNK), q/k/v biases
# and an output head that is the embedding
LARGE_VOCAB = TINY | {"n_layers": 3, "vocab_size": 1000, "bias": ("wq", "wk", "wv"), "tie_embeddings": True}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [5, None])  # 32 positions in 7 chunks of at most 5, or in one
@pytest.mark.parametrize("method,quantize,targets", [
    ("spiel-ag", None, "all"), ("spiel-ma", "int8", "all"), ("lora", "nf4", "all"), ("full", None, "all"),
    ("full", None, "mlp")])
def test_saved_activations_large_vocab_biases_tied(monkeypatch, method, quantize, targets, chunk_rows, dtype):
    args = ModelArgs(**LARGE_VOCAB)
    if chunk_rows:
        monkeypatch.setattr(llama, "LOSS_CHUNK", chunk_rows * args.vocab_size)
    model = memory.random_model(args, "cpu", torch.float32)  # (random biases, the head tied to the embedding)
    assert model.output.weight is model.tok_embeddings.weight and model.layers[0].attention.wq.bias is not None
    check_saved_activations(model, method, quantize, 0.1, targets, dtype)


def check_saved_activations(model, method, quantize, dropout, targets, dtype, B=2, T=16):
    """memory.saved_activations and loss_bytes' "saved" against what autograd saves, for one block and for the
    whole forward with the loss."""
    args = model.args
    model.to(dtype)
    model.reset_rope("cpu")
    if quantize:
        import quantize as q
        q.quantize_model(model, quantize, PROJECTIONS)
    budget = {"density": None} if method == "lora" else {"density": 0.05}  # LoRA at rank 4
    train.add_trainable(model, memory.train_args(method, lora_rank=4, lora_dropout=dropout, targets=targets, **budget))
    model.train()
    tokens = torch.randint(args.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()  # two tensors, as a data loader gives them
    elem = torch.finfo(dtype).bits // 8
    targets = config.parse_targets(targets).split(",")
    act = memory.saved_activations(args, method, B * T, elem, lora_rank=4, lora_dropout=dropout, mask_bytes=elem,
                                   targets=targets)
    # one block whose input needs a gradient (the second): exactly the model's count
    h = model.layers[0](model.tok_embeddings(x), model.rope_cos[:T], model.rope_sin[:T])
    got, _ = saved_bytes(model, lambda: model.layers[1](h, model.rope_cos[:T], model.rope_sin[:T]))
    assert got == act["block"]
    # the whole forward and the loss (LoRA's first block differs in details: within 5%)
    got, _ = saved_bytes(model, lambda: model(x, y))
    want = act["first block"] + (args.n_layers - 1) * act["block"] + act["head"] + \
        memory.loss_bytes(args, method, B * T, elem, targets)["saved"]
    assert got == pytest.approx(want, rel=0.05 if method == "lora" else 0, abs=16)  # + the loss's 4-byte weight sum


def test_loss_chunks_keep_large_vocabularies_small():
    """Llama 3.1's and Qwen2.5's vocabularies at 2,048 tokens: the fp32 logits of one chunk (llama.LOSS_CHUNK),
    not of the sequence (12 x 2048 x 128,256 x 4 B = 12.6 GB)."""
    for preset, rows in (("Llama-3.1-8B", 523), ("Qwen2.5-7B", 441)):
        args = PRESETS[preset]
        assert llama.LOSS_CHUNK // args.vocab_size == rows
        loss = memory.loss_bytes(args, "spiel-ag", 2048, 2)
        assert loss["backward"] == 12 * rows * args.vocab_size + 9 * 2048 + 2 * 2048 * args.dim  # 0.82 GB
        assert loss["saved"] == 9 * 2048 + 2 * 2048 * args.dim  # the labelled hidden states, targets, mask
        full = memory.loss_bytes(args, "full", 2048, 2)  # a trained head: its gradient summed over the chunks
        assert full["backward"] == 9 * 2048 + 4 * rows * args.vocab_size + 2 * 2 * args.vocab_size * args.dim
    one = memory.loss_bytes(PRESETS["7B"], "spiel-ag", 2048, 2)  # 32,000: 2,097 rows, one chunk
    assert one == {"saved": 4 * 2048 * 32000 + 9 * 2048, "backward": 12 * 2048 * 32000 + 9 * 2048}


def test_persistent_bytes_with_biases_and_a_tied_head():
    """a Qwen2.5-like shape (q/k/v biases, the head tied to the embedding): the estimate's weights are the real
    module's tensors (on the meta device), biases with the projections, the tied matrix once."""
    args = ModelArgs(**LARGE_VOCAB)
    d, f, L, dkv, V = args.dim, args.ffn_dim, args.n_layers, args.n_kv_heads * args.head_dim, args.vocab_size
    for quantize in (None, "int8", "nf4"):
        with torch.device("meta"):
            model = Transformer(args)
        model.to(torch.bfloat16)
        model.reset_rope("meta")
        if quantize:
            import quantize as q
            q.quantize_model(model, quantize, PROJECTIONS)
        real = nbytes({id(t): t for t in list(model.parameters()) + list(model.buffers())}.values())
        est = memory.estimate(args, "spiel-ma", quantize, 32, 1, True, density=0.05)
        assert est["base weights"] + est["other weights"] == real, quantize
        # embedding = head (V, d) once, 2L + 1 norms, rope tables (bf16, fp32)
        assert est["other weights"] == 2 * V * d + 2 * (2 * L + 1) * d + 2 * 4 * args.max_seq_len * args.head_dim // 2
        if quantize is None:  # the seven projections and the q/k/v biases, bf16
            assert est["base weights"] == 2 * L * (2 * d * d + 2 * dkv * d + 3 * d * f + d + 2 * dkv)
    for preset, params in (("Llama-3.1-8B", 8_030_261_248), ("Qwen2.5-7B", 7_615_616_512)):
        with torch.device("meta"):  # (the models' own counts)
            assert sum(p.numel() for p in Transformer(PRESETS[preset]).parameters()) == params
    est = memory.estimate(PRESETS["Llama-3.1-8B"], "spiel-ma", None, 2048, 1, True)
    # embedding and head: 128,256 x 4,096 x 2 B each; 131,072 positions of rope tables (67 MB)
    assert est["other weights"] == 2 * 2 * 128256 * 4096 + 2 * 65 * 4096 + 2 * 4 * 131072 * 64  # 2.17 GB


# -----------------------------------------------------------------------------
# the command line and --measure (on the CPU, a tiny preset)


def test_cli_breakdown_and_ckpt_shapes(tiny, capsys):
    for path in (tiny.meta1, tiny.hf):
        a = read_shapes(path)
        assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_dim) == \
               (tiny.args.dim, tiny.args.n_layers, tiny.args.n_heads, tiny.args.n_kv_heads, tiny.args.vocab_size,
                tiny.args.ffn_dim)
    assert memory.main(["--ckpt", tiny.meta1, "--method", "spiel-ma", "--quantize", "nf4", "--seq-len", "64",
                        "--density", "0.05", "--grad-checkpoint"]) == 0
    out = capsys.readouterr().out
    assert "peak estimate" in out and "optimizer state" in out


def test_cli_family_presets_and_table(capsys, monkeypatch):
    argv = ["--preset", "Qwen2.5-7B", "--method", "spiel-ma", "--quantize", "int8", "--grad-checkpoint"]
    assert memory.main(argv) == 0
    assert capsys.readouterr().out.startswith("Qwen2.5-7B (7.62B parameters): spiel-ma, base int8")
    assert memory.model_name("7B") == "LLaMA 2 7B" and memory.model_name("Llama-3.1-8B") == "Llama-3.1-8B"
    # the README's table: a row per preset and method (each cell's estimate is checked above; stubbed here)
    stub = functools.wraps(memory.estimate)(lambda args, *a, **k: {"total": args.dim * 1e6})  # (its signature)
    monkeypatch.setattr(memory, "estimate", stub)
    assert memory.main(["--table"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "GB" in line]
    assert [r.split(" | ")[:2] for r in rows] == [[f"| {p}", m] for p in memory.TABLE_PRESETS for m in memory.METHODS]
    assert {"Llama-3.1-8B", "Qwen2.5-7B"} <= set(memory.TABLE_PRESETS)
    assert "| Qwen2.5-7B | full | 3.6 GB | n/a | n/a |" in rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_measure_refuses_without_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        memory.measure(PRESETS["tiny"], device="cuda")


@pytest.mark.parametrize("preset", ["tiny", "large-vocab"])  # (LARGE_VOCAB: biases, a tied head, 4 loss chunks)
def test_measure_runs_end_to_end_on_cpu(tmp_path, monkeypatch, preset):
    monkeypatch.setitem(PRESETS, "large-vocab", ModelArgs(**LARGE_VOCAB))
    monkeypatch.setattr(llama, "LOSS_CHUNK", 16 * 1000)
    out_json = tmp_path / "mem.json"
    assert memory.main(["--measure", "--device", "cpu", "--preset", preset, "--seq-len", "32", "--batch-size", "2",
                        "--density", "0.05", "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert set(report["runs"]) == {"spiel-ag", "spiel-ma"}
    for method, run in report["runs"].items():
        assert run["peak_allocated"] is None  # CPU: no allocator statistics
        assert len(run["losses"]) == 8 and all(map(lambda x: x == x and abs(x) < 100, run["losses"]))
        assert list(run["reselections"]) == ["2", "6"] and run["reselections"]["2"] > 0
        assert run["tokens_per_s"] > 0 and run["estimate"] > 0
        # after the run (no gradients, windows closed) the live tensors are what the estimate says
        for key in ("base weights", "other weights", "trainable", "optimizer state"):
            assert run["live_persistent"][key] == run["estimate_persistent"][key], (method, key)
        assert run["live_persistent"]["gradients"] == 0 and run["live_persistent"]["AG window"] == 0


def test_per_gpu_estimate_with_and_without_fsdp():
    """torchrun without --fsdp replicates everything (the same per GPU as one GPU); with --fsdp the base
    weights FSDP holds are split over the GPUs (a quantized base's buffers are not FSDP parameters: they stay
    whole), one block is gathered whole again (two, prefetched), and full fine-tuning splits its gradients
    and optimizer state too."""
    args = ModelArgs(**TINY)
    one = memory.estimate(args, "spiel-ag", None, 64, 1, True, density=0.05)
    assert memory.estimate(args, "spiel-ag", None, 64, 1, True, density=0.05, gpus=4)["total"] == one["total"]
    four = memory.estimate(args, "spiel-ag", None, 64, 1, True, density=0.05, gpus=4, fsdp=True)
    assert four["base weights"] == one["base weights"] // 4 and four["trainable"] == one["trainable"]
    assert four["unsharded blocks"] == 2 * one["base weights"] // args.n_layers and four["resident W0"] == 0
    assert four["total"] < one["total"]
    q = memory.estimate(args, "spiel-ma", "int8", 64, 1, True, density=0.05, gpus=4, fsdp=True)
    assert q["base weights"] == memory.estimate(args, "spiel-ma", "int8", 64, 1, True, density=0.05)["base weights"]
    full1, full4 = (memory.estimate(args, "full", None, 64, 1, True, gpus=n, fsdp=n > 1) for n in (1, 4))
    assert full4["gradients"] == full1["gradients"] // 4 and full4["optimizer state"] == full1["optimizer state"] // 4
