"""What `python -m minimax_jax.generate` makes of each completion: the console display (answer on
stdout, reasoning on stderr) and the ``--output`` JSONL record."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from minimax_jax.inference import m1_output
from minimax_jax.inference.tokenizer import ChatTokenizer, StreamDecoder

REASONING_PREFIX = "[reasoning] "
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


@dataclasses.dataclass(frozen=True)
class Completion:
    """One prompt's completion. prompt: the input as given (a string, or the messages list).
    text: the decoded new tokens before eos. chat: the prompt went through the chat template,
    so reasoning and tool calls are read from ``text`` (``m1_output``); in_reasoning: the
    rendered prompt ended with ``<think>``."""

    prompt: str | list
    text: str
    finish_reason: str  # "stop" (an eos token) or "length" (max_new_tokens)
    prompt_tokens: int
    new_tokens: int  # generated tokens, the eos token included
    chat: bool = False
    in_reasoning: bool = False

    def record(self) -> dict[str, Any]:
        """The --output JSONL object. Without chat the text is all content."""
        if self.chat:
            parsed = m1_output.parse(self.text, in_reasoning=self.in_reasoning)
        else:
            parsed = m1_output.M1Output(None, self.text, [], [])
        return {
            "prompt": self.prompt,
            "text": self.text,
            "reasoning": parsed.reasoning,
            "content": parsed.content,
            "tool_calls": parsed.tool_calls,
            "errors": parsed.errors,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
        }


def take_until_eos(
    steps: Iterable[int], eos: tuple[int, ...], on_token: Callable[[int], None] | None = None
) -> tuple[list[int], bool]:
    """(tokens before the first eos, whether an eos came) of a stream of token ids."""
    ids = []
    for token in steps:
        token = int(token)
        if token in eos:
            return ids, True
        ids.append(token)
        if on_token is not None:
            on_token(token)
    return ids, False


class Display:
    """Prints one completion, whole (``end``) or as it decodes (``push`` each token, then
    ``end``). With ``split`` (a chat prompt) the reasoning goes to ``log`` after
    ``REASONING_PREFIX`` (dimmed on a terminal) and the answer to ``out``; otherwise the text
    goes to ``out`` unchanged. Every completion ends with one newline on ``out``."""

    def __init__(
        self,
        tok: ChatTokenizer,
        out: TextIO,
        log: TextIO,
        *,
        split: bool,
        in_reasoning: bool = False,
    ):
        self.out, self.log, self.split, self.in_reasoning = out, log, split, in_reasoning
        self._decoder = StreamDecoder(tok)
        self._splitter = m1_output.StreamSplitter(in_reasoning=in_reasoning)
        self._streamed = False
        self._reasoning_open = False
        self._dim = bool(getattr(log, "isatty", lambda: False)())

    def push(self, token: int) -> None:
        self._streamed = True
        self._write(self._decoder.push(token))

    def end(self, text: str) -> None:
        if self._streamed:
            self._write(self._decoder.finish(), final=True)
        elif self.split:
            reasoning, answer = m1_output.split_reasoning(text, in_reasoning=self.in_reasoning)
            if reasoning is not None:
                self._reasoning(reasoning)
                self._close_reasoning()
            self.out.write(answer)
        else:
            self.out.write(text)
        self.out.write("\n")
        self.out.flush()

    def _write(self, piece: str, final: bool = False) -> None:
        if not self.split:
            self.out.write(piece)
        else:
            parts = self._splitter.push(piece) + (self._splitter.finish() if final else [])
            for kind, text in parts:
                if kind == m1_output.REASONING:
                    self._reasoning(text)
                else:
                    self._close_reasoning()
                    self.out.write(text)
            if final:
                self._close_reasoning()
        self.out.flush()

    def _reasoning(self, text: str) -> None:
        if not self._reasoning_open:
            self.log.write((_DIM if self._dim else "") + REASONING_PREFIX)
            self._reasoning_open = True
        self.log.write(text)
        self.log.flush()

    def _close_reasoning(self) -> None:
        if self._reasoning_open:
            self.log.write((_RESET if self._dim else "") + "\n")
            self.log.flush()
            self._reasoning_open = False
