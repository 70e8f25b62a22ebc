"""chat.py: the checkpoint's own chat template (Llama 3's, Qwen2's) gives transformers' apply_chat_template ids, the
loss covers exactly the assistant turns as the template renders them, and generation starts from the prefix
training conditioned on; the Tulu template where a model has none; refusals in one line."""

import json
import sys

import pytest

import chat
import data
import tokenizer
from conftest import LLAMA3_TEMPLATE

pytest.importorskip("jinja2")

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy the cat"},
                {"role": "assistant", "content": "the cat"}, {"role": "user", "content": "and a dog"},
                {"role": "assistant", "content": "a dog"}]
END = {"llama3.1": "<|eot_id|>", "qwen2.5": "<|im_end|>\n"}  # what each template closes an assistant turn with


def labelled_spans(ids, labels):
    """the runs of consecutive labelled ids."""
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab:
            cur.append(i)
        elif cur:
            spans, cur = spans + [cur], []
    return spans + [cur] * bool(cur)


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5"])
def test_the_model_template_gives_transformers_ids_and_masks_exactly_the_assistant_turns(name, family):
    transformers = pytest.importorskip("transformers")
    path = family(name)
    tok, ref = tokenizer.load(path), transformers.AutoTokenizer.from_pretrained(path)
    template = chat.template(tok)  # the checkpoint has one: it is the default
    assert template.name == "model"
    system, turns = data.to_turns({"messages": CONVERSATION})
    ids, labels = data.encode_pieces(tok, template.pieces(system, turns))
    assert ids == ref.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    # the labelled tokens are each assistant turn's content and the template's end of that turn, nothing else
    spans = labelled_spans(ids, labels)
    assert [tok.tk.decode(s, skip_special_tokens=False) for s in spans] == [a + END[name] for _, a, _ in turns]
    # generation starts from what training conditioned the first answer on: transformers' generation prompt
    prompt = data.prompt_ids(tok, template, turns[0][0], system)
    assert prompt == ref.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids[:len(prompt)] == prompt and labels[len(prompt)] and not any(labels[:len(prompt)])
    # a turn with "weight": 0 is context: the same ids, that turn unlabelled
    weighted = [dict(m, weight=0) if m["content"] == "the cat" else m for m in CONVERSATION]
    ids0, labels0 = data.encode_pieces(tok, template.pieces(*data.to_turns({"messages": weighted})))
    assert ids0 == ids and labelled_spans(ids0, labels0) == spans[1:]


def test_generate_chat_renders_the_same_prefix(family, capsys, monkeypatch):
    import generate
    path = family("qwen2.5")
    seen = []
    monkeypatch.setattr(generate, "generate", lambda model, ids, *a, **k: seen.append(ids) or [])
    generate.main(["--ckpt", path, "--chat", "--system", "be brief", "--prompt", "copy the cat"])
    tok = tokenizer.load(path)
    assert seen == [data.prompt_ids(tok, chat.template(tok), "copy the cat", "be brief")]
    assert tok.tk.decode(seen[0], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    generate.main(["--ckpt", path, "--chat", "--template", "tulu", "--prompt", "copy the cat"])
    assert tok.tk.decode(seen[1]).endswith("<|assistant|>\n")


def test_train_uses_the_model_template_by_default_and_tulu_where_there_is_none(tiny, task, family, tmp_path, capsys):
    from conftest import train_run
    assert train_run(tiny, task, tmp_path / "a", "--ckpt", family("qwen2.5"), "--max-steps", "1", "--seq-len", "160") == 0
    assert "chat template: model" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "args.json").read_text())["template"] == "model"
    assert train_run(tiny, task, tmp_path / "b", "--max-steps", "1") == 0  # the tiny LLaMA 2: no template
    assert "chat template: tulu" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--template model: .*tokenizer.model comes with no chat template"):
        train_run(tiny, task, tmp_path / "c", "--max-steps", "1", "--template", "model")
    assert not (tmp_path / "c").exists()


def test_template_refusals(family, monkeypatch):
    tok = tokenizer.load(family("llama3.1"))
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(ValueError, match="--template model needs jinja2 .*pip install jinja2"):
        chat.template(tok)
    monkeypatch.undo()
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ValueError, match="the chat template refuses this conversation: Conversation roles must"):
        chat.template(tok).pieces(None, [("hi", "ho", True)])
    # a template that drops earlier answers once the conversation goes on: the answers cannot be told apart
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' or loop.last %}{{ m['content'] }}|"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(ValueError, match="renders the start of a conversation differently"):
        chat.template(tok).pieces(None, [("a", "b", True), ("c", "d", True)])
    tok.chat_template = "{{ messages.append(1) }}"  # an immutable sandbox: no changing the conversation
    with pytest.raises(ValueError, match="the chat template fails on this conversation .SecurityError"):
        chat.template(tok).pieces(None, [("a", "b", True)])
    tok.chat_template = "{% for m in messages %}"
    with pytest.raises(ValueError, match="tokenizer.json: its chat template is not a Jinja2 template"):
        chat.template(tok)
    tok.chat_template = LLAMA3_TEMPLATE
    assert chat.template(tok).pieces(None, [("a", "b", True)])[1] == ("b<|eot_id|>", True)


def test_a_sentencepiece_model_reads_its_control_pieces_in_a_template(tiny):
    tok = tokenizer.load(tiny.hf)
    assert tok.encode("<s>[INST] hi [/INST] ho</s>", bos=False)[0] == tok.bos_id
    assert tok.encode("<s>[INST] hi [/INST] ho</s>", bos=False)[-1] == tok.eos_id
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}" \
                        "{{ eos_token }}{% endif %}{% endfor %}"
    ids, labels = data.encode_pieces(tok, chat.template(tok).pieces(None, [("the cat", "a dog", True)]))
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and labels[-1] and not labels[0]
