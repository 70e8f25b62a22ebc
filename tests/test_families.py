"""The LLaMA family (Llama 3.x, Mistral, Qwen2.5, CodeLlama, YaRN): each tiny checkpoint (conftest.FAMILIES, as the
Hub ships them) gives transformers' logits and greedy tokens, in both config styles; its tokenizer gives
transformers' ids; every config field the loader does not implement is refused by name before a weight is read.
The transformers checks run where it is installed (pip install -r requirements-test.txt), and are skipped otherwise."""

import json
import os
import shutil

import pytest
import torch

import tokenizer
from conftest import FAMILIES, LLAMA3_SPECIAL, QWEN_SPECIAL, TINY, random_state_dict, train_run, write_meta
from files import CheckpointError
from generate import generate
from llama import ModelArgs, load_model, read_args

ALL = ["llama2", *FAMILIES]
LONG = ["--seq-len", "160"]  # the families' own chat templates (and their tiny BPE) take more tokens than Tulu


def folder_of(name, tiny, family):
    return tiny.hf if name == "llama2" else family(name)


def reference(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids(seed, T, vocab=256, B=2):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# each family: transformers' logits, in the Hub's config style and as transformers 5 saves it


@pytest.mark.parametrize("name", ALL)
def test_logits_equal_transformers_in_both_config_styles(name, tiny, family, tmp_path):
    path = folder_of(name, tiny, family)
    ref = reference(path)
    x = ids(0, 48)  # past Mistral's window of 16
    ours = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        want = ref(x).logits
        assert (ours(x)[0] - want).abs().max() < 1e-4
        ref.save_pretrained(tmp_path / "v5")  # transformers 5's config: rope_parameters, no top-level rope_theta
        saved = json.loads((tmp_path / "v5" / "config.json").read_text())
        assert "rope_parameters" in saved and "rope_theta" not in saved and "rope_scaling" not in saved
        assert (load_model(str(tmp_path / "v5"), dtype=torch.float32)(x)[0] - want).abs().max() < 1e-4


def test_llama3_scaling_matters_at_2048_tokens_and_is_exact(tiny, family):
    path = family("llama3.1")
    ref, ours = reference(path), load_model(path, dtype=torch.float32)
    x = ids(1, 2048, B=1)
    with torch.no_grad():
        want = ref(x).logits
        assert (ours(x)[0] - want).abs().max() < 1e-4
        ours.args.rope_scaling = None  # unscaled, as the loader used to read it: far off
        ours.reset_rope()
        assert (ours(x)[0] - want).abs().max() > 100 * 1e-4


@pytest.mark.parametrize("name", ALL)
def test_greedy_decoding_equals_transformers(name, tiny, family):
    path = folder_of(name, tiny, family)
    ref, ours = reference(path), load_model(path, dtype=torch.float32)
    prompt = ids(2, 6, B=1)
    with torch.no_grad():  # 40 new tokens: past Mistral's window, through the KV cache
        want = ref.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)[0, 6:].tolist()
    assert generate(ours, prompt[0].tolist(), 40, temperature=0) == want


@pytest.mark.parametrize("style", ["llama3.1", "qwen2.5"])
def test_tokenizer_json_gives_transformers_ids_on_text_with_special_tokens(style, family):
    transformers = pytest.importorskip("transformers")
    path = family(style)
    ours, ref = tokenizer.load(path), transformers.AutoTokenizer.from_pretrained(path)
    special = LLAMA3_SPECIAL if style.startswith("llama") else QWEN_SPECIAL
    texts = ["the cat sat on the mat", f"{special[-3]}user{special[-2]}\n\nhello world{special[-1]}",
             f"  red  green\n\nblue{special[1]} one two", "Ünïcödé ✓ 123456 +-=<>", ""]
    for text in texts:
        assert ours.encode(text) == ref(text).input_ids, text
        assert ours.encode(text, bos=False) == ref(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text).input_ids, skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.n_words == len(ref)


def test_special_tokens_bos_eos_and_stops(family, tiny):
    llama3, qwen, sp = tokenizer.load(family("llama3.1")), tokenizer.load(family("qwen2.5")), tokenizer.load(tiny.hf)
    assert (llama3.bos_token, llama3.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert llama3.stop_ids == {295, 298, 299}  # <|end_of_text|>, <|eom_id|>, <|eot_id|> (generation_config.json)
    assert llama3.encode("hi")[0] == llama3.bos_id and llama3.chat_template.startswith("{% set loop_messages")
    assert qwen.bos_id is None and qwen.encode("hi") == qwen.encode("hi", bos=False)  # Qwen: no BOS
    assert qwen.eos_token == "<|im_end|>" and qwen.stop_ids == {qwen.eos_id} and qwen.unk_id is None
    assert (sp.bos_id, sp.eos_id, sp.stop_ids, sp.chat_template) == (1, 2, {2}, None)


# -----------------------------------------------------------------------------
# refused by name, before any weight is read


def config_with(tiny, tmp_path, **fields):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny.hf, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update({k: v for k, v in fields.items() if v is not None})
    for k in [k for k, v in fields.items() if v is None]:
        cfg.pop(k, None)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


REFUSED = {  # config.json fields -> what the one line says
    "gemma": ({"model_type": "gemma"}, 'model_type "gemma" is not implemented'),
    "no model_type": ({"model_type": None}, "model_type null is not implemented"),
    "dynamic rope": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, 'rope_type "dynamic" is not implemented'),
    "longrope": ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0]}},
                 'rope_parameters: rope_type "longrope" is not implemented'),
    "llama3 incomplete": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                          "low_freq_factor is missing for rope_type llama3"),
    "unknown yarn field": ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "sharpness": 3}},
                           "sharpness is not implemented for rope_type yarn"),
    "partial rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    "head_dim": ({"head_dim": 32}, "head_dim 32: only hidden_size / num_attention_heads (16)"),
    "gelu": ({"hidden_act": "gelu"}, 'hidden_act "gelu"'),
    "attention dropout": ({"attention_dropout": 0.1}, "attention_dropout 0.1"),
    "mlp bias": ({"mlp_bias": True}, "mlp_bias true"),
    "gptq": ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    "qwen window": ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window true"),
    "qwen layer types": ({"model_type": "qwen2", "layer_types": ["full_attention", "sliding_attention"]},
                         "layer_types"),
    "no hidden_size": ({"hidden_size": None}, "missing field 'hidden_size'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_config_field_the_loader_does_not_implement_is_refused_by_name(case, tiny, tmp_path, monkeypatch):
    fields, message = REFUSED[case]
    path = config_with(tiny, tmp_path, **fields)
    import safetensors
    monkeypatch.setattr(safetensors, "safe_open", None)  # before any weight is read
    for read in (lambda: read_args(path, "hf"), lambda: load_model(path)):
        with pytest.raises(CheckpointError, match="config.json: .*" if case == "no hidden_size" else None) as e:
            read()
        assert str(e.value).startswith(os.path.join(path, "config.json") + ": ") and message in str(e.value)


def test_a_bias_or_head_the_config_does_not_declare_is_an_unexpected_key(tiny, family, tmp_path):
    qwen_as_llama = tmp_path / "qwen"  # Qwen2's q/k/v biases under model_type llama: the keys say so
    shutil.copytree(family("qwen2.5-7b"), qwen_as_llama)
    cfg = json.loads((qwen_as_llama / "config.json").read_text())
    (qwen_as_llama / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"unexpected key layers\.0\.attention\.w[qkv]\.bias"):
        load_model(str(qwen_as_llama))
    tied_with_head = config_with(tiny, tmp_path, tie_word_embeddings=True)  # the file still has lm_head.weight
    with pytest.raises(CheckpointError, match="unexpected key output.weight .tie_word_embeddings is true"):
        load_model(tied_with_head)


def test_meta_llama3_layouts_are_refused_by_name(tiny, tmp_path):
    args = ModelArgs(**TINY)
    meta = write_meta(random_state_dict(args), args, str(tmp_path / "original"))
    params = json.loads(open(os.path.join(meta, "params.json")).read())
    with open(os.path.join(meta, "params.json"), "w") as f:
        json.dump(params | {"rope_theta": 500000.0, "use_scaled_rope": True}, f)
    with pytest.raises(CheckpointError, match="params.json: use_scaled_rope true: Meta's Llama 3.1.* Hugging Face"):
        load_model(meta)
    with open(os.path.join(meta, "params.json"), "w") as f:
        json.dump(params | {"moe_args": {"num_experts": 16}}, f)
    with pytest.raises(CheckpointError, match=r"params.json: field moe_args \(\{\"num_experts\": 16\}\) is not"):
        load_model(meta)
    with open(os.path.join(meta, "params.json"), "w") as f:
        json.dump(params | {"rope_theta": 500000.0, "use_scaled_rope": False}, f)
    assert read_args(meta, "meta").rope_theta == 500000.0  # Llama 3's params.json reads; its tokenizer does not:
    with open(os.path.join(meta, "tokenizer.model"), "w") as f:
        f.write("IQ== 0\nIg== 1\n")  # tiktoken: a base64 token and its rank per line
    with pytest.raises(CheckpointError, match="tokenizer.model: a tiktoken file .Meta's Llama 3 layout"):
        tokenizer.load(meta)


def test_hub_style_config_fields_read_as_transformers_reads_them(tiny, tmp_path):
    # the defaults transformers takes where a config leaves a field out
    mistral = read_args(config_with(tiny, tmp_path, model_type="mistral", rms_norm_eps=None), "hf")
    assert (mistral.sliding_window, mistral.norm_eps) == (4096, 1e-6)
    shutil.rmtree(tmp_path / "ckpt")
    qwen = read_args(config_with(tiny, tmp_path, model_type="qwen2", sliding_window=4096), "hf")
    assert qwen.sliding_window is None and qwen.bias == ("wq", "wk", "wv")  # (use_sliding_window false)
    shutil.rmtree(tmp_path / "ckpt")
    # a top-level original_max_position_embeddings wins over the rope's own, as in transformers
    old = read_args(config_with(tiny, tmp_path, original_max_position_embeddings=64, rope_scaling={
        "type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}), "hf")
    assert old.rope_scaling == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}


# -----------------------------------------------------------------------------
# downstream: train, sample, merge, convert on the families


@pytest.mark.parametrize("name,extra,config", [
    ("qwen2.5", ["--quantize", "int8", "--dtype", "bfloat16"], ("qwen2", True, 1e6)),
    ("llama3.1", [], ("llama", False, 500000.0))])
def test_train_generate_merge_then_transformers_gives_our_logits(name, extra, config, tiny, task, family, tmp_path,
                                                                  capsys):
    """Qwen2.5 (q/k/v biases on an int8 base, tied embeddings, no BOS) and Llama 3.1 (llama3 rope scaling, GQA,
    tokenizer.json): SpIEL-AG trains; generate.py samples with the delta; merge.py writes the source config and
    copies every tokenizer file; transformers loads the merged folder and gives the logits of our base with the
    delta applied, and generate.py's greedy tokens."""
    import finetune
    import generate as gen
    import merge
    path = family(name)
    assert train_run(tiny, task, tmp_path / "run", "--ckpt", path, "--max-steps", "3", *LONG, *extra) == 0
    delta = str(tmp_path / "run" / "delta.safetensors")
    capsys.readouterr()
    gen.main(["--ckpt", path, "--delta", delta, "--prompt", "copy the cat", "--temperature", "0",
              "--max-new-tokens", "6"])
    sampled = capsys.readouterr().out
    merge.main(["--ckpt", path, "--delta", delta, "--out", str(tmp_path / "merged")])
    capsys.readouterr()
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    theta = read_args(str(tmp_path / "merged"), "hf").rope_theta
    assert (cfg["model_type"], cfg["tie_word_embeddings"], theta) == config
    assert len(cfg["spiel_merged"]) == 1
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(path, name)):
            assert (tmp_path / "merged" / name).read_bytes() == open(os.path.join(path, name), "rb").read()
    merged = load_model(str(tmp_path / "merged"), dtype=torch.float32)
    tuned = load_model(path, dtype=torch.float32)
    finetune.load(tuned, delta, finetune.base_of(tuned, path))
    x = ids(3, 20)
    with torch.no_grad():
        assert not torch.allclose(merged(x)[0], load_model(path, dtype=torch.float32)(x)[0])
        if "--quantize" not in extra:  # merged onto the full-precision base: our delta applied gives the same
            assert (merged(x)[0] - tuned(x)[0]).abs().max() < 1e-4
        pytest.importorskip("transformers")
        ref = reference(str(tmp_path / "merged"))
        assert (merged(x)[0] - ref(x).logits).abs().max() < 1e-4
    gen.main(["--ckpt", str(tmp_path / "merged"), "--prompt", "copy the cat", "--temperature", "0",
              "--max-new-tokens", "6"])
    assert capsys.readouterr().out == sampled  # the merged model samples what the base with its delta sampled


@pytest.mark.parametrize("name,method", [("llama3.1", "lora"), ("mistral", "spiel-ma"), ("llama3.2", "full")])
def test_families_train_with_each_method_and_sample(name, method, tiny, task, family, tmp_path, capsys):
    import generate as gen
    path = family(name)
    assert train_run(tiny, task, tmp_path / "run", "--ckpt", path, "--max-steps", "2", *LONG, method=method) == 0
    out = capsys.readouterr().out
    hint = out[out.index("sample with: python generate.py ") + len("sample with: python generate.py "):].split()
    ft = tmp_path / "run" / ("model" if method == "full" else "lora.safetensors" if method == "lora" else
                             "delta.safetensors")
    gen.main(["--ckpt", str(ft) if method == "full" else path, *([] if method == "full" else ["--delta", str(ft)]),
              "--prompt", "copy the cat", "--chat", "--temperature", "0", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("copy the cat\n") and hint
    if method == "full":  # the export keeps the family's config and tokenizer
        cfg = json.loads((ft / "config.json").read_text())
        assert cfg["tie_word_embeddings"] and cfg["rope_scaling"]["factor"] == 32.0
        assert (ft / "tokenizer.json").exists() and (ft / "generation_config.json").exists()


def test_adapters_travel_for_the_families(tiny, task, family, tmp_path):
    """a LoRA trained on Qwen2.5 (q/k/v biases, GQA) goes to a PEFT folder that PEFT serves on transformers' Qwen2
    with our logits; a SpIEL delta on Llama 3.1 goes to the authors' SFT folder and back unchanged."""
    import convert
    import finetune
    qwen, llama3 = family("qwen2.5-7b"), family("llama3.1")
    assert train_run(tiny, task, tmp_path / "lora", "--ckpt", qwen, "--max-steps", "2", *LONG, method="lora") == 0
    assert train_run(tiny, task, tmp_path / "delta", "--ckpt", llama3, "--max-steps", "2", *LONG) == 0
    delta = str(tmp_path / "delta" / "delta.safetensors")
    convert.main([delta, "--to", "sft", str(tmp_path / "sft"), "--ckpt", llama3])
    convert.main([str(tmp_path / "sft"), "--to", "spiel", str(tmp_path / "back.safetensors"), "--ckpt", llama3])
    a, b = finetune.read(delta), finetune.read(str(tmp_path / "back.safetensors"))
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    lora = str(tmp_path / "lora" / "lora.safetensors")
    convert.main([lora, "--to", "peft", str(tmp_path / "peft"), "--ckpt", qwen])
    peft = pytest.importorskip("peft")
    ref = peft.PeftModel.from_pretrained(reference(qwen), str(tmp_path / "peft")).eval()
    ours = load_model(qwen, dtype=torch.float32)
    x = ids(4, 24)
    with torch.no_grad():
        before = ours(x)[0]
        finetune.load(ours, lora, finetune.base_of(ours, qwen))
        assert (ours(x)[0] - ref(input_ids=x).logits).abs().max() < 1e-4 < (ours(x)[0] - before).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_method_on_every_family(name, tiny, task, family, tmp_path):
    """SpIEL-AG, SpIEL-MA (on an NF4 base: quantized biases), LoRA and full fine-tuning train on each family, and
    each fine-tune applies (generate) and merges (merge.py) on that base."""
    import generate as gen
    import merge
    path = family(name)
    for method, extra in (("spiel-ag", []), ("spiel-ma", ["--quantize", "nf4"]), ("lora", []), ("full", [])):
        out = tmp_path / method
        assert train_run(tiny, task, out, "--ckpt", path, "--max-steps", "3", *LONG, *extra, method=method) == 0, method
        if method == "full":
            assert load_model(str(out / "model")).args == load_model(path).args
            continue
        ft = str(out / ("lora.safetensors" if method == "lora" else "delta.safetensors"))
        gen.main(["--ckpt", path, "--delta", ft, "--prompt", "the cat", "--max-new-tokens", "4"])
        merge.main(["--ckpt", path, "--delta", ft, "--out", str(tmp_path / f"merged-{method}")])
        assert json.loads((tmp_path / f"merged-{method}" / "config.json").read_text())["model_type"] == \
            json.loads(open(os.path.join(path, "config.json")).read())["model_type"]
