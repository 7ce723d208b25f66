"""Chat templates: render a model's own Jinja chat template the way Hugging Face `transformers` does.

A chat model ships its prompt format as a Jinja template (`chat_template` in `tokenizer_config.json`,
or `chat_template.jinja`). Training on, or sampling from, such a model needs the exact same text, so
this module reproduces `transformers`' rendering environment rather than inventing its own:

  - `jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
    `loopcontrols` extension (`{% break %}`, `{% continue %}`): templates come from the Hub and are
    untrusted code, and the whitespace flags change the output;
  - globals `raise_exception(msg)` (raises `ChatTemplateError`), `strftime_now(fmt)`, `dict(...)` and a
    `namespace(...)` that refuses underscore-prefixed names (no reaching CPython internals);
  - a `tojson` filter that does not HTML-escape and keeps non-ASCII text (`ensure_ascii=False`);
  - `{% generation %}...{% endgeneration %}` (used by templates that mark assistant tokens) renders its
    body unchanged;
  - the variables: `messages`, `add_generation_prompt`, `tools`, `documents` (None when not given,
    so `tools is none` works), the tokenizer's named special tokens (`bos_token`, `eos_token`, ...)
    and any extra keyword arguments, which override the special tokens;
  - the messages as `transformers` normalises them: keys whose value is None are dropped, and a
    reasoning text given as `reasoning_content`, `thinking` or `reasoning` is visible under both
    `reasoning_content` and `thinking`; every value the template sees is rebuilt from plain JSON
    types (str, int, float, bool, None, list, dict).

The code is written from that description; `tests/test_hf_tokenizer.py` checks it against
outputs recorded from `transformers.AutoTokenizer.apply_chat_template`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

__all__ = ["ChatTemplateError", "compile_chat_template", "render_chat_template", "validate_messages"]

# Older jinja2 releases have known sandbox escapes; chat templates are untrusted code.
_MIN_JINJA = (3, 1, 6)
# Names under which a message's reasoning text travels; templates read the first, gpt-oss reads `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template is missing, fails to compile, or raised while rendering (e.g. via `raise_exception`)."""


def _jinja():
    """The jinja2 package, checked for a version without the known sandbox escapes."""
    try:
        import jinja2
    except ImportError as e:  # pragma: no cover - jinja2 is a declared dependency
        raise ImportError("chat templates need the 'jinja2' package: pip install 'jinja2>=3.1.6'") from e
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < _MIN_JINJA:
        raise ImportError(f"chat templates need jinja2>=3.1.6 (older versions have sandbox escapes), "
                          f"found {jinja2.__version__}")
    return jinja2


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str):
    """Jinja source -> a compiled `jinja2.Template` in the transformers-compatible sandbox.

    Cached, because a training loop renders thousands of chats with the same template.
    Raises ChatTemplateError with the line number when the source does not parse.
    """
    jinja2 = _jinja()
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # `{% generation %}` only marks where assistant text sits; the text itself is rendered as is.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own `tojson` HTML-escapes <, >, & and ' — wrong for prompts.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        # `dict(...)` and `dict.fromkeys(...)` without exposing the `dict` type itself to the sandbox.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Namespaces are mutable inside the sandbox; refusing "_" names keeps dunders out of reach.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (template line {e.lineno})") from e


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON types; anything else becomes the placeholder "<TypeName>".

    Objects that reach the sandbox bring their methods with them (numpy arrays, images, enums);
    rebuilding keeps the template's view inert, as transformers does.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", None) == 0:
        return _plain(value.item())  # numpy scalar: np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _as_dict(message: Any, index: int) -> dict:
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        # rljax.data.adapters.Message and similar typed rows
        return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    if isinstance(message, Mapping):
        return dict(message)
    raise ChatTemplateError(f"message {index} must be a dict with 'role' and 'content', "
                            f"got {type(message).__name__}")


def validate_messages(messages: Sequence[Any]) -> list[dict]:
    """Messages -> plain dicts, normalised as transformers does before rendering.

    Each message is a dict (or a dataclass such as `rljax.data.adapters.Message`) with a non-empty
    string `role` and a `content` (a string, or a list of content blocks); `content` may be absent or
    None only on a message that carries `tool_calls`. Errors name the message's index.
    Keys whose value is None are dropped (templates test for absence, and would print "None").
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatTemplateError("messages is empty: a chat needs at least one message")
    out = []
    for i, raw in enumerate(messages):
        m = _as_dict(raw, i)
        role = m.get("role")
        if role is None:
            raise ChatTemplateError(f"message {i} has no 'role' (keys: {', '.join(map(str, m)) or 'none'})")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"message {i}: 'role' must be a non-empty string, got {role!r}")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise ChatTemplateError(f"message {i} (role {role!r}) has no 'content'")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise ChatTemplateError(f"message {i} (role {role!r}): 'content' must be a string or a list of "
                                    f"content blocks, got {type(content).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            # Same insertion order as transformers: `thinking` first, then the message, then reasoning_content.
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(_plain(m))
    return out


def render_chat_template(source: str, messages: Sequence[Any], *, add_generation_prompt: bool = False,
                         special_tokens: Mapping[str, str] | None = None, tools: Sequence[Mapping] | None = None,
                         documents: Sequence[Mapping] | None = None, **kwargs: Any) -> str:
    """Render the chat template `source` on `messages` -> the prompt text.

    special_tokens: the tokenizer's named special tokens ({"bos_token": "<s>", ...}), visible to the
    template as variables; `kwargs` are more variables and override them (e.g. `enable_thinking=False`).
    tools / documents: JSON-schema dicts / {"title", "text"} dicts for templates that support them.
    Raises ChatTemplateError for bad messages (naming the index), a template that does not compile,
    or one that raises while rendering (e.g. `raise_exception("roles must alternate")`).
    """
    jinja2 = _jinja()
    chat = validate_messages(messages)
    for name, value in (("tools", tools), ("documents", documents)):
        if value is not None and (isinstance(value, (str, Mapping)) or not isinstance(value, Sequence)
                                  or not all(isinstance(v, Mapping) for v in value)):
            raise ChatTemplateError(f"{name} must be a list of dicts, got {type(value).__name__}")
    variables = _plain({**(special_tokens or {}), **kwargs})
    template = compile_chat_template(source)
    try:
        return template.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                               add_generation_prompt=bool(add_generation_prompt), **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template raised: {e}") from e
