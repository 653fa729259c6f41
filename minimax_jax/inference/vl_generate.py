"""Generation with images for MiniMax-VL-01: the prompt's embeddings (image features merged in)
are prefilled into the text engine's cache, then decoding runs on tokens with the engine's own
jitted step / loop (``inference.engine``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.hf.vl_pretrained import from_pretrained_vl, is_vl_checkpoint
from minimax_jax.inference import engine as sampling
from minimax_jax.inference.tokenizer import StreamDecoder
from minimax_jax.model.cache import init_cache
from minimax_jax.model.decoder import RunOptions
from minimax_jax.vl.model import (
    MiniMaxVLForConditionalGeneration,
    embed_inputs,
    forward_cached_embeds,
)
from minimax_jax.vl.processor import MiniMaxVLProcessor, prepare_vl_inputs

_prefill_embeds = jax.jit(forward_cached_embeds, static_argnums=(0, 5, 6), donate_argnums=4)


def prefill_vl(
    engine, x: jax.Array, mask: np.ndarray, plan: dict, opts=None, compute_dtype: Any = None
):
    """Chunked prefill from embeddings x [B,T,D] (left-padded by mask [B,T]) into a fresh cache
    of ``plan`` (``engine.plan``) -> (last logits [B,V], cache). Decoding then runs on tokens
    with the engine's own jitted step / loop."""
    b, t = mask.shape
    pad = plan["padded_prompt"] - t
    x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0)))
    mask = np.pad(np.asarray(mask, np.int32), ((0, 0), (pad, 0)))
    cache = init_cache(engine.config, b, plan["max_len"], engine.kv_dtype)
    chunk, opts = plan["chunk"], opts or RunOptions()
    for start in range(0, x.shape[1], chunk):
        logits, cache = _prefill_embeds(
            engine.config,
            engine.params,
            x[:, start : start + chunk],
            jnp.asarray(mask[:, start : start + chunk]),
            cache,
            opts,
            compute_dtype,
        )
    return logits, cache


def generate_vl(
    model: MiniMaxVLForConditionalGeneration,
    input_ids,
    pixel_values=None,
    image_sizes=None,
    attention_mask=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    prefill_chunk: int = 256,
    compute_dtype: Any = None,
) -> np.ndarray:
    """Like ``sampling.generate`` with images -> int32 [B, max_new_tokens].

    input_ids [B,T] left-padded by attention_mask, ``<image>`` tokens expanded (the processor's
    ``input_ids``); pixel_values / image_sizes as the processor returns them.
    """
    stream = generate_vl_stream(
        model,
        input_ids,
        pixel_values,
        image_sizes,
        attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=eos_token_id,
        prefill_chunk=prefill_chunk,
        compute_dtype=compute_dtype,
    )
    steps = list(stream)
    out = np.stack(steps, axis=1)
    eos = int(sampling.eos_ids(eos_token_id)[0])
    if out.shape[1] < max_new_tokens:  # every row stopped: fill with eos as sampling does
        fill = np.full((out.shape[0], max_new_tokens - out.shape[1]), eos, np.int32)
        out = np.concatenate([out, fill], axis=1)
    return out.astype(np.int32)


def generate_vl_stream(
    model: MiniMaxVLForConditionalGeneration,
    input_ids,
    pixel_values=None,
    image_sizes=None,
    attention_mask=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    prefill_chunk: int = 256,
    compute_dtype: Any = None,
):
    """Yields each step's tokens [B] (rows that finished repeat eos); stops when all are done."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sp = sampling.SamplingParams(temperature, top_k, top_p)
    ids, mask = sampling._as_batch(input_ids, attention_mask)  # noqa: SLF001
    params = model.pure_params()
    engine = sampling.Engine(
        model.config.text,
        params["language_model"],
        options=model.options,
        prefill_chunk=prefill_chunk,
        compute_dtype=compute_dtype,
    )
    plan = engine.plan(ids.shape[0], ids.shape[1], max_new_tokens)
    engine.check_memory(plan)
    x = embed_inputs(
        model.config,
        params,
        ids,
        pixel_values,
        image_sizes,
        max_tile_batch=model.max_tile_batch,
        compute_dtype=compute_dtype,
        attention_impl=model.vision_attention,
    )
    logits, cache = prefill_vl(engine, x, mask, plan, model.options, compute_dtype)
    yield from sampling.stream_after_prefill(
        engine, logits, cache, max_new_tokens=max_new_tokens, sampling=sp, seed=seed,
        eos_token_id=eos_token_id,
    )  # fmt: skip


def token_streams(
    ckpt, tok, texts: Sequence[str], images: Sequence[Any], *, dtype: Any = jnp.float32, **gen
) -> Iterator[tuple[int, Iterator[int]]]:
    """(prompt tokens, that prompt's new token ids up to eos) for each of ``texts`` (final
    prompts, one ``<image>`` per image; every prompt gets all ``images``), generated one prompt
    at a time as the iterators are consumed. gen: max_new_tokens, temperature, top_k, top_p,
    seed, prefill_chunk."""
    if not is_vl_checkpoint(ckpt):
        raise ValueError(f"--image needs a MiniMax-VL-01 checkpoint; {ckpt} is a text model")
    model = from_pretrained_vl(ckpt, dtype=dtype)
    proc = MiniMaxVLProcessor.from_config(model.config)
    eos = tuple(tok.eos_token_ids) or None
    for text in texts:
        x = prepare_vl_inputs(proc, tok, text, images)
        args = (model, x["input_ids"][None], x["pixel_values"], x["image_sizes"])
        steps = generate_vl_stream(*args, eos_token_id=eos, **gen)
        yield len(x["input_ids"]), (int(step[0]) for step in steps)


def generate_for_cli(
    ckpt,
    tok,
    texts: Sequence[str],
    images: Sequence[Any],
    *,
    dtype: Any = jnp.float32,
    stream: bool = False,
    out=None,
    **gen: Any,
) -> list[str]:
    """``token_streams`` decoded: prints each completion (streamed when ``stream``) to ``out``
    and returns them."""
    out = out or sys.stdout
    results = []
    for _, steps in token_streams(ckpt, tok, texts, images, dtype=dtype, **gen):
        dec = StreamDecoder(tok)
        for token in steps:
            if token in tok.eos_token_ids:
                break
            piece = dec.push(token)
            if stream:
                out.write(piece)
                out.flush()
        results.append(tok.decode(dec.ids))
        out.write(dec.finish() + "\n" if stream else results[-1] + "\n")
    return results
