"""MiniMax-M1 output parsing on hand-written outputs in the format of MiniMax-M1's
docs/function_call_guide.md, including the cases vLLM's `minimax` tool parser and `minimax_m1`
reasoning parser handle; the streaming splitter agrees with the parser for every split."""

from __future__ import annotations

import random

import pytest

from minimax_jax.inference.m1_output import (
    CONTENT,
    REASONING,
    StreamSplitter,
    parse,
    split_reasoning,
)

WEATHER = {"name": "get_weather", "arguments": {"city": "Dallas", "state": "TX"}}
SEARCH = {"name": "search_web", "arguments": {"query_tag": ["tech"], "query_list": ['"OpenAI"']}}
# The guide's example: reasoning, then two calls (quotes escaped inside the arguments).
GUIDE = (
    "<think>\nOkay, I will search for the OpenAI and Gemini latest release.\n</think>\n"
    "<tool_calls>\n"
    '{"name": "search_web", "arguments": {"query_tag": ["technology", "events"], '
    '"query_list": ["\\"OpenAI\\" \\"latest\\" \\"release\\""]}}\n'
    '{"name": "search_web", "arguments": {"query_tag": ["technology", "events"], '
    '"query_list": ["\\"Gemini\\" \\"latest\\" \\"release\\""]}}\n'
    "</tool_calls>"
)


def test_plain_answer_is_all_content():
    out = parse("The answer is 4.\n")
    assert (out.reasoning, out.content, out.tool_calls, out.errors) == (
        None, "The answer is 4.", [], []
    )  # fmt: skip
    assert split_reasoning("  no block </think> here ") == (None, "  no block </think> here ")


def test_reasoning_then_answer():
    out = parse("<think>\nLet me add 2 and 2.\nIt is 4.\n</think>\n\nThe answer is **4**.")
    assert out.reasoning == "Let me add 2 and 2.\nIt is 4."
    assert out.content == "The answer is **4**." and out.tool_calls == out.errors == []


def test_guide_example_reasoning_and_two_calls():
    out = parse(GUIDE)
    assert out.reasoning == "Okay, I will search for the OpenAI and Gemini latest release."
    assert out.content == "" and out.errors == []
    assert out.tool_calls == [
        {"name": "search_web", "arguments": {"query_tag": ["technology", "events"],
                                             "query_list": ['"OpenAI" "latest" "release"']}},
        {"name": "search_web", "arguments": {"query_tag": ["technology", "events"],
                                             "query_list": ['"Gemini" "latest" "release"']}},
    ]  # fmt: skip


def test_content_around_the_calls_and_several_blocks():
    text = (
        "I'll check the weather. <tool_calls>\n"
        '{"name": "get_weather", "arguments": {"city": "Dallas", "state": "TX"}}\n'
        "</tool_calls>\nand search: <tool_calls>\n"
        '{"name": "search_web", "arguments": {"query_tag": ["tech"], '
        '"query_list": ["\\"OpenAI\\""]}}\n</tool_calls> done'
    )
    out = parse(text)
    assert out.tool_calls == [WEATHER, SEARCH] and out.errors == []
    assert out.content == "I'll check the weather. \nand search:  done"


def test_calls_inside_reasoning_are_ignored():
    text = (
        "<think>I should use a tool. <tool_calls>\n"
        '{"name": "ignored_tool", "arguments": {"should": "ignore"}}\n'
        "</tool_calls></think>\n\nLet me help you with the weather. <tool_calls>\n"
        '{"name": "get_weather", "arguments": {"city": "Dallas", "state": "TX"}}\n</tool_calls>'
    )
    out = parse(text)
    assert out.tool_calls == [WEATHER]
    assert "ignored_tool" in out.reasoning and "ignored_tool" not in out.content
    assert out.content == "Let me help you with the weather."


def test_unclosed_blocks():
    """An unclosed <think> is all reasoning (the output was cut); an unclosed <tool_calls>
    keeps its complete calls, and a call cut mid-line is reported."""
    out = parse("<think>\nStill thinking about <tool_calls>\n{")
    assert out.reasoning == "Still thinking about <tool_calls>\n{"
    assert (out.content, out.tool_calls, out.errors) == ("", [], [])
    out = parse('<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Dallas", '
                '"state": "TX"}}')  # fmt: skip
    assert out.tool_calls == [WEATHER] and out.errors == [] and out.content == ""
    out = parse('<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Dallas", '
                '"state": "TX"}}\n{"name": "search_web", "argu')  # fmt: skip
    assert out.tool_calls == [WEATHER]
    assert len(out.errors) == 1 and out.errors[0].endswith('{"name": "search_web", "argu')


def test_malformed_lines_are_reported_and_the_rest_kept():
    text = (
        "<tool_calls>\n"
        '{"name": "valid_tool", "arguments": {"city": "Seattle"}}\n'
        "{invalid json here}\n"
        '{"arguments": {"city": "Portland"}}\n'
        '{"name": "bad_args", "arguments": [1, 2]}\n'
        '["not", "a", "call"]\n'
        '{"name": "stringly", "arguments": "{\\"x\\": 1}"}\n'
        '{"name": "no_args"}\n'
        '{"name": "another_valid_tool", "arguments": {"param": "value"}}\n'
        "</tool_calls>"
    )
    out = parse(text)
    assert out.tool_calls == [
        {"name": "valid_tool", "arguments": {"city": "Seattle"}},
        {"name": "stringly", "arguments": {"x": 1}},  # a JSON string holding an object
        {"name": "no_args", "arguments": {}},  # as the guide's parser reads it
        {"name": "another_valid_tool", "arguments": {"param": "value"}},
    ]
    assert len(out.errors) == 4
    assert out.errors[0].startswith("not valid JSON") and "{invalid json here}" in out.errors[0]
    assert 'needs a "name"' in out.errors[1] and "Portland" in out.errors[1]
    assert "'bad_args' must be a JSON object" in out.errors[2]
    assert "must be a JSON object, got list" in out.errors[3]


def test_multiline_json_call_is_read():
    """vLLM's parser skips an object spanning lines; the guide's format is one per line, but a
    pretty-printed call is still one call here."""
    out = parse('<tool_calls>\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": '
                '"Dallas", "state": "TX"\n  }\n}\n</tool_calls>')  # fmt: skip
    assert out.tool_calls == [WEATHER] and out.errors == []


def test_prompt_that_opened_the_reasoning():
    """A prompt ending in <think> (a template that opens the block): the text starts inside."""
    out = parse("First, 2+2.\n</think>\n4", in_reasoning=True)
    assert (out.reasoning, out.content) == ("First, 2+2.", "4")
    assert parse("no end", in_reasoning=True).reasoning == "no end"
    assert parse("First</think>4").content == "First</think>4"  # not opened: all content


CASES = [
    "plain  answer\n",
    "  leading space, no reasoning",
    "<think>\nabc\n\n  def\n</think>\n\n\nAnswer <tool_calls>\n{}\n</tool_calls> tail  ",
    GUIDE,
    "\n <think>unclosed   \n",
    "<think></think>",
    "<thi",
    "  <think",
    "<think>a </thin b </think>c",
    "<think>\n日本語の推論 ✓\n</think>\n答え",
]


@pytest.mark.parametrize("in_reasoning", [False, True])
def test_stream_splitter_agrees_with_the_parser(in_reasoning):
    """For every case and random splits into pieces (1-4 characters, and whole), the streamed
    reasoning and content pieces joined equal split_reasoning's."""
    rng = random.Random(0)
    for text in CASES:
        reasoning, answer = split_reasoning(text, in_reasoning=in_reasoning)
        for trial in range(60):
            splitter = StreamSplitter(in_reasoning=in_reasoning)
            pieces, i = [], 0
            while i < len(text):
                j = len(text) if trial == 0 else i + rng.randint(1, 4)
                pieces += splitter.push(text[i:j])
                i = j
            pieces += splitter.finish()
            got = {k: "".join(t for kind, t in pieces if kind == k) for k in (REASONING, CONTENT)}
            assert got == {REASONING: reasoning or "", CONTENT: answer}, (text, pieces)
            assert all(t for _, t in pieces)  # no empty pieces


def test_stream_splitter_emits_as_soon_as_it_can():
    s = StreamSplitter()
    assert s.push("<thi") == []  # may be the tag
    assert s.push("nk>\nStep one") == [(REASONING, "Step one")]
    assert s.push(" done.\n</th") == [(REASONING, " done.")]  # whitespace and "</th" held
    assert s.push("ink>\n\nHi") == [(CONTENT, "Hi")]
    assert s.push(" there") == [(CONTENT, " there")]
    assert s.finish() == []
