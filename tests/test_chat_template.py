"""Chat templates: found, chosen and rendered as transformers' ``apply_chat_template`` does (the
real MiniMax-M1 template with tools, a tool call and a tool result; chat_template.jinja and named
templates; transformers' Jinja environment and variables)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_generate_cli import train_tokenizer
from tokenizers import Tokenizer

from minimax_jax.files import InputFileError
from minimax_jax.inference import chat_template
from minimax_jax.inference.tokenizer import ChatTokenizer
from minimax_jax.training.tokenizer_train import CHAT_TEMPLATE_SOURCE

M1_CONFIG = Path(CHAT_TEMPLATE_SOURCE)  # the released M1 tokenizer_config.json, package data
TOOLS = [
    {
        "name": "get_weather",
        "description": "Météo d'une ville, e.g. 東京 <b>&</b>",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
    {"name": "get_time", "description": "Now.", "parameters": {"type": "object", "properties": {}}},
]
CALL = '{"name": "get_weather", "arguments": {"city": "東京"}}'
M1_CHAT = [
    {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Tokyo?"}]},
    {
        "role": "assistant",
        "content": [
            {
                "type": "text",
                "text": f"<think>\nI need the tool.\n</think>\n<tool_calls>\n{CALL}\n</tool_calls>",
            },
        ],
    },  # fmt: skip
    {
        "role": "tool",
        "content": [
            {"type": "text", "name": "get_weather", "text": '{"temp": 25, "sky": "晴れ"}'},
            {"type": "text", "name": "get_time", "text": "12:00"},
        ],
    },
]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(512).save(str(path))
    return path


def _checkpoint(root: Path, tokenizer_json: Path, config: dict, jinja: dict[str, str]) -> Path:
    """A tokenizer directory: tokenizer.json, tokenizer_config.json and template files."""
    root.mkdir()
    shutil.copy(tokenizer_json, root / "tokenizer.json")
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in jinja.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    return root


def _transformers(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.torch
@pytest.mark.parametrize("with_tools", [True, False])
def test_m1_template_renders_as_transformers(tmp_path, tokenizer_json, with_tools):
    """The released M1 template: system message, tools, an assistant tool call, two tool
    results, and the generation prompt, character for character as transformers renders it."""
    config = json.loads(M1_CONFIG.read_text())
    ckpt = _checkpoint(tmp_path / "m1", tokenizer_json, config, {})
    tools = TOOLS if with_tools else None
    want = _transformers(ckpt).apply_chat_template(
        M1_CHAT, tools=tools, tokenize=False, add_generation_prompt=True
    )
    got = ChatTokenizer.from_dir(ckpt).render_chat(M1_CHAT, tools=tools)
    assert got == want
    # hand-checked anchors: tools as JSON lines (no ASCII escaping, no HTML escaping)
    tool_line = json.dumps(TOOLS[0], ensure_ascii=False)
    assert (f"<tools>\n{tool_line}\n" in got) == with_tools
    assert "tool name: get_weather\ntool result: " in got and got.endswith("ai name=assistant\n")


FEATURES = """{{ bos_token }}{% set ns = namespace(n=0) %}
{%- for m in messages %}
  {%- if m.role == 'skip' %}{% continue %}{% endif %}
  {%- if m.role == 'stop' %}{% break %}{% endif %}
  {%- set ns.n = ns.n + 1 %}
  {{- m.role }}:{{ m.content }}{% if m.tool_calls is defined %}[calls]{% endif %}
  {%- if m.reasoning_content is defined %}<r>{{ m.reasoning_content }}|{{
    m.thinking }}</r>{% endif %}
  {% generation %}{{ eos_token }}{% endgeneration %}
{% endfor %}
{{- ns.n }} {{ tools | tojson(indent=2, sort_keys=True) }} {{
  tools | tojson(separators=(',', ':')) }}
{{- dict(a=1) | tojson }} {{ unk_token }}|{{ pad_token }}|{{ image_token }}|{{ strftime_now('%Y') }}
{%- if documents is none and mood is defined %} mood={{ mood }}{% endif %}
{%- if messages[-1].role == 'bad' %}{{
  raise_exception('no bad messages: ' ~ messages[-1].content) }}{% endif %}
"""
FEATURE_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<beginning_of_sentence>",
    "eos_token": {"__type": "AddedToken", "content": "<end_of_sentence>", "special": True},
    "unk_token": "<begin_of_document>",
    "extra_special_tokens": {"image_token": "<begin_of_document>"},
    "chat_template": "the tokenizer_config template, which chat_template.jinja replaces",
}
FEATURE_CHAT = [
    {"role": "user", "content": "Grüße <&>", "tool_calls": None},
    {"role": "skip", "content": "hidden"},
    {"role": "assistant", "content": "ok", "tool_calls": [], "reasoning": "why"},
    {"role": "stop", "content": "x"},
    {"role": "after", "content": "never"},
]


@pytest.mark.torch
def test_jinja_environment_and_variables_match_transformers(tmp_path, tokenizer_json):
    """chat_template.jinja wins over tokenizer_config's template; trim/lstrip blocks, loop
    controls, namespace, {% generation %}, tojson options, dict(), strftime_now, None keys
    dropped, reasoning aliases, special-token variables (AddedToken dicts, extra_special_tokens),
    extra variables and raise_exception behave as in transformers."""
    ckpt = _checkpoint(tmp_path / "c", tokenizer_json, FEATURE_CONFIG,
                       {"chat_template.jinja": FEATURES})  # fmt: skip
    hf, ours = _transformers(ckpt), ChatTokenizer.from_dir(ckpt)
    assert ours.chat_template == FEATURES
    for kw in ({"tools": TOOLS}, {"tools": TOOLS, "mood": "calm"}, {"tools": None}):
        variables = {k: v for k, v in kw.items() if k != "tools"}
        want = hf.apply_chat_template(FEATURE_CHAT, tokenize=False, add_generation_prompt=True,
                                      **kw)  # fmt: skip
        got = ours.render_chat(FEATURE_CHAT, tools=kw["tools"], variables=variables)
        assert got == want
    assert "<r>why|why</r>" in got and "after" not in got and "[calls]" in got
    bad = [*FEATURE_CHAT[:1], {"role": "bad", "content": "x"}]
    with pytest.raises(Exception, match="no bad messages: x"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="chat template failed to render: no bad messages: x"):
        ours.render_chat(bad)


@pytest.mark.torch
@pytest.mark.parametrize("layout", ["files", "tokenizer_config"])
def test_named_templates_are_chosen_as_transformers(tmp_path, tokenizer_json, layout):
    """Several templates (chat_template.jinja + additional_chat_templates/, or a list of
    {name, template} in tokenizer_config): tool_use with tools, default without."""
    default, tool_use = "D{{ messages[0].content[0].text }}", "T{{ tools | length }}"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<end_of_sentence>"}
    jinja = {}
    if layout == "files":
        jinja = {
            "chat_template.jinja": default,
            "additional_chat_templates/tool_use.jinja": tool_use,
        }
    else:
        config["chat_template"] = [{"name": "default", "template": default},
                                   {"name": "tool_use", "template": tool_use}]  # fmt: skip
    ckpt = _checkpoint(tmp_path / layout, tokenizer_json, config, jinja)
    hf, ours = _transformers(ckpt), ChatTokenizer.from_dir(ckpt)
    chat = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    for tools in (None, TOOLS):
        want = hf.apply_chat_template(chat, tools=tools, tokenize=False)
        assert ours.render_chat(chat, tools=tools) == want
    assert want == "T2" and ours.render_chat(chat) == "Dhi"


def test_template_sources_and_errors(tmp_path, tokenizer_json):
    ckpt = _checkpoint(tmp_path / "a", tokenizer_json, {"chat_template": "cfg"},
                       {"additional_chat_templates/other.jinja": "O"})  # fmt: skip
    tok = ChatTokenizer.from_dir(ckpt)
    assert tok.chat_template == {"other": "O"}  # files replace tokenizer_config's template
    with pytest.raises(ValueError, match=r"several chat templates \(other\) and no default"):
        tok.render_chat([{"role": "user", "content": "x"}])
    assert tok.render_chat([{"role": "user", "content": "x"}], template="given") == "given"
    for bad in (3, [{"name": "default"}], {"default": 1}):
        (ckpt / "additional_chat_templates" / "other.jinja").unlink(missing_ok=True)
        (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": bad}))
        with pytest.raises(InputFileError, match="tokenizer_config.json: chat_template"):
            ChatTokenizer.from_dir(ckpt)
    with pytest.raises(ValueError, match="set by the chat itself"):
        chat_template.render("x", [], variables={"messages": []})
    with pytest.raises(ValueError, match="underscore attribute '_x'"):
        chat_template.render("{% set ns = namespace(_x=1) %}", [])
    with pytest.raises(ValueError, match="unsafe|access to attribute"):
        chat_template.render("{{ ''.__class__.__mro__ }}", [])


def test_string_content_becomes_parts_with_the_tool_name(tokenizer_json):
    """Plain-string messages (the --prompt / JSONL convenience) render as the parts form the
    M1 template reads; a tool result's name comes from the message."""
    tok = ChatTokenizer(Tokenizer.from_file(str(tokenizer_json)), json.loads(M1_CONFIG.read_text()))
    plain = [
        {"role": "user", "content": "Weather in Tokyo?"},
        {"role": "tool", "name": "get_weather", "content": "25"},
    ]
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Tokyo?"}]},
        {"role": "tool", "name": "get_weather",
         "content": [{"type": "text", "text": "25", "name": "get_weather"}]},
    ]  # fmt: skip
    assert tok.render_chat(plain) == tok.render_chat(parts)
    assert "tool name: get_weather\ntool result: 25\n\n<end_of_sentence>" in tok.render_chat(plain)
