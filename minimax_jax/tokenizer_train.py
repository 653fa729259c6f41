"""Train a byte-level BPE tokenizer (``tokenizers``) with MiniMax's special tokens.

    python -m minimax_jax.tokenizer_train --input /usr/lib/python3.11 --glob '**/*.py' \
        --vocab_size 4096 --output DIR

writes ``DIR/tokenizer.json`` and ``DIR/tokenizer_config.json`` (eos ``<end_of_sentence>``, bos
``<beginning_of_sentence>``, unk ``<end_of_document>`` and the chat template of the released
MiniMax-M1 checkpoint, kept in ``CHAT_TEMPLATE_SOURCE``), loadable by
``minimax_jax.tokenizer.ChatTokenizer.from_dir``. Special tokens take the first ids.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence

from absl import app, flags
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = (
    "<end_of_sentence>",
    "<beginning_of_sentence>",
    "<begin_of_document>",
    "<end_of_document>",
    "<tools>",
    "<tool_calls>",
)
# The chat template is copied at training time from a released MiniMax tokenizer_config.json.
CHAT_TEMPLATE_SOURCE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "tests",
    "data",
    "minimax-m1",
    "tokenizer_config.json",
)

_INPUT = flags.DEFINE_multi_string("input", None, "File or directory of training text.")
_GLOB = flags.DEFINE_string("glob", "**/*", "Files to take under each --input directory.")
_EXCLUDE = flags.DEFINE_multi_string(
    "exclude",
    ["test", "tests", "site-packages", "dist-packages", "__pycache__", "idlelib"],
    "Directory names skipped under --input.",
)
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size including special tokens.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_TEMPLATE = flags.DEFINE_string(
    "chat_template_from", CHAT_TEMPLATE_SOURCE, "tokenizer_config.json to copy the template from."
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
    tok.save(os.path.join(output, "tokenizer.json"))
    with open(os.path.join(output, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(chat_template_from), f, indent=2, sort_keys=True)
        f.write("\n")
    return tok


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
        with open(chat_template_from) as f:
            cfg["chat_template"] = json.load(f)["chat_template"]
    return cfg


def main(argv: Sequence[str]) -> None:
    del argv
    try:
        if not _INPUT.value or not _OUTPUT.value:
            raise ValueError("--input and --output are required")
        files = list_files(_INPUT.value, _GLOB.value, _EXCLUDE.value)
        tok = train_tokenizer(
            files=files,
            vocab_size=_VOCAB.value,
            output=_OUTPUT.value,
            chat_template_from=_TEMPLATE.value or None,
        )
    except (ValueError, OSError) as e:
        print(f"tokenizer_train: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"trained on {len(files)} files: vocab {tok.get_vocab_size()} -> {_OUTPUT.value}")


def run() -> None:
    """Console-script entry point (``minimax-jax-train-tokenizer``)."""
    app.run(main)


if __name__ == "__main__":
    run()
