"""generation_config.json as the source of `python -m minimax_jax.generate`'s sampling defaults."""

import io
import json
import subprocess
import sys

import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minimax_jax import MiniMaxForCausalLM, ModelConfig, generation_config, save_pretrained
from minimax_jax.generate import run_generate


def _write(tmp_path, content) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / "generation_config.json").write_text(text)


def test_no_file_means_no_defaults(tmp_path):
    assert generation_config.sampling_defaults(tmp_path) == {}


def test_fields_read_and_renamed(tmp_path):
    extra = {"eos_token_id": 0, "transformers_version": "5.23.0"}  # not sampling: ignored
    _write(tmp_path, {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                      "max_new_tokens": 64, **extra})  # fmt: skip
    assert generation_config.sampling_defaults(tmp_path) == {
        "greedy": False, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_new_tokens": 64,
    }  # fmt: skip
    _write(tmp_path, {"do_sample": False, "top_k": 0, "temperature": None})
    assert generation_config.sampling_defaults(tmp_path) == {"greedy": True, "top_k": None}


@pytest.mark.parametrize(
    "content, field",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"do_sample": "yes"}, "do_sample"),
        ([0.7], "JSON object"),
        ("{temperature: 0.7", "not valid JSON"),
    ],
)
def test_bad_content_names_file_and_field(tmp_path, content, field):
    _write(tmp_path, content)
    with pytest.raises(ValueError, match=field) as err:
        generation_config.sampling_defaults(tmp_path)
    assert str(tmp_path / "generation_config.json") in str(err.value)


def test_merge_explicit_flags_win():
    flags = {"temperature": 1.0, "top_p": 0.95, "top_k": None, "greedy": False,
             "max_new_tokens": 64}  # fmt: skip
    file = {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 32}
    assert generation_config.merge(file, flags, set()) == {**flags, **file}
    given = {"temperature", "max_new_tokens"}
    assert generation_config.merge(file, flags, given) == {**flags, "top_p": 0.9}
    # a greedy file yields to a sampling flag given on the command line, not to other flags
    assert generation_config.merge({"greedy": True}, flags, {"top_p"})["greedy"] is False
    assert generation_config.merge({"greedy": True}, flags, {"max_new_tokens"})["greedy"] is True


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    cfg = ModelConfig.preset("tiny-remote")
    save_pretrained(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)), path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=["<end_of_sentence>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<end_of_sentence>"}))
    return path


def _cli(checkpoint, *args):
    cmd = [sys.executable, "-m", "minimax_jax.generate", "--checkpoint", str(checkpoint),
           "--prompt", "def add(", "--seed", "3", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_takes_defaults_from_the_file(checkpoint):
    """do_sample false + max_new_tokens 5 in the file: the CLI without flags prints the greedy
    5-token completion; an explicit --max_new_tokens wins over the file."""
    kw = dict(checkpoint=str(checkpoint), prompts=["def add("], greedy=True, out=io.StringIO())
    greedy5 = run_generate(max_new_tokens=5, **kw)[0]
    greedy3 = run_generate(max_new_tokens=3, **kw)[0]
    assert greedy5 != greedy3
    _write(checkpoint, {"do_sample": False, "max_new_tokens": 5})
    try:
        proc = _cli(checkpoint)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == greedy5 + "\n"
        proc = _cli(checkpoint, "--max_new_tokens", "3")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == greedy3 + "\n"
    finally:
        (checkpoint / "generation_config.json").unlink()


def test_cli_bad_file_is_one_line_error(checkpoint):
    _write(checkpoint, {"top_p": 2.0})
    try:
        proc = _cli(checkpoint)
    finally:
        (checkpoint / "generation_config.json").unlink()
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "generation_config.json" in last and "top_p" in last
    assert "Traceback" not in proc.stderr
