"""The checkpoint's byte-level BPE tokenizer and chat template.

MiniMax checkpoints ship GPT2Tokenizer files: `tokenizer.json`, or `vocab.json` + `merges.txt`,
plus `tokenizer_config.json` (special tokens, chat template). This wraps the `tokenizers` library
so generation needs neither transformers nor torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from minimax_jax import files

EOS_TOKENS = ("<end_of_sentence>",)


class ChatTokenizer:
    """encode/decode text, the eos ids and the chat template of one checkpoint directory."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any]):
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template: str | None = config.get("chat_template")
        names = [config.get("eos_token"), *EOS_TOKENS]
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
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def render_chat(
        self, messages: list[dict], *, template: str | None = None, add_generation_prompt=True
    ) -> str:
        """Apply the chat template. Message content may be a string or a list of
        {"type": "text", "text": ...} parts (MiniMax's template indexes content[0]["text"])."""
        template = template or self.chat_template
        if not template:
            raise ValueError(
                "the checkpoint has no chat template: pass --chat_template FILE or use --nochat"
            )
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters.setdefault("tojson", lambda x: json.dumps(x, ensure_ascii=False))
        normalized = [_as_parts(m) for m in messages]
        try:
            return env.from_string(template).render(
                messages=normalized, add_generation_prompt=add_generation_prompt, tools=None
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed to render: {e}") from e


def _as_parts(message: dict) -> dict:
    if "role" not in message or "content" not in message:
        raise ValueError(f"a chat message needs 'role' and 'content', got {sorted(message)}")
    content = message["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return {**message, "content": content}


class StreamDecoder:
    """Turns a growing list of token ids into text pieces without splitting a UTF-8 character."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more bytes
            return ""
        piece, self.printed = text[self.printed :], len(text)
        return piece
