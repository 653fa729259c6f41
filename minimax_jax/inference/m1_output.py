"""MiniMax-M1's output format: reasoning, answer and tool calls.

M1 answers ``<think>\\nREASONING\\n</think>\\n\\nANSWER``; with tools (its chat template lists them
in a system turn) the answer may hold one block ``<tool_calls>`` ... ``</tool_calls>`` with one
JSON object ``{"name": ..., "arguments": {...}}`` per line (MiniMax-M1 docs/function_call_guide.md).

``parse`` splits a finished completion; ``StreamSplitter`` tells, piece by piece while it is
decoded, which text is reasoning and which is answer. The rules (both agree):

* Reasoning is a ``<think>`` block at the very start (after whitespace), or from the start when
  the prompt itself ended with ``<think>`` (``in_reasoning``). An unclosed block is all
  reasoning (the output was cut). Reasoning is stripped of surrounding whitespace, and so is the
  start of the answer after it. Text with no leading block is all answer, unchanged.
* Tool calls are read from ``<tool_calls>`` blocks of the answer only (a block inside the
  reasoning is the model thinking, not calling). An unclosed block is read to the end. Each JSON
  value in a block is one call (one per line as M1 writes them; an object spanning lines is read
  too); ``arguments`` must be an object (a string holding a JSON object is decoded; a missing
  one is ``{}``, as the guide's parser does). A line that is not valid JSON, or a value that is
  not a call, is reported in ``errors`` and skipped, never dropped silently.
* ``content`` is the answer without its tool-call blocks, stripped.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALLS_OPEN, CALLS_CLOSE = "<tool_calls>", "</tool_calls>"
REASONING, CONTENT = "reasoning", "content"


@dataclasses.dataclass(frozen=True)
class M1Output:
    """reasoning: None when the text has no reasoning block. tool_calls: ``{"name": str,
    "arguments": dict}`` in order. errors: one message per malformed call."""

    reasoning: str | None
    content: str
    tool_calls: list[dict[str, Any]]
    errors: list[str]


def split_reasoning(text: str, *, in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a completion (module rules)."""
    if not in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return None, text
        text = stripped[len(THINK_OPEN) :]
    end = text.find(THINK_CLOSE)
    if end < 0:
        return text.strip(), ""
    return text[:end].strip(), text[end + len(THINK_CLOSE) :].lstrip()


def parse(text: str, *, in_reasoning: bool = False) -> M1Output:
    """Reasoning, content, tool calls and errors of a finished completion."""
    reasoning, answer = split_reasoning(text, in_reasoning=in_reasoning)
    content, calls, errors = [], [], []
    pos = 0
    while True:
        start = answer.find(CALLS_OPEN, pos)
        if start < 0:
            content.append(answer[pos:])
            break
        content.append(answer[pos:start])
        body_start = start + len(CALLS_OPEN)
        end = answer.find(CALLS_CLOSE, body_start)
        _read_calls(answer[body_start : end if end >= 0 else len(answer)], calls, errors)
        if end < 0:
            break
        pos = end + len(CALLS_CLOSE)
    return M1Output(reasoning, "".join(content).strip(), calls, errors)


def _read_calls(body: str, calls: list, errors: list) -> None:
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(body) and body[pos].isspace():
            pos += 1
        if pos >= len(body):
            return
        try:
            value, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError as e:
            line_end = body.find("\n", pos)
            line_end = len(body) if line_end < 0 else line_end
            errors.append(f"not valid JSON ({e.msg}): {body[pos:line_end].strip()[:200]}")
            pos = line_end
            continue
        call, problem = _as_call(value)
        if problem:
            errors.append(f"{problem}: {body[pos:end][:200]}")
        else:
            calls.append(call)
        pos = end


def _as_call(value: Any) -> tuple[dict | None, str | None]:
    if not isinstance(value, dict):
        return None, f"a tool call must be a JSON object, got {type(value).__name__}"
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return None, 'a tool call needs a "name" string'
    args = value.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None, f'"arguments" of {name!r} is a string that is not JSON'
    if not isinstance(args, dict):
        return None, f'"arguments" of {name!r} must be a JSON object'
    return {"name": name, "arguments": args}, None


class StreamSplitter:
    """Text pieces in, ``(kind, text)`` out, kind ``REASONING`` or ``CONTENT`` (the answer, tool
    calls included). Tags are consumed; text that might be the start of a tag, and whitespace
    that ``split_reasoning`` would strip, are held until the next piece decides. The reasoning
    pieces joined equal ``split_reasoning(text)[0]`` ("" for None), the content pieces joined
    its answer, once ``finish()`` is called."""

    def __init__(self, *, in_reasoning: bool = False):
        self._state = REASONING if in_reasoning else "start"
        self._held = ""
        self._strip_left = in_reasoning  # drop whitespace at the start of this section

    def push(self, piece: str) -> list[tuple[str, str]]:
        self._held += piece
        out: list[tuple[str, str]] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[tuple[str, str]]:
        """Whatever is still held, at the end of the completion."""
        out: list[tuple[str, str]] = []
        text, self._held = self._held, ""
        if self._state == "start":
            self._state = CONTENT
        if self._strip_left:
            text = text.lstrip()
        if self._state == REASONING:
            text = text.rstrip()
        if text:
            out.append((self._state, text))
        return out

    def _step(self, out: list) -> bool:
        """Moves what can be decided out of the held text; True when the state changed."""
        if self._state == "start":
            head = self._held.lstrip()
            if head.startswith(THINK_OPEN):
                self._held = head[len(THINK_OPEN) :]
                self._state, self._strip_left = REASONING, True
                return True
            if THINK_OPEN.startswith(head):  # whitespace, or a prefix of the tag: wait
                return False
            self._state = CONTENT
        if self._strip_left:
            self._held = self._held.lstrip()
            if not self._held:
                return False
            self._strip_left = False
        if self._state == CONTENT:
            if self._held:
                out.append((CONTENT, self._held))
            self._held = ""
            return False
        end = self._held.find(THINK_CLOSE)
        if end >= 0:
            text = self._held[:end].rstrip()
            if text:
                out.append((REASONING, text))
            self._held = self._held[end + len(THINK_CLOSE) :]
            self._state, self._strip_left = CONTENT, True
            return True
        keep = _partial_tag(self._held, THINK_CLOSE)
        body = self._held[: len(self._held) - keep]
        ready = body.rstrip()  # trailing whitespace waits: it may end the reasoning
        if ready:
            out.append((REASONING, ready))
        self._held = self._held[len(ready) :]
        return False


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
