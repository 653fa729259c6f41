"""`python -m minimax_jax.generate` on a tiny random checkpoint with a tokenizer trained here."""

import json
import subprocess
import sys

import jax
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minimax_jax import MiniMaxForCausalLM, ModelConfig, save_pretrained
from minimax_jax.inference import engine as sampling
from minimax_jax.inference.runner import run_generate
from minimax_jax.inference.tokenizer import ChatTokenizer, StreamDecoder
from minimax_jax.training.tokenizer_train import CHAT_TEMPLATE_SOURCE

SPECIALS = ["<end_of_sentence>", "<beginning_of_sentence>", "<begin_of_document>"]
TEXT = ["def add(a, b):\n    return a + b\n", "héllo wörld, 日本語のテキスト ✓", "print('hi')"] * 20


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT, trainer)
    return tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    cfg = ModelConfig.preset("tiny-remote")
    save_pretrained(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)), path)
    train_tokenizer(cfg.vocab_size).save(str(path / "tokenizer.json"))
    template = json.loads(open(CHAT_TEMPLATE_SOURCE).read())  # the released M1 template
    (path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<end_of_sentence>", "chat_template": template["chat_template"]})
    )
    return path


def test_greedy_cli_equals_api(checkpoint, capsys):
    texts = run_generate(
        checkpoint=str(checkpoint),
        prompts=["def add(", "print"],
        chat=False,
        greedy=True,
        max_new_tokens=8,
        prefill_chunk=16,
    )
    tok = ChatTokenizer.from_dir(checkpoint)
    from minimax_jax import from_pretrained

    model = from_pretrained(checkpoint)
    for prompt, text in zip(["def add(", "print"], texts, strict=True):
        ids = sampling.generate(
            model, [tok.encode(prompt)], max_new_tokens=8, eos_token_id=tok.eos_token_ids
        )[0].tolist()
        cut = next((i for i, t in enumerate(ids) if t in tok.eos_token_ids), len(ids))
        assert text == tok.decode(ids[:cut])
    assert capsys.readouterr().out == "".join(t + "\n" for t in texts)


def test_stream_prints_the_same_text(checkpoint, capsys):
    kw = dict(
        checkpoint=str(checkpoint),
        prompts=["héllo"],
        chat=True,
        system="be brief",
        greedy=True,
        max_new_tokens=10,
    )
    plain = run_generate(stream=False, **kw)
    capsys.readouterr()
    streamed = run_generate(stream=True, **kw)
    assert streamed == plain
    assert capsys.readouterr().out == plain[0] + "\n"


def test_stream_decoder_never_splits_a_character(checkpoint):
    tok = ChatTokenizer.from_dir(checkpoint)
    text = "日本語 ✓ héllo"
    dec = StreamDecoder(tok)
    pieces = [dec.push(t) for t in tok.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_accepts_strings_and_parts(checkpoint):
    tok = ChatTokenizer.from_dir(checkpoint)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    plain = [{"role": "user", "content": "hi"}]
    rendered = tok.render_chat(parts)
    assert rendered == tok.render_chat(plain)
    assert rendered == (
        "<begin_of_document><beginning_of_sentence>user name=user\nhi<end_of_sentence>\n"
        "<beginning_of_sentence>ai name=assistant\n"
    )


def test_prompt_beyond_max_positions_is_refused(checkpoint):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        run_generate(checkpoint=str(checkpoint), prompts=["x"], max_new_tokens=5000)


def test_prompts_file_and_errors(checkpoint, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"prompt": "def"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "x"}]})
        + "\n"
    )
    out = run_generate(
        checkpoint=str(checkpoint), prompts=[], prompts_file=str(f), greedy=True, max_new_tokens=3
    )
    assert len(out) == 2
    with pytest.raises(ValueError, match="no prompt"):
        run_generate(checkpoint=str(checkpoint), prompts=[])
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        run_generate(checkpoint=str(tmp_path), prompts=["x"])
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        run_generate(checkpoint=str(checkpoint), prompts=[], prompts_file=str(f))


def test_attention_impl_flag(checkpoint):
    """--attention_impl xla is the default path's text; cudnn where it cannot run is refused
    with the reason (on CPU: no CUDA GPU), as is combining it with --image."""
    kw = dict(checkpoint=str(checkpoint), prompts=["def "], greedy=True, max_new_tokens=4)
    assert run_generate(attention_impl="xla", **kw) == run_generate(**kw)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match=r'attention_impl="cudnn" needs a CUDA GPU'):
            run_generate(attention_impl="cudnn", **kw)
    with pytest.raises(ValueError, match="--attention_impl is for text models"):
        run_generate(attention_impl="cudnn", images=["x.png"], **kw)


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "minimax_jax.generate",
            "--checkpoint",
            str(tmp_path),
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_tokenizer_larger_than_model_vocab_is_refused(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    big = train_tokenizer(512)
    big.add_tokens([f"<extra_{i}>" for i in range(600)])  # now larger than the model's 512
    big.save(str(bad / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer has"):
        run_generate(checkpoint=str(bad), prompts=["x"], max_new_tokens=2)


def test_mesh_flag_gives_the_same_text(checkpoint):
    """--mesh expert=2,tensor=4 (8 simulated devices, tp_ep rules) generates as one device."""
    kw = dict(checkpoint=str(checkpoint), prompts=["def add(", "print"], chat=False, greedy=True,
              max_new_tokens=6, prefill_chunk=16)  # fmt: skip
    assert run_generate(mesh="expert=2,tensor=4", **kw) == run_generate(**kw)
    with pytest.raises(ValueError, match="--mesh"):
        run_generate(mesh="experts=2", **kw)


PROMPT = "def add(a, b):\n    return a + b\nprint('hi')"


def test_sequence_mesh_gives_the_same_text(checkpoint, capsys):
    """--mesh sequence=4,expert=2 (each prefill chunk's tokens over 4 devices) generates the
    one-device text over several prefill chunks, and prints the chunk it used."""
    tok = ChatTokenizer.from_dir(checkpoint)
    assert len(tok.encode(PROMPT)) > 8  # at least 3 chunks of 4
    kw = dict(
        checkpoint=str(checkpoint),
        prompts=[PROMPT, "print"],
        chat=False,
        greedy=True,
        max_new_tokens=6,
        prefill_chunk=4,
    )
    assert run_generate(mesh="sequence=4,expert=2", **kw) == run_generate(**kw)
    assert "prefill chunk 4 (--prefill_chunk)" in capsys.readouterr().err


def test_automatic_chunk_is_printed(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sampling, "device_memory_limit", lambda: 1 << 40)
    run_generate(
        checkpoint=str(checkpoint), prompts=["print"], chat=False, greedy=True, max_new_tokens=2
    )
    assert "prefill chunk 16 (the largest the memory plan fits)" in capsys.readouterr().err


def test_chunk_not_divisible_by_sequence_exits_2_before_compiling(checkpoint, capsys, monkeypatch):
    from minimax_jax import cli

    monkeypatch.setattr(sampling.Engine, "prefill", lambda *a: pytest.fail("compiled a prefill"))
    with pytest.raises(SystemExit) as exit_info:
        cli.guard(
            lambda: run_generate(
                checkpoint=str(checkpoint),
                prompts=[PROMPT],
                greedy=True,
                mesh="sequence=4,expert=2",
                prefill_chunk=6,
            )
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --prefill_chunk 6 is not a multiple of the mesh's sequence=4 (each chunk is "
        "split over it): pass a multiple of 4"
    ]
