"""`python -m minimax_jax.generate` on a tiny random checkpoint with a tokenizer trained here."""

import json
import shutil
import subprocess
import sys

import jax
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minimax_jax import MiniMaxForCausalLM, ModelConfig, save_pretrained
from minimax_jax.inference import engine as sampling
from minimax_jax.inference.runner import _left_pad, run_generate
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
    assert "".join(pieces) == text and dec.finish() == ""
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


# ----------------------------------------------------------------- tools, --output, streaming

TOOLS = [
    {"name": "get_weather", "description": "Weather of a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
]  # fmt: skip
LINE_TOOLS = [{"name": "get_time", "description": "Now.", "parameters": {"type": "object"}}]


def test_output_jsonl_records(checkpoint, tmp_path):
    """--output: one record per prompt with the rendered prompt's token count (--tools, a
    line's own "tools"), the text before eos, finish_reason "stop" (eos) / "length", and the new
    token count (eos included); the expected tokens come from sampling.generate on the model."""
    from minimax_jax import from_pretrained
    from minimax_jax.inference.m1_output import parse

    tok = ChatTokenizer.from_dir(checkpoint)
    model = from_pretrained(checkpoint)
    messages = [{"role": "user", "content": "print"}]
    prompts = [tok.render_chat([{"role": "user", "content": "def add("}], tools=TOOLS),
               tok.render_chat(messages, tools=LINE_TOOLS)]  # fmt: skip
    ids, mask = _left_pad([tok.encode(p) for p in prompts])  # as rows alone (test_generation)
    rows = sampling.generate(model, ids, mask, max_new_tokens=6).tolist()
    stop = next(t for t in rows[0][1:] if t not in rows[0][:1] and t >= len(SPECIALS))
    ckpt = tmp_path / "ckpt"  # the same checkpoint whose eos is a token greedy decoding emits
    shutil.copytree(checkpoint, ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["eos_token"] = tok.tokenizer.id_to_token(stop)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    (tmp_path / "p.jsonl").write_text(json.dumps({"messages": messages, "tools": LINE_TOOLS}))
    out = tmp_path / "out" / "o.jsonl"
    out.parent.mkdir()
    texts = run_generate(checkpoint=str(ckpt), prompts=["def add("], greedy=True,
                         prompts_file=str(tmp_path / "p.jsonl"), tools=str(tmp_path / "tools.json"),
                         max_new_tokens=6, output=str(out))  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["def add(", messages]
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.jsonl"]  # no temporary left
    eos = {stop, *ChatTokenizer.from_dir(checkpoint).eos_token_ids}
    for record, text, prompt, row in zip(records, texts, prompts, rows, strict=True):
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        assert record["text"] == text == tok.decode(row[:cut])
        assert record["prompt_tokens"] == len(tok.encode(prompt))
        assert record["finish_reason"] == ("length" if cut is None else "stop")
        assert record["new_tokens"] == (6 if cut is None else cut + 1)
        parsed = parse(text)
        assert (record["reasoning"], record["content"]) == (parsed.reasoning, parsed.content)
        assert record["tool_calls"] == parsed.tool_calls and record["errors"] == parsed.errors
    assert records[0]["finish_reason"] == "stop"
    with pytest.raises(ValueError, match="--output .*o.jsonl exists; remove it"):
        run_generate(checkpoint=str(ckpt), prompts=["x"], output=str(out))
    with pytest.raises(ValueError, match="--output .*: no directory"):
        run_generate(checkpoint=str(ckpt), prompts=["x"], output=str(tmp_path / "no" / "o"))


def test_record_of_an_m1_completion():
    from minimax_jax.inference.completions import Completion

    text = ('<think>\nCall the tool.\n</think>\n\nChecking. <tool_calls>\n{"name": "get_weather",'
            ' "arguments": {"city": "Paris"}}\n{oops}\n</tool_calls>')  # fmt: skip
    record = Completion(prompt="Weather?", text=text, finish_reason="stop", prompt_tokens=7,
                        new_tokens=30, chat=True).record()  # fmt: skip
    assert record["reasoning"] == "Call the tool." and record["content"] == "Checking."
    assert record["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert len(record["errors"]) == 1 and "{oops}" in record["errors"][0]
    raw = Completion("p", text, "length", 1, 2).record()  # not a chat prompt: all content
    assert (raw["reasoning"], raw["content"], raw["tool_calls"]) == (None, text, [])


def test_stream_display_splits_reasoning_from_the_answer(checkpoint):
    """Streamed token by token or printed whole: the answer on out, the reasoning on log after
    "[reasoning] "; a completion that is not a chat one is printed unchanged."""
    import io

    from minimax_jax.inference.completions import Display

    tok = ChatTokenizer.from_dir(checkpoint)
    text = "<think>\n日本語で考える ✓\n</think>\n\nprint('hi') <tool_calls>\n{}\n</tool_calls>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for split, want_out, want_log in (
        (True, "print('hi') <tool_calls>\n{}\n</tool_calls>\n", "[reasoning] 日本語で考える ✓\n"),
        (False, text + "\n", ""),
    ):
        for stream in (True, False):
            out, log = io.StringIO(), io.StringIO()
            display = Display(tok, out, log, split=split)
            if stream:
                for t in ids:
                    display.push(t)
            display.end(text)
            assert (out.getvalue(), log.getvalue()) == (want_out, want_log), (split, stream)


def test_stream_decoder_is_exact_and_linear(checkpoint, monkeypatch):
    """50K random token ids (special tokens and bytes that form no character included): the
    streamed pieces, then finish(), equal one-shot decoding, in well under a second per 10K
    tokens (DecodeStream); the fallback without it agrees on a shorter sequence."""
    import time

    import numpy as np
    from tokenizers import decoders

    tok = ChatTokenizer.from_dir(checkpoint)
    ids = np.random.RandomState(0).randint(0, tok.vocab_size, 50_000).tolist()
    start = time.perf_counter()
    dec = StreamDecoder(tok)
    pieces = [dec.push(t) for t in ids]
    pieces.append(dec.finish())
    elapsed = time.perf_counter() - start
    full = tok.decode(ids)
    assert "".join(pieces) == full
    assert "\ufffd" in full and any(ord(c) > 0x3000 for c in full)  # the hard cases occurred
    assert elapsed < 5.0, elapsed  # re-decoding the whole sequence per token: minutes
    monkeypatch.delattr(decoders, "DecodeStream")
    short = ids[:2000]
    dec = StreamDecoder(tok)
    assert "".join(dec.push(t) for t in short) + dec.finish() == tok.decode(short)


def test_tools_and_template_vars_reach_the_template(checkpoint, tmp_path, capsys, monkeypatch):
    """--tools renders the tool block of the M1 template; --template_var values reach it (JSON
    or string); bad files and values are errors naming the flag or file:line."""
    from minimax_jax.inference import runner
    from minimax_jax.inference.runner import Prompt, parse_template_vars, read_prompts, render

    tok = ChatTokenizer.from_dir(checkpoint)
    item = Prompt("hi")
    text = render(tok, item, chat=True, system=None, template=None, tools=TOOLS)
    assert '<tools>\n{"name": "get_weather", "description": "Weather of a city."' in text
    own = render(tok, Prompt("hi", LINE_TOOLS), chat=True, system=None, template=None, tools=TOOLS)
    assert "get_time" in own and "get_weather" not in own
    template = "{{ mood }}|{{ n + 1 }}|{{ flag }}"
    variables = parse_template_vars(["mood=calm=ish", "n=2", "flag=true"])
    assert render(tok, item, chat=True, system=None, template=template,
                  variables=variables) == "calm=ish|3|True"  # fmt: skip
    for bad, match in ((["1x=2"], "--template_var '1x=2'"), (["x"], "KEY=VALUE"),
                       (["tools=[]"], "the chat itself sets 'tools'")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            parse_template_vars(bad)
    f = tmp_path / "p.jsonl"
    for line, match in (({"prompt": "x", "tools": {"name": "f"}}, 'p.jsonl:1: "tools"'),
                        ({"prompt": 3}, '"prompt" must be a string'),
                        ({"messages": []}, '"messages" must be a non-empty list')):  # fmt: skip
        f.write_text(json.dumps(line) + "\n")
        with pytest.raises(ValueError, match=match):
            read_prompts([], str(f))
    (tmp_path / "t.json").write_text(json.dumps({"name": "f"}))
    kw = dict(checkpoint=str(checkpoint), prompts=["x"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"--tools .*t.json: expected a JSON list"):
        run_generate(tools=str(tmp_path / "t.json"), **kw)
    (tmp_path / "t.json").write_text(json.dumps(TOOLS))
    with pytest.raises(ValueError, match="need the chat template"):
        run_generate(tools=str(tmp_path / "t.json"), chat=False, **kw)
    monkeypatch.setattr(runner, "_load", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stops where the model would load
        run_generate(tools=str(tmp_path / "t.json"), chat_template=str(f), **kw)  # no `tools`
    assert "warning: the chat template does not use `tools`" in capsys.readouterr().err


def test_dtype_defaults_to_the_checkpoint(checkpoint, tmp_path, monkeypatch):
    from minimax_jax.inference import runner

    for value, want in ((None, "float32"), ("bfloat16", "bfloat16"), ("float16", "bfloat16"),
                        ("float32", "float32"), ("torch.bfloat16", "bfloat16")):  # fmt: skip
        cfg = json.loads((checkpoint / "config.json").read_text())
        if value:
            cfg["torch_dtype" if value != "float16" else "dtype"] = value
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        assert runner.checkpoint_dtype(tmp_path) == want, value
    cfg["torch_dtype"] = "int8"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: dtype 'int8' .* pass --dtype"):
        runner.checkpoint_dtype(tmp_path)
    assert runner.checkpoint_dtype(runner.DEMO_DIR) == "float32"
    seen = []

    def load(ckpt, dtype, *args):
        seen.append(dtype)
        raise KeyboardInterrupt  # stop before compiling anything

    monkeypatch.setattr(runner, "_load", load)
    ckpt = tmp_path / "bf16"
    shutil.copytree(checkpoint, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    for dtype, want in ((None, "bfloat16"), ("float32", "float32")):
        with pytest.raises(KeyboardInterrupt):
            runner.run_generate(checkpoint=str(ckpt), prompts=["x"], dtype=dtype)
        assert seen[-1] == want


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
