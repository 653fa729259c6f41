"""Train a byte-level BPE tokenizer (``tokenizers``) with MiniMax's special tokens.

    python -m minimax_jax.tokenizer_train --input /usr/lib/python3.11 --glob '**/*.py' \
        --vocab_size 4096 --output DIR

writes ``DIR/tokenizer.json`` and ``DIR/tokenizer_config.json`` (each to a temporary file, then
renamed; existing ones are replaced only with ``--overwrite``) (eos ``<end_of_sentence>``, bos
``<beginning_of_sentence>``, unk ``<end_of_document>`` and the chat template of the released
MiniMax-M1 checkpoint, kept in ``CHAT_TEMPLATE_SOURCE``), loadable by
``minimax_jax.inference.tokenizer.ChatTokenizer.from_dir``. Special tokens take the first ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from minimax_jax import cli, paths
from minimax_jax.training.tokenizer_train import CHAT_TEMPLATE_SOURCE, list_files, train_tokenizer

_INPUT = flags.DEFINE_multi_string("input", None, "File or directory of training text.")
_GLOB = flags.DEFINE_string("glob", "**/*", "Files to take under each --input directory.")
_EXCLUDE = flags.DEFINE_multi_string(
    "exclude",
    ["test", "tests", "site-packages", "dist-packages", "__pycache__", "idlelib"],
    "Directory names skipped under --input.",
)
_VOCAB = flags.DEFINE_integer(
    "vocab_size", 4096, "Vocabulary size including special tokens.", lower_bound=1
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Output directory (created if missing; other files in it are left alone)."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace tokenizer.json / tokenizer_config.json already in --output."
)
_TEMPLATE = flags.DEFINE_string(
    "chat_template_from", CHAT_TEMPLATE_SOURCE, "tokenizer_config.json to copy the template from."
)
_HOLDERS = (_INPUT, _GLOB, _EXCLUDE, _VOCAB, _OUTPUT, _OVERWRITE, _TEMPLATE)


def main(argv: Sequence[str]) -> None:
    del argv  # stray arguments are refused by cli.run
    cli.guard(_work)


def _work() -> None:
    if not _INPUT.value or not _OUTPUT.value:
        raise cli.UsageError("--input and --output are required (see --help)")
    # local files only: a URL would otherwise become a local directory "gs:/..." here
    for value, flag in [*((v, "--input") for v in _INPUT.value), (_OUTPUT.value, "--output"),
                        (_TEMPLATE.value, "--chat_template_from")]:  # fmt: skip
        if value:
            paths.local_only(value, flag)
    for path in _INPUT.value:
        if not os.path.exists(path):
            raise cli.UsageError(f"--input {path}: no such file or directory")
    if os.path.exists(_OUTPUT.value) and not os.path.isdir(_OUTPUT.value):
        raise cli.UsageError(f"--output {_OUTPUT.value}: not a directory; give a directory")
    existing = [
        name
        for name in ("tokenizer.json", "tokenizer_config.json")
        if os.path.exists(os.path.join(_OUTPUT.value, name))
    ]
    if existing and not _OVERWRITE.value:
        raise cli.UsageError(
            f"--output {_OUTPUT.value} already holds {' and '.join(existing)}; pass --overwrite "
            "to replace them or choose another directory"
        )
    files = list_files(_INPUT.value, _GLOB.value, _EXCLUDE.value)
    tok = train_tokenizer(
        files=files,
        vocab_size=_VOCAB.value,
        output=_OUTPUT.value,
        chat_template_from=_TEMPLATE.value or None,
    )
    print(f"trained on {len(files)} files: vocab {tok.get_vocab_size()} -> {_OUTPUT.value}")


def run() -> None:
    """Console-script entry point (``minimax-jax-train-tokenizer``)."""
    cli.run(main, __doc__, _HOLDERS)


if __name__ == "__main__":
    run()
