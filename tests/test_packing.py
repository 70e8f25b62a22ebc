"""Packing (data.pack, data.step_batches): the same examples in fewer, fuller rows, each example attending only to
itself with positions from 0, so a packed step's loss and gradient are the unpacked step's (float rounding aside),
and a run packed or not trains the same deltas; the log counts real and padded tokens."""

import json
import random

import pytest
import torch

import chat
import data
import spiel
from conftest import set_random_values, train_run
from test_train import read_log as read_log_records
from llama import IGNORE_INDEX, PROJECTIONS, load_model
from tokenizer import SentencePiece


def examples(n, seed=0, lo=3, hi=40, vocab=256):
    """n random (inputs, targets, record) of heavy-tailed lengths, with labels on the second half of each."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = min(hi, lo + int(rng.paretovariate(1.2)))
        x = torch.randint(vocab, (T + 1,), generator=g)
        y = x[1:].clone()
        y[:T // 2] = IGNORE_INDEX
        out.append((x[:-1], y, None))
    return out


def test_pack_puts_every_example_once_into_as_few_rows_as_hold_them():
    ex = examples(200)
    for seq_len in (40, 64, 256):
        rows = data.pack(ex, seq_len)
        lengths = [sum(len(x) for x, _, _ in r) for r in rows]
        assert max(lengths) <= seq_len and sorted(id(e) for r in rows for e in r) == sorted(id(e) for e in ex)
        ffd = []  # first fit decreasing, the bound
        for n in sorted((len(x) for x, _, _ in ex), reverse=True):
            i = next((i for i, used in enumerate(ffd) if used + n <= seq_len), None)
            ffd.append(n) if i is None else ffd.__setitem__(i, ffd[i] + n)
        assert len(rows) <= len(ffd)
    x, y, seg = data.collate_packed(data.pack(ex[:5], 64), pad_id=0)
    for r in range(x.shape[0]):  # each example is a run of one segment id; padding is -1 with no label
        assert (y[r][seg[r] == -1] == IGNORE_INDEX).all()
    assert data.pack(ex[:3], 1000, min_rows=3) and len(data.pack(ex[:3], 1000, min_rows=3)) == 3


def test_every_process_gets_a_micro_batch_and_the_first_draw_stays_apart():
    ex = examples(12)
    draws = [ex[i:i + 3] for i in range(0, 12, 3)]
    for world in (1, 2, 4):
        micro = data.step_batches(draws, 3, 1000, 0, world=world)
        assert len(micro) >= world and sum(int((m[1] != IGNORE_INDEX).sum()) for m in micro) == \
            sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in ex)
    first = data.step_batches(draws, 3, 1000, 0, first_apart=True, world=2)
    x, y, seg = first[0]  # exactly the first draw's examples
    assert sorted(x[seg == s].tolist() for s in seg.unique() if s >= 0) == sorted(e[0].tolist() for e in draws[0])


def test_a_packed_step_gives_the_unpacked_loss_and_gradient(tiny):
    """the same 16 examples, one a row (padded) or packed into rows of 64 tokens: the summed loss and every delta's
    gradient agree to float rounding (fp32); packing processes far fewer positions."""
    model = load_model(tiny.hf, dtype=torch.float32)
    layers = spiel.add_sparse_deltas(model, PROJECTIONS, density=0.1, seed=0)
    set_random_values(model)
    model.train()
    draws = [examples(16, seed=1)[i:i + 4] for i in range(0, 16, 4)]
    got = {}
    for packing in (False, True):
        micro = data.step_batches(draws, 4, 64, 0, packing=packing)
        loss = sum(model(x, y, reduction="sum", segments=s)[1] for x, y, s in micro)
        loss.backward()
        got[packing] = loss.detach(), [m.values.grad.clone() for m in layers.values()], sum(x.numel() for x, _, _ in micro)
        model.zero_grad(set_to_none=True)
    (l0, g0, n0), (l1, g1, n1) = got[False], got[True]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-4)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert n1 < 0.8 * n0


@pytest.mark.parametrize("method", ["spiel-ag", "spiel-ma", "lora", "full"])
def test_a_packed_run_trains_what_the_unpacked_run_trains(method, tiny, task, tmp_path):
    """8 steps of 8 examples (SpIEL: reselections at steps 2 and 7, an AG window open from step 1 and from step 2):
    every step's loss agrees to 1e-5 and the trained tensors to float rounding; a SpIEL run reselects the same
    positions (SpIEL-AG's candidates come from the same first draw: the step keeps it apart)."""
    extra = ["--lora-dropout", "0"] if method == "lora" else []
    for name, flags in (("packed", []), ("unpacked", ["--no-packing"])):
        assert train_run(tiny, task, tmp_path / name, "--max-steps", "8", *extra, *flags, method=method) == 0
    logs = {n: read_log_records(tmp_path / n) for n in ("packed", "unpacked")}
    steps = {n: [r for r in logs[n] if "loss" in r] for n in logs}
    assert [r["loss"] for r in steps["packed"]] == pytest.approx([r["loss"] for r in steps["unpacked"]], rel=1e-5)
    assert sum(r["padded_tokens"] for r in steps["packed"]) < sum(r["padded_tokens"] for r in steps["unpacked"])
    assert [r["tokens"] for r in steps["packed"]] == [r["tokens"] for r in steps["unpacked"]]
    reselected = {n: [r["by_matrix"] for r in logs[n] if r.get("event") == "reselect"] for n in logs}
    assert reselected["packed"] == reselected["unpacked"]
    if method == "full":
        return
    from safetensors.torch import load_file
    name = "lora.safetensors" if method == "lora" else "delta.safetensors"
    a, b = load_file(tmp_path / "packed" / name), load_file(tmp_path / "unpacked" / name)
    for k in a:
        if k.endswith(".indices"):
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-6)


def test_the_run_reports_its_padding(tiny, task, tmp_path, capsys):
    assert train_run(tiny, task, tmp_path / "r", "--max-steps", "2") == 0
    out = capsys.readouterr().out
    end = [r for r in read_log_records(tmp_path / "r") if r.get("event") == "end"][0]
    share = 1 - end["tokens"] / end["padded_tokens"]
    assert f"padding {share:.1%} of the positions processed (packed)" in out and share < 0.05


def test_padding_stays_under_5_percent_on_heavy_tailed_steps():
    """steps of 32 examples (batch 8 x accum 4) of heavy-tailed lengths up to 1,024 tokens, rows of 1,024: a row much
    shorter than its micro-batch's longest goes to a micro-batch of its own, so each step pads under MAX_PAD."""
    ex = examples(32 * 20, seed=3, lo=10, hi=1024)
    for s in range(20):
        step = ex[32 * s:32 * (s + 1)]
        micro = data.step_batches([step[i:i + 8] for i in range(0, 32, 8)], 8, 1024, 0)
        real = sum(len(x) for x, _, _ in step)
        assert 1 - real / sum(x.numel() for x, _, _ in micro) <= data.MAX_PAD
        assert all(x.shape[0] <= 8 for x, _, _ in micro)


def test_a_packed_row_gives_each_example_its_own_logits_within_a_sliding_window(family):
    """Mistral's window (16 here) and packing together: each example of a packed row gets exactly the logits it
    gets alone (positions from 0, no attention to the other examples, the window counted within it)."""
    model = load_model(family("mistral"), dtype=torch.float32)
    ex = [(t, t, None) for t in (torch.randint(256, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 7, 24))]
    x, _, seg = data.collate_packed([ex], pad_id=0)
    with torch.no_grad():
        packed = model(x, segments=seg)[0][0]
        t = 0
        for e, _, _ in ex:
            torch.testing.assert_close(packed[t:t + len(e)], model(e[None])[0][0], rtol=1e-5, atol=1e-5)
            t += len(e)
