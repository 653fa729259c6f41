"""Byte-level BPE tokenizer training with MiniMax's special tokens (behind
`python -m minimax_jax.tokenizer_train`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minimax_jax import files

SPECIAL_TOKENS = (
    "<end_of_sentence>",
    "<beginning_of_sentence>",
    "<begin_of_document>",
    "<end_of_document>",
    "<tools>",
    "<tool_calls>",
)
# The chat template is copied at training time from a released MiniMax tokenizer_config.json: the
# MiniMax-M1 one, shipped as package data (minimax_jax/chat_templates/).
CHAT_TEMPLATE_SOURCE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "chat_templates",
    "minimax-m1",
    "tokenizer_config.json",
)


def list_files(inputs: Sequence[str], pattern: str, exclude: Sequence[str]) -> list[str]:
    """Sorted files of every input (a file, or matches of ``pattern`` under a directory)."""
    import glob

    out = []
    for root in inputs:
        if os.path.isfile(root):
            out.append(root)
            continue
        for f in glob.glob(os.path.join(root, pattern), recursive=True):
            parts = set(os.path.relpath(f, root).split(os.sep)[:-1])
            if os.path.isfile(f) and not parts & set(exclude):
                out.append(f)
    if not out:
        raise ValueError(f"no training files under {list(inputs)} matching {pattern!r}")
    return sorted(out)


def _texts(files: Sequence[str]) -> Iterator[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield fh.read()


def train_tokenizer(
    *, files: Sequence[str], vocab_size: int, output: str, chat_template_from: str | None
) -> Tokenizer:
    """Trains the BPE on ``files`` and writes tokenizer.json + tokenizer_config.json."""
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(files), trainer=trainer, length=len(files))
    os.makedirs(output, exist_ok=True)
    config_text = json.dumps(tokenizer_config(chat_template_from), indent=2, sort_keys=True)
    # Each file goes to a hidden temporary beside it, then is renamed over: a reader never sees a
    # half-written tokenizer, and an interrupted run leaves the old files as they were.
    _write_atomic(os.path.join(output, "tokenizer.json"), tok.to_str())
    _write_atomic(os.path.join(output, "tokenizer_config.json"), config_text + "\n")
    return tok


def _write_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def tokenizer_config(chat_template_from: str | None) -> dict:
    """The tokenizer_config.json of a trained tokenizer (GPT2Tokenizer-compatible keys)."""
    cfg = {
        "add_prefix_space": False,
        "bos_token": "<beginning_of_sentence>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<end_of_sentence>",
        "model_max_length": 40960000,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<end_of_document>",
    }
    if chat_template_from:
        source = files.read_mapping(chat_template_from, "a tokenizer_config.json")
        if not isinstance(source.get("chat_template"), str):
            raise files.InputFileError(f"{chat_template_from}: no chat_template string in it")
        cfg["chat_template"] = source["chat_template"]
    return cfg
