"""Chat examples as the trainer sees them: the tokenizer's chat template rendered the way transformers renders
it (jinja2's immutable sandbox, trim_blocks and lstrip_blocks, loop controls, the `generation` tag, the
`raise_exception`, `strftime_now` and `tojson` helpers, the special tokens as variables), so that a plan counts
the template's tokens too. jinja2 is imported only when a chat dataset is counted with a local tokenizer."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Callable

from ftplan.errors import PlannerError

SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _template(folder: Path, config: dict) -> str | None:
    """The default chat template: chat_template.jinja (transformers' file), else tokenizer_config.json's."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses the one named "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def _special_tokens(config: dict) -> dict[str, str]:
    tokens = {}
    for name in SPECIAL:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[name] = value
    return tokens


NO_JINJA = "no jinja2"  # renderer()'s answer when there is a template but nothing to render it with


def renderer(tokenizer_json: Path) -> Callable[[list[dict]], str] | str | None:
    """messages -> the text the hf backend tokenizes for them (apply_chat_template, no generation prompt);
    None when the tokenizer has no chat template, NO_JINJA when jinja2 is not installed."""
    folder = tokenizer_json.parent
    config_file = folder / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (OSError, ValueError):
        config = {}
    source = _template(folder, config if isinstance(config, dict) else {})
    if source is None:
        return None
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return NO_JINJA

    class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %} renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        template = env.from_string(source)
    except jinja2.TemplateError as exc:
        raise PlannerError(f"the chat template beside {tokenizer_json} does not parse: {exc}") from None
    tokens = _special_tokens(config if isinstance(config, dict) else {})

    def render(messages: list[dict]) -> str:
        try:
            return template.render(messages=messages, tools=None, documents=None, add_generation_prompt=False,
                                   **tokens)
        except jinja2.TemplateError as exc:
            raise PlannerError(f"the chat template beside {tokenizer_json} refuses an example: {exc}") from None

    return render
