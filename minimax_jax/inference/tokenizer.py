"""The checkpoint's byte-level BPE tokenizer and chat template.

MiniMax checkpoints ship GPT2Tokenizer files: `tokenizer.json`, or `vocab.json` + `merges.txt`,
plus `tokenizer_config.json` (special tokens, chat template). This wraps the `tokenizers` library
so generation needs neither transformers nor torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from minimax_jax import files
from minimax_jax.inference import chat_template

EOS_TOKENS = ("<end_of_sentence>",)


class ChatTokenizer:
    """encode/decode text, the eos ids and the chat template(s) of one checkpoint directory."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: dict[str, Any],
        templates: chat_template.Templates | None = None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        # A string, or name -> template when the checkpoint has several (see chat_template).
        self.chat_template = (
            templates if templates is not None else chat_template.from_config(config)
        )
        names = [config.get("eos_token"), *EOS_TOKENS]
        if isinstance(names[0], dict):  # a serialised AddedToken
            names[0] = names[0].get("content")
        ids = [tokenizer.token_to_id(n) for n in names if isinstance(n, str)]
        self.eos_token_ids = tuple(dict.fromkeys(i for i in ids if i is not None))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ChatTokenizer:
        path = Path(path)
        cfg_file = path / "tokenizer_config.json"
        what = "a tokenizer_config.json (a JSON object)"
        config = files.read_mapping(cfg_file, what) if cfg_file.exists() else {}
        if (path / "tokenizer.json").exists():
            tok = files.load_tokenizer(path / "tokenizer.json")
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            bpe = models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
            tok = Tokenizer(bpe)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            specials = [t["content"] for t in config.get("added_tokens_decoder", {}).values()]
            tok.add_special_tokens(specials)
        else:
            raise FileNotFoundError(
                f"no tokenizer in {path}: expected tokenizer.json or vocab.json + merges.txt"
            )
        return cls(tok, config, chat_template.load(path, config))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def template_for(self, template: str | None = None, tools: list | None = None) -> str:
        """``template`` if given, else the checkpoint's (``tool_use`` of several with tools)."""
        if template:
            return template
        if not self.chat_template:
            raise ValueError(
                "the checkpoint has no chat template: pass --chat_template FILE or use --nochat"
            )
        return chat_template.select(self.chat_template, tools=tools)

    def render_chat(
        self,
        messages: list[dict],
        *,
        template: str | None = None,
        tools: list | None = None,
        variables: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Apply the chat template as transformers' ``apply_chat_template`` does (see
        ``chat_template``), with the special tokens of tokenizer_config and ``variables``.

        Message content may be a string or a list of parts. For a template that reads
        ``content[0]`` (MiniMax's index ``content[0]["text"]``) a string becomes
        ``[{"type": "text", "text": ...}]``, with the message's ``name`` copied in for a tool
        result (the template reads ``content["name"]``); otherwise, and for lists of parts,
        content is passed unchanged, as transformers does."""
        source = self.template_for(template, tools)
        parts = chat_template.reads_parts(source)
        normalized = [_as_parts(m) if parts else _checked(m) for m in messages]
        values = {**chat_template.special_tokens(self.config), **(variables or {})}
        return chat_template.render(
            source,
            normalized,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            variables=values,
        )


def _checked(message: dict) -> dict:
    if "role" not in message or "content" not in message:
        raise ValueError(f"a chat message needs 'role' and 'content', got {sorted(message)}")
    return message


def _as_parts(message: dict) -> dict:
    content = _checked(message)["content"]
    if isinstance(content, str):
        part = {"type": "text", "text": content}
        if message.get("role") == "tool" and isinstance(message.get("name"), str):
            part["name"] = message["name"]
        content = [part]
    return {**message, "content": content}


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces that never split a UTF-8 character.

    O(1) amortised per token with ``tokenizers.decoders.DecodeStream`` (tokenizers >= 0.21);
    without it, each push decodes the whole sequence (quadratic). The pieces joined, then
    ``finish()``, equal ``tokenizer.decode(ids)`` (special tokens skipped)."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0  # characters returned so far
        stream_cls = getattr(decoders, "DecodeStream", None)
        self._stream = None if stream_cls is None else stream_cls(skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        if self._stream is not None:
            piece = self._stream.step(self.tokenizer.tokenizer, int(token)) or ""
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
                return ""
            piece = text[self.printed :]
        self.printed += len(piece)
        return piece

    def finish(self) -> str:
        """What is still held back at the end (bytes that never formed a character decode as
        U+FFFD, as in a one-shot decode)."""
        text = self.tokenizer.decode(self.ids)
        piece = text[self.printed :]
        self.printed = len(text)
        return piece
