"""Chat templates found, chosen and rendered as transformers does (``apply_chat_template``).

Where a checkpoint's template comes from (transformers 5's ``from_pretrained``): the files
``chat_template.jinja`` (the "default" template) and ``additional_chat_templates/NAME.jinja``, if
any exist, replace whatever ``tokenizer_config.json`` holds under ``chat_template`` (a string, or
a list of ``{"name", "template"}``). Several templates form a dict; rendering picks ``tool_use``
when tools are passed and it exists, else ``default``.

How it renders: Jinja's sandbox with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension (``{% break %}``, ``{% continue %}``), a no-op ``{% generation %}`` block, the filter
``tojson`` (``json.dumps`` with ``ensure_ascii=False`` and the ``indent`` / ``separators`` /
``sort_keys`` options, no HTML escaping), the globals ``raise_exception(msg)``,
``strftime_now(fmt)``, ``dict`` and ``namespace`` (no underscore attributes). The variables are
``messages`` (keys whose value is null dropped; reasoning under ``reasoning_content``, ``thinking``
or ``reasoning`` copied to the first two), ``tools`` (None when not given), ``documents`` (None),
``add_generation_prompt``, the named special tokens of ``tokenizer_config.json`` (``bos_token``,
``eos_token``, ``unk_token``, ``sep_token``, ``pad_token``, ``cls_token``, ``mask_token`` and the
names of its ``extra_special_tokens`` mapping), and any extra variables, which override those.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minimax_jax import files

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)  # fmt: skip
# Names apply_chat_template passes itself: an extra variable may not take them.
RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_PARTS_RE = re.compile(r"""content['"]?\]?\s*\[\s*0\s*\]""")

Templates = str | dict[str, str]


def load(path: Path, config: Mapping[str, Any]) -> Templates | None:
    """The template(s) of checkpoint directory ``path`` whose tokenizer_config is ``config``."""
    found: dict[str, str] = {}
    if (path / TEMPLATE_FILE).exists():
        found["default"] = files.read_text(path / TEMPLATE_FILE, "a Jinja chat template")
    if (path / TEMPLATE_DIR).is_dir():
        for f in sorted((path / TEMPLATE_DIR).glob("*.jinja")):
            found[f.name.removesuffix(".jinja")] = files.read_text(f, "a Jinja chat template")
    if found:
        return found["default"] if list(found) == ["default"] else found
    return from_config(config, f"{path / 'tokenizer_config.json'}: chat_template")


def from_config(
    config: Mapping[str, Any], where: str = "tokenizer_config.json"
) -> Templates | None:
    """The ``chat_template`` of a tokenizer_config: a string, or a list of ``{"name",
    "template"}`` (or a name -> template mapping) as a dict."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        if not all(
            isinstance(t, dict) and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str) for t in value
        ):  # fmt: skip
            raise files.InputFileError(
                f'{where}: a list must hold {{"name": str, "template": str}} objects'
            )
        return {t["name"]: t["template"] for t in value}
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return dict(value)
    raise files.InputFileError(
        f'{where}: expected a string or a list of {{"name", "template"}}, got '
        f"{type(value).__name__}"
    )


def select(templates: Templates, *, tools: list | None) -> str:
    """One template: a string as is; of several, ``tool_use`` when tools are given (and it
    exists), else ``default``."""
    if isinstance(templates, str):
        return templates
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ValueError(
        f"the checkpoint has several chat templates ({', '.join(sorted(templates))}) and no "
        "default: pass one with --chat_template FILE"
    )


def reads_parts(template: str) -> bool:
    """Whether the template reads message content as a list of parts (``content[0]``, as
    MiniMax's templates do) rather than as a string."""
    return _PARTS_RE.search(template) is not None


def special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens of a tokenizer_config (strings or serialised AddedTokens)."""
    named = {k: config.get(k) for k in SPECIAL_TOKENS}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        named.update(extra)
    out = {}
    for name, value in named.items():
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def render(
    template: str,
    messages: list[dict],
    *,
    tools: list | None = None,
    add_generation_prompt: bool = True,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """The rendered conversation. ``variables``: special tokens and extra variables (never
    one of ``RESERVED``). A template error (``raise_exception`` too) is a ValueError."""
    bad = RESERVED & set(variables or {})
    if bad:
        raise ValueError(f"template variables {sorted(bad)} are set by the chat itself")
    chat = [_aliased({k: v for k, v in m.items() if v is not None}) for m in messages]
    try:
        compiled = _compile(template)
        return compiled.render(
            messages=chat,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **(variables or {}),
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed to render: {e}") from e


def _aliased(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it):
    renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without the type itself (its attributes)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace refusing underscore attributes (no way to CPython internals)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick: namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not set the underscore attribute {name!r} on a namespace"
            )


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_Dict(),
        namespace=_Namespace,
    )
    return env.from_string(template)
