"""Shared helpers of the training tests: a memorisable corpus, its tokenizer and run configs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import yaml

from minimax_jax.training import run_config as tc
from minimax_jax.training.tokenizer_train import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, "configs", "train", "tiny.yaml")

# Four documents of distinct words: every next token is determined by the current one, so a
# tiny model can drive the loss to ~0.
_WORDS = (
    "apple banana cherry damson elder fig grape hazel iris jasmine kiwi lemon mango nectar olive "
    "peach quince raisin sage thyme umber violet walnut xylem yarrow zinnia amber bronze copper "
    "denim ebony fawn garnet henna indigo jade khaki lilac maroon navy ochre plum ruby sepia teal"
).split()


# One lightning and one softmax layer instead of tiny-native's 7+1 block: the tests of the loop
# itself (sharding, resume, skipping) compile ~3x faster and still cross both layer kinds.
TWO_LAYERS = {"overrides": {"num_layers": 2, "layer_types": ["linear_attention", "full_attention"]}}


def make_corpus(root: str, n_docs: int = 4, words: int = 11) -> tuple[str, str]:
    """Writes n_docs text files and a byte-level BPE trained on them; returns (glob, tok dir)."""
    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for d in range(n_docs):
        text = " ".join(_WORDS[d * words : (d + 1) * words])
        with open(os.path.join(corpus, f"doc{d}.txt"), "w") as f:
            f.write(text)
    tok = os.path.join(root, "tokenizer")
    train_tokenizer(
        files=[os.path.join(corpus, f"doc{d}.txt") for d in range(n_docs)],
        vocab_size=400,
        output=tok,
        chat_template_from=None,
    )
    return os.path.join(corpus, "*.txt"), tok


def raw_config(corpus_glob: str, tokenizer: str, **sections) -> dict:
    """tiny.yaml with the corpus and tokenizer filled in, and per-section overrides."""
    with open(TINY_YAML) as f:
        raw = yaml.safe_load(f)
    raw = copy.deepcopy(raw)
    raw["data"]["sources"] = [{"type": "text", "path": corpus_glob}]
    raw["data"]["tokenizer"] = tokenizer
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def config(corpus_glob: str, tokenizer: str, **sections) -> tc.TrainConfig:
    return tc.from_dict(raw_config(corpus_glob, tokenizer, **sections))


def write_yaml(path: str, raw: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def cli(args: list[str], **kwargs) -> subprocess.Popen:
    """``python -m minimax_jax.train ARGS`` in a fresh process (one CPU device)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "minimax_jax.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )
