"""The researcher's switches, end to end on the tiny model: --targets (attention-only SpIEL and LoRA train,
resume bit for bit, generate, merge and convert both ways; a PEFT folder of q_proj and v_proj only imports),
--regrow random (no AG window, grown at random, the same after a resume and across torchrun processes),
--reselect-every 0 (the support stays fixed after the first reselection), --extend-lr, and the small things a
first trial met (the demo with --out, a LoRA budget too large, the reselection line, --seq-len past the model)."""

import json
import math
import os
import shutil
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import config
import convert
import finetune
import generate
import merge
import spiel
import train
from conftest import (ROOT, TRAIN_ARGS, TRAIN_LR, communicate, popen, run_watched, train_peft_adapter, train_run,
                      wait_until)
from llama import PROJECTIONS, load_model, permute_hf_to_meta

ATTENTION = ("wq", "wk", "wv", "wo")


def tensors(out):
    path = next(os.path.join(out, f) for f in ("delta.safetensors", "lora.safetensors") if os.path.isfile(
        os.path.join(out, f)))
    return load_file(path), path


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# --targets


def test_targets_accept_both_namings_and_presets():
    assert config.parse_targets("all") == ",".join(PROJECTIONS)
    assert config.parse_targets("attention") == config.parse_targets("q_proj,k_proj,v_proj,o_proj") == "wq,wk,wv,wo"
    assert config.parse_targets("mlp") == config.parse_targets("w2,gate_proj,up_proj") == "w1,w2,w3"
    assert config.parse_targets("v_proj,wq") == "wq,wv"
    with pytest.raises(Exception, match="'lm_head' is not a projection"):
        config.parse_targets("wq,lm_head")


@pytest.mark.parametrize("method", ["spiel-ag", "lora"])
def test_an_attention_only_fine_tune_trains_resumes_generates_merges_and_converts(tiny, task, tmp_path, capsys,
                                                                                   method):
    flags = ("--targets", "attention", "--max-steps", "8")
    assert train_run(tiny, task, tmp_path / "whole", *flags, method=method) == 0
    assert train_run(tiny, task, tmp_path / "split", *flags, "--stop-at-step", "4", method=method) == 0
    assert train.main(["--out", str(tmp_path / "split"), "--resume"]) == 0
    whole, path = tensors(tmp_path / "whole")
    assert equal(whole, tensors(tmp_path / "split")[0])  # resumed bit for bit
    assert {k.rsplit(".", 2)[-2] for k in whole} == set(ATTENTION)  # nothing else trained
    ft = finetune.read(path)
    assert ft.meta["targets"] == "wq,wk,wv,wo"
    # the budget follows the targets: LoRA rank r on the 4 attention projections (density 0.1 of them)
    base = load_model(tiny.hf, dtype=torch.float32)
    attn = sum(math.prod(s) for s in ft.shapes.values())
    n = sum(t.numel() for k, t in whole.items() if not k.endswith(".indices"))
    assert n <= 0.1 * attn if method == "lora" else n == round(0.1 * attn)
    # generate and merge take it; merged logits equal the unmerged model's
    generate.main(["--ckpt", tiny.hf, "--delta", path, "--prompt", "copy the cat", "--max-new-tokens", "3",
                   "--temperature", "0", "--device", "cpu"])
    merge.main(["--ckpt", tiny.hf, "--delta", path, "--out", str(tmp_path / "merged")])
    capsys.readouterr()
    finetune.load(base, path, finetune.base_of(base, tiny.hf))
    x = torch.randint(tiny.args.vocab_size, (2, 12))
    merged = load_model(str(tmp_path / "merged"), dtype=torch.float32)
    torch.testing.assert_close(merged(x)[0], base(x)[0], rtol=1e-5, atol=1e-5)
    # convert both ways: the folder names only the attention modules, and comes back the same
    to = "peft" if method == "lora" else "sft"
    convert.convert(path, to, str(tmp_path / to), tiny.hf)
    cfg = json.load(open(tmp_path / to / "adapter_config.json"))
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    convert.convert(str(tmp_path / to), "spiel", str(tmp_path / "back.safetensors"), tiny.hf)
    assert equal(load_file(tmp_path / "back.safetensors"), whole)


def test_a_peft_folder_of_q_and_v_only_imports(tiny, tmp_path):
    """target_modules ["q_proj", "v_proj"]: read, checked and applied; the logits are W + (alpha / r) B A on
    exactly those modules (B's q rows taken from HF's order to Meta's)."""
    r, alpha, g = 2, 4.0, torch.Generator().manual_seed(0)
    a = tiny.args
    weights, want = {}, {}
    for i in range(a.n_layers):
        for hf, ours, out_f in (("q_proj", "wq", a.dim), ("v_proj", "wv", a.n_kv_heads * a.head_dim)):
            A, B = torch.randn(r, a.dim, generator=g), torch.randn(out_f, r, generator=g) * 0.1
            key = f"base_model.model.model.layers.{i}.self_attn.{hf}"
            weights[key + ".lora_A.weight"], weights[key + ".lora_B.weight"] = A, B
            B = permute_hf_to_meta(B, a.n_heads) if ours == "wq" else B
            want[f"layers.{i}.attention.{ours}"] = alpha / r * (B @ A)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(weights, str(folder / "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
               "task_type": "CAUSAL_LM"}, open(folder / "adapter_config.json", "w"))
    model, ref = load_model(tiny.hf, dtype=torch.float32), load_model(tiny.hf, dtype=torch.float32)
    ft = finetune.load(model, str(folder), finetune.base_of(model, tiny.hf))
    assert set(ft.shapes) == set(want)
    with torch.no_grad():
        for name, delta in want.items():
            ref.get_submodule(name).weight += delta
    x = torch.randint(a.vocab_size, (2, 10))
    torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)


def test_full_fine_tuning_trains_only_the_targeted_weights(tiny, task, tmp_path):
    assert train_run(tiny, task, tmp_path / "f", "--targets", "mlp", "--max-steps", "2", method="full") == 0
    before = load_model(tiny.hf, dtype=torch.float32).state_dict()
    after = load_model(str(tmp_path / "f" / "model"), dtype=torch.float32).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.split(".")[-2] in ("w1", "w2", "w3") for k in changed), changed


# -----------------------------------------------------------------------------
# --regrow random, --reselect-every 0


@pytest.mark.parametrize("method", ["spiel-ag", "spiel-ma"])
def test_random_regrowth_opens_no_window_and_resumes_bit_for_bit(tiny, task, tmp_path, monkeypatch, method):
    def no_window(*a, **k):
        raise AssertionError("random regrowth opened an AG window")
    monkeypatch.setattr(spiel, "Window", no_window)
    flags = ("--regrow", "random", "--max-steps", "12")
    assert train_run(tiny, task, tmp_path / "whole", *flags, method=method) == 0
    assert train_run(tiny, task, tmp_path / "split", *flags, "--stop-at-step", "5", method=method) == 0
    assert train.main(["--out", str(tmp_path / "split"), "--resume"]) == 0
    assert equal(tensors(tmp_path / "whole")[0], tensors(tmp_path / "split")[0])
    # it did regrow (at steps 2 and 7), and not where the criterion would have
    moved = [r["changed"] for r in log(tmp_path / "whole") if r.get("event") == "reselect"]
    assert len(moved) == 2 and all(moved)
    monkeypatch.undo()
    assert train_run(tiny, task, tmp_path / "criterion", "--max-steps", "12", method=method) == 0
    a, b = tensors(tmp_path / "whole")[0], tensors(tmp_path / "criterion")[0]
    assert not torch.equal(a["layers.0.attention.wq.indices"], b["layers.0.attention.wq.indices"])


def test_random_candidates_are_uniform_distinct_and_inactive():
    size, k, n = 1000, 100, 60
    active = torch.randperm(size, generator=torch.Generator().manual_seed(1))[:k]
    seen = torch.zeros(size)
    for s in range(200):
        cand, score = spiel.random_candidates(active, n, size, torch.Generator().manual_seed(s))
        assert cand.numel() == n == cand.unique().numel() and not torch.isin(cand, active).any()
        assert torch.equal(score, torch.arange(n, 0, -1, dtype=torch.float32))
        seen[cand] += 1
    inactive = seen[~torch.isin(torch.arange(size), active)]
    expect = 200 * n / (size - k)  # each inactive position: drawn this often on average
    assert seen[active].sum() == 0 and abs(inactive.mean() - expect) < 1e-6 and inactive.std() < 0.5 * expect
    again, _ = spiel.random_candidates(active, n, size, torch.Generator().manual_seed(3))
    assert torch.equal(again, spiel.random_candidates(active, n, size, torch.Generator().manual_seed(3))[0])


def test_a_fixed_support_reselects_once(tiny, task, tmp_path):
    assert train_run(tiny, task, tmp_path / "fixed", "--reselect-every", "0", "--max-steps", "12") == 0
    assert [r["step"] for r in log(tmp_path / "fixed") if r.get("event") == "reselect"] == [2]
    schedule = spiel.Schedule(100, interval=0, first=5)
    assert [t for t in range(1, 100) if schedule.is_reselection(t)] == [5]
    assert [t for t in range(1, 100) if schedule.window_open(t)] == [1, 2, 3, 4, 5]


# -----------------------------------------------------------------------------
# --extend-lr


def test_an_extended_run_replans_or_continues_its_learning_rate(trained, tmp_path):
    peak = float(TRAIN_LR["spiel-ag"])
    for rule in ("replan", "continue"):
        out = tmp_path / rule
        shutil.copytree(trained("spiel-ag"), out)  # 8 steps, finished
        assert train.main(["--out", str(out), "--resume", "--max-steps", "16", "--extend-lr", rule,
                           "--stop-at-step", "12"]) == 0
        assert train.main(["--out", str(out), "--resume"]) == 0  # the rule holds across a later resume
        lrs = {r["step"]: r["lr"] for r in log(out) if "lr" in r}
        if rule == "replan":  # from step 9 on, the 16-step schedule's lr: a jump up from step 8's
            assert lrs[9] == pytest.approx(train.lr_at(9, 16, peak, 2)) and lrs[9] > 2 * lrs[8]
        else:  # no jump: from step 8's lr down to lr_8 / 8 at step 16
            assert lrs[9] == pytest.approx(lrs[8]) and lrs[16] == pytest.approx(lrs[8] / 8)
            assert all(lrs[t + 1] < lrs[t] for t in range(9, 16))
            # a later extension that replans follows the 20-step schedule: the anchor is dropped
            assert train.main(["--out", str(out), "--resume", "--max-steps", "20", "--extend-lr", "replan"]) == 0
            lrs = {r["step"]: r["lr"] for r in log(out) if "lr" in r}
            assert lrs[17] == pytest.approx(train.lr_at(17, 20, peak, 2))
            assert json.load(open(out / "args.json"))["lr_anchor"] is None


# -----------------------------------------------------------------------------
# small things


def test_out_alone_runs_the_demo_there(tmp_path, capsys):
    out = tmp_path / "demo-run"
    assert train.main(["--out", str(out), "--max-steps", "2", "--exact-match", "0", "--eval-every", "0"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("demo: python train.py --ckpt demo/base") and first.endswith(f"--out {out} --max-steps 2 "
                                                                                         "--exact-match 0 --eval-every 0")
    assert os.path.isfile(out / "delta.safetensors")


def test_a_lora_budget_too_large_is_warned_about(tiny, task, tmp_path, capsys):
    argv = ["--ckpt", tiny.hf, "--data", task[0], "--method", "lora", "--max-steps", "1", "--seq-len", "48",
            "--grad-accum", "1", "--eval-every", "0", "--device", "cpu", "--dtype", "float32", "--out",
            str(tmp_path / "l")]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "warning: this budget trains" in out and "pass --lora-rank" in out, out
    assert train.main(argv[:-1] + [str(tmp_path / "l4"), "--lora-rank", "1"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_the_reselection_line_says_why_the_rest_stayed(tiny, task, tmp_path, capsys):
    assert train_run(tiny, task, tmp_path / "r", "--max-steps", "3") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "reselection replaced" in x)
    assert "scheduled" not in line
    record = next(r for r in log(tmp_path / "r") if r.get("event") == "reselect")
    if record["due"] > record["changed"]:
        assert f"; {record['due']:,} were due (the schedule's rate at this step: 100.0%), " \
               f"{record['due'] - record['changed']:,} of them stayed (chosen again" in line, line


def test_a_seq_len_past_the_model_is_clamped_before_the_data_loads(tiny, task, tmp_path, capsys):
    assert train_run(tiny, task, tmp_path / "s", "--max-steps", "1", "--seq-len", "2048") == 0
    out = capsys.readouterr().out
    assert "note: --seq-len 2048 is more than this model's 128 positions: using 128" in out
    assert out.index("note: --seq-len") < out.index("data:")
    assert json.load(open(tmp_path / "s" / "args.json"))["seq_len"] == 128


# -----------------------------------------------------------------------------
# across processes: a killed run resumed, and two torchrun processes (slow tier)


@pytest.mark.slow
def test_random_regrowth_survives_a_kill_and_matches_across_two_processes(tiny, task, tmp_path):
    common = ["--ckpt", tiny.hf, "--data", task[0], "--val-data", task[1], "--method", "spiel-ag", "--lr", "3e-2",
              *TRAIN_ARGS, "--regrow", "random", "--max-steps", "12", "--batch-size", "2", "--lora-dropout", "0",
              "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert train.main(common + ["--out", str(tmp_path / "one"), "--grad-accum", "2"]) == 0
    # killed (SIGKILL: no goodbye) after its step-6 checkpoint, then resumed
    p = popen([sys.executable, os.path.join(ROOT, "train.py"), *common, "--grad-accum", "2", "--save-every", "3",
               "--out", str(tmp_path / "killed")], env=env)

    def saved_6():
        try:
            return torch.load(tmp_path / "killed" / "state.pt", weights_only=True)["step"] >= 6
        except Exception:
            return False
    wait_until(p, saved_6, "its step-6 checkpoint")
    os.kill(p.pid, signal.SIGKILL)
    communicate(p)
    assert train.main(["--out", str(tmp_path / "killed"), "--resume"]) == 0
    assert equal(tensors(tmp_path / "one")[0], tensors(tmp_path / "killed")[0])
    # 2 processes x grad-accum 1 == 1 process x 2: the same random positions on both, the same deltas
    runner = tmp_path / "runner.py"
    runner.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nimport train\ntrain.cli(sys.argv[1:])\n")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    p = run_watched([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     str(runner), *common, "--grad-accum", "1", "--out", str(tmp_path / "two")], cwd=ROOT, env=env)
    assert p.returncode == 0, ranks_said(p)
    one, two = tensors(tmp_path / "one")[0], tensors(tmp_path / "two")[0]
    for k in one:  # (packed, two processes split a step's rows among them: other sums, other rounding)
        if k.endswith(".indices"):
            assert torch.equal(one[k], two[k]), k
        else:
            torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)


def test_a_peft_q_v_adapter_gives_peft_logits_here_and_goes_back(tiny, tmp_path):
    """where transformers and peft are installed: an adapter PEFT trained with target_modules ["q_proj", "v_proj"]
    gives PEFT's logits here, applied and merged; exported back (convert.py --to peft) PEFT loads it with those
    target_modules and the same logits."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    ref, x = train_peft_adapter(tiny, tmp_path / "adapter", peft, transformers, target_modules=["q_proj", "v_proj"])
    ours = load_model(tiny.hf, dtype=torch.float32)
    ft = finetune.load(ours, str(tmp_path / "adapter"), finetune.base_of(ours, tiny.hf))
    assert {n.rpartition(".")[2] for n in ft.shapes} == {"wq", "wv"}
    merge.main(["--ckpt", tiny.hf, "--delta", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")])
    convert.convert(str(tmp_path / "adapter"), "spiel", str(tmp_path / "ours.safetensors"), tiny.hf)
    convert.convert(str(tmp_path / "ours.safetensors"), "peft", str(tmp_path / "back"), tiny.hf)
    assert json.load(open(tmp_path / "back" / "adapter_config.json"))["target_modules"] == ["q_proj", "v_proj"]
    back = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        tiny.hf, dtype=torch.float32), str(tmp_path / "back")).eval()
    with torch.no_grad():
        want = ref(input_ids=x).logits
        for got in (ours(x)[0], load_model(str(tmp_path / "m"), dtype=torch.float32)(x)[0], back(input_ids=x).logits):
            assert (got - want).abs().max() < 1e-4
        assert (want - load_model(tiny.hf, dtype=torch.float32)(x)[0]).abs().max() > 1e-2
