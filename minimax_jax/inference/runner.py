"""The work behind `python -m minimax_jax.generate`: load a checkpoint, render prompts (chat,
images), generate, and print or stream the completions (`run_generate`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from minimax_jax import files
from minimax_jax.config import ModelConfig, check_quantize
from minimax_jax.hf.pretrained import checkpoint_quantize, from_pretrained, sharding_from_rules
from minimax_jax.inference import engine as sampling
from minimax_jax.inference import vl_generate
from minimax_jax.inference.tokenizer import ChatTokenizer, StreamDecoder
from minimax_jax.model.decoder import RunOptions
from minimax_jax.sharding import load_rules, make_mesh
from minimax_jax.vl import processor

DEMO_DIR = Path(__file__).parent.parent / "demo_model"
_CHUNK_SOURCE = {
    "given": "--prefill_chunk",
    "auto": "the largest the memory plan fits",
    "default": "default: device memory unknown",
}


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[dict | str]:
    """Plain strings or {"messages": [...]} dicts, in order."""
    out: list[dict | str] = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        text = files.read_text(path, "a --prompts_file (JSON lines)")
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            item = files.parse_json(line, f"--prompts_file {path}:{n}")
            if not isinstance(item, dict) or not ({"prompt", "messages"} & set(item)):
                raise ValueError(f'{path}:{n}: expected {{"prompt": ...}} or {{"messages": ...}}')
            out.append(item["prompt"] if "prompt" in item else {"messages": item["messages"]})
    if not out:
        raise ValueError("no prompt: pass --prompt TEXT or --prompts_file FILE.jsonl")
    return out


def render(tok, item, *, chat: bool, system: str | None, template: str | None) -> str:
    if isinstance(item, dict):
        messages = list(item["messages"])
    elif chat:
        messages = [{"role": "user", "content": item}]
    else:
        return item
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return tok.render_chat(messages, template=template)


def run_generate(
    *,
    checkpoint: str | None,
    prompts: list[str],
    prompts_file: str | None = None,
    chat: bool | None = None,
    system: str | None = None,
    chat_template: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float | None = 0.95,
    top_k: int | None = None,
    greedy: bool = False,
    seed: int = 0,
    stream: bool = False,
    dtype: str = "float32",
    quantize: str | None = None,
    prefill_chunk: int | None = None,
    images: list[str] | None = None,
    mesh: str | None = None,
    rules: str = "tp_ep",
    attention_impl: str = "auto",
    out=None,
    log=None,
) -> list[str]:
    """Generate for every prompt; prints (to out, default stdout) and returns the completions."""
    out, log = out or sys.stdout, log or sys.stderr
    check_quantize(quantize)
    ckpt = Path(checkpoint) if checkpoint else DEMO_DIR
    if not ckpt.is_dir():
        what = "not a directory" if ckpt.exists() else "no such directory"
        raise files.InputFileError(f"--checkpoint {ckpt}: {what}; expected a checkpoint directory")
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(
            f"--checkpoint {ckpt} is not a checkpoint directory (no config.json)"
        )
    tok = ChatTokenizer.from_dir(ckpt)
    template = files.read_text(chat_template, "a Jinja chat template") if chat_template else None
    chat = (template or tok.chat_template) is not None if chat is None else chat
    items = read_prompts(prompts, prompts_file)
    if images:
        items = [_with_image_placeholders(it, len(images)) for it in items]
    texts = [render(tok, it, chat=chat, system=system, template=template) for it in items]
    if images:
        if attention_impl != "auto":
            raise ValueError("--attention_impl is for text models; drop it with --image")
        if quantize is not None:
            raise ValueError("--quantize is for text models; drop it with --image")

        return vl_generate.generate_for_cli(
            ckpt, tok, texts, images, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
            stream=stream, out=out, max_new_tokens=max_new_tokens,
            temperature=0.0 if greedy else temperature, top_k=top_k,
            top_p=None if greedy or top_p == 1.0 else top_p, seed=seed,
            prefill_chunk=prefill_chunk or sampling.DEFAULT_CHUNK,
        )  # fmt: skip
    model, options = _load(ckpt, dtype, mesh, rules, attention_impl, quantize)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    sp = sampling.SamplingParams(
        0.0 if greedy else temperature, top_k, None if greedy or top_p == 1.0 else top_p
    )
    engine = sampling.Engine(
        model.config, model.pure_params(), options=options, prefill_chunk=prefill_chunk
    )
    encoded = [tok.encode(t) for t in texts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("a prompt encodes to zero tokens")
    plan = engine.plan(len(encoded), max(map(len, encoded)), max_new_tokens)
    int8 = f" (int8 weights: {model.quantize})" if model.quantize else ""
    chunk = f"prefill chunk {plan['chunk']} ({_CHUNK_SOURCE[plan['chunk_source']]})"
    print(
        f"[{ckpt.name}] {model.config.param_count():,} params{int8}; estimated device memory "
        f"{plan['total'] / 2**20:.1f} MiB (weights {plan['weights'] / 2**20:.1f} + cache "
        f"{plan['cache'] / 2**20:.1f} + activations {plan['activations'] / 2**20:.1f}); "
        f"{chunk}; {len(encoded)} prompt(s)",
        file=log,
    )
    kw = dict(max_new_tokens=max_new_tokens, seed=seed, eos_token_id=tok.eos_token_ids or None)
    results = []
    start = time.perf_counter()
    if stream:
        for ids in encoded:  # one prompt at a time, printed as it decodes
            dec = StreamDecoder(tok)
            for step in sampling.generate_stream(engine, [ids], sampling=sp, **kw):
                if int(step[0]) in tok.eos_token_ids:
                    break
                out.write(dec.push(int(step[0])))
                out.flush()
            out.write("\n")
            results.append(tok.decode(dec.ids))
    else:
        ids, mask = _left_pad(encoded)
        tokens = sampling.generate(
            None,
            ids,
            mask,
            temperature=sp.temperature,
            top_k=sp.top_k,
            top_p=sp.top_p,
            engine=engine,
            **kw,
        )
        for row in tokens:
            row = list(row)
            cut = next((i for i, t in enumerate(row) if t in tok.eos_token_ids), len(row))
            results.append(tok.decode(row[:cut]))
            print(results[-1], file=out)
    elapsed = time.perf_counter() - start
    print(f"[done] {len(results)} completion(s) in {elapsed:.2f}s", file=log)
    return results


def parse_mesh(text: str) -> dict[str, int]:
    """ "expert=2,tensor=4" -> {"data": 1, "fsdp": 1, "expert": 2, "tensor": 4, "sequence": 1}."""
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, "sequence": 1}
    for item in filter(None, text.replace(" ", "").split(",")):
        name, _, value = item.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh: expected axis=size with axes {sorted(sizes)}, got {item!r}")
        sizes[name] = int(value)
    return sizes


def _load(
    ckpt: Path,
    dtype: str,
    mesh: str | None,
    rules_name: str,
    attention_impl: str = "auto",
    quantize: str | None = None,
):
    """The model (parameters placed by the rules when a mesh is given) and its RunOptions."""
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    quantize = checkpoint_quantize(ckpt, quantize)  # a converted int8 checkpoint's own scheme
    if not mesh:
        model = from_pretrained(ckpt, dtype=jdtype, quantize=quantize)
        return model, RunOptions(attention_impl=attention_impl)
    rules, _ = load_rules(rules_name)
    sizes = parse_mesh(mesh)
    device_mesh = make_mesh(sizes)
    sharding = sharding_from_rules(ModelConfig.from_hf(ckpt), device_mesh, rules, quantize)
    options = RunOptions(
        moe_impl=rules.moe_impl, mesh=device_mesh, rules=rules, attention_impl=attention_impl
    )
    return from_pretrained(ckpt, dtype=jdtype, sharding=sharding, quantize=quantize), options


def _with_image_placeholders(item, num_images: int):
    """One <image> per image prepended to a plain prompt that has none; image parts of chat
    messages become <image> in their text."""
    if isinstance(item, str):
        return processor.ensure_placeholders(item, num_images)
    return {"messages": [processor.image_parts_to_text(m) for m in item["messages"]]}


def _left_pad(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    t = max(map(len, seqs))
    ids = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, t - len(s) :] = s
        mask[i, t - len(s) :] = 1
    return ids, mask
