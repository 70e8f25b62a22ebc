"""
Chat templates: how a conversation becomes the text a model trains on, and which of its tokens the loss covers.

- "tulu": the template the SpIEL paper fine-tunes with (arXiv 2401.16405, section 4.1), and the default for a
  model without one of its own:  <s><|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}</s><|user|>...
  (BOS once per example, EOS after each answer).
- "model": the checkpoint's own chat template (tokenizer_config.json's chat_template, a Jinja2 string), rendered as
  transformers' apply_chat_template renders it. The loss covers exactly the assistant turns as the template renders
  them: for each assistant message, what the template adds to the conversation before it, rendered with
  add_generation_prompt, once that message is added (its content and its end of turn: <|eot_id|>, <|im_end|>\\n).

A conversation is (system or None, [(user, answer, trained), ...]); `trained` is False for a turn with "weight": 0.
`pieces` gives it as [(text or token ids, is_label)] for data.encode; `prompt` gives what generation starts from for
a first user turn, which is exactly what training conditioned that turn's answer on.
"""


def user_text(user: str, system=None) -> str:
    head = f"<|system|>\n{system}\n" if system is not None else ""
    return f"{head}<|user|>\n{user}\n<|assistant|>\n"


class Tulu:
    name = "tulu"

    def __init__(self, tok):
        self.tok = tok

    def pieces(self, system, turns) -> list:
        out = [(self.tok.encode("", bos=True), False)]  # the BOS, where the model has one (Qwen has none)
        for i, (user, answer, trained) in enumerate(turns):  # each prompt tokenized alone, as generation sees it
            out += [(user_text(user, system if i == 0 else None), False), (answer, trained),
                    ([self.tok.eos_id], trained)]  # the EOS is a label: the model must learn to stop
        return out

    def prompt(self, system, user) -> list:
        return [(self.tok.encode("", bos=True), False), (user_text(user, system), False)]


class ModelTemplate:
    """the checkpoint's Jinja2 chat template, in a sandbox set up as transformers sets up its own (jinja2 is needed
    only here: pip install jinja2)."""
    name = "model"

    def __init__(self, tok):
        try:
            import jinja2
            from jinja2.ext import Extension, loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ValueError("--template model needs jinja2 to render the checkpoint's chat template: pip install "
                             "jinja2 (or --template tulu)") from None
        import datetime
        import json

        class Generation(Extension):  # {% generation %}...{% endgeneration %} (assistant-mask tags) renders its body
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        def raise_exception(message):
            raise ValueError(f"the chat template refuses this conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        self.tok, self.error = tok, jinja2.TemplateError
        try:
            self.template = env.from_string(tok.chat_template)
        except jinja2.TemplateError as e:
            raise ValueError(f"{tok.path}: its chat template is not a Jinja2 template ({e}); use --template tulu") \
                from None

    def render(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.tok.bos_token or "", eos_token=self.tok.eos_token)
        except self.error as e:
            raise ValueError(f"the chat template fails on this conversation ({type(e).__name__}: {e})") from None

    def pieces(self, system, turns) -> list:
        messages, out, done = [{"role": "system", "content": system}] * (system is not None), [], ""
        for user, answer, trained in turns:
            messages.append({"role": "user", "content": user})
            before = self.render(messages, True)
            messages.append({"role": "assistant", "content": answer})
            after = self.render(messages, False)
            if not (before.startswith(done) and after.startswith(before)):
                raise ValueError("the chat template renders the start of a conversation differently once it goes "
                                 "on, so the assistant's tokens cannot be told apart (use --template tulu)")
            out += [(before[len(done):], False), (after[len(before):], trained)]
            done = after
        return out

    def prompt(self, system, user) -> list:
        messages = [{"role": "system", "content": system}] * (system is not None) + [{"role": "user", "content": user}]
        return [(self.render(messages, True), False)]


def template(tok, choice=None):
    """the chat template a run uses: "model" (the checkpoint's own), "tulu", or None for the default: the model's
    own where its checkpoint has one, else tulu."""
    if choice is None:
        choice = "model" if tok.chat_template else "tulu"
    if choice == "model" and not tok.chat_template:
        raise ValueError(f"--template model: {tok.path} comes with no chat template (tokenizer_config.json has no "
                         f"chat_template); use --template tulu")
    return ModelTemplate(tok) if choice == "model" else Tulu(tok)
