"""Generation engine: chunked prefill into preallocated caches, then a jitted decode loop.

Rows are left-padded and left-aligned: every row writes its t-th token to the same cache slot,
padding slots are masked (softmax) or leave the state untouched (lightning), and positions count
real tokens only, so a row in a padded batch generates exactly what it generates alone.

Shapes are bucketed so new prompt lengths rarely recompile: the prompt is left-padded to a
multiple of the prefill chunk (or to a power of two when shorter), and the cache length is
rounded up to a multiple of `_CACHE_BUCKET`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.config import ModelConfig
from minimax_jax.inference import memory
from minimax_jax.model import sequence
from minimax_jax.model.attention import cudnn_lse_unsupported, resolve_attention_impl
from minimax_jax.model.cache import init_cache
from minimax_jax.model.decoder import RunOptions, forward_cached

_CACHE_BUCKET = 128
# The prefill chunk where neither the caller nor the device's memory size gives one.
DEFAULT_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k / top_p None mean no truncation."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits: jax.Array, key: jax.Array, sp: SamplingParams) -> jax.Array:
    """logits [B,V] fp32 -> tokens [B] int32 (greedy, or temperature / top-k / nucleus)."""
    if sp.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sp.temperature
    if sp.top_k is not None:
        kth = jax.lax.top_k(logits, min(sp.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sp.top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first is kept).
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= sp.top_p
        drop = (
            jnp.zeros_like(drop_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(drop_sorted)
        )
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _bucket_prompt(t: int, chunk: int, multiple: int = 1) -> tuple[int, int]:
    """(padded prompt length, chunk used) for a prompt of t tokens; a short prompt's single
    chunk is also rounded up to a multiple of `multiple` (the mesh's sequence size)."""
    if t <= chunk:
        padded = max(16, 1 << (t - 1).bit_length())
        padded = -(-padded // multiple) * multiple
        return padded, padded
    return -(-t // chunk) * chunk, chunk


def chunk_candidates(prompt_len: int, multiple: int = 1) -> list[int]:
    """Prefill chunks the automatic choice considers, ascending: powers of two from 16 (times
    the sequence size when that is not a power of two) up to the first that holds the whole
    prompt."""
    base = 16 if 16 % multiple == 0 else -(-16 // multiple) * multiple
    out = [base]
    while out[-1] < prompt_len:
        out.append(2 * out[-1])
    return out


def device_memory_limit() -> int | None:
    """Bytes of memory on the first device (host RAM for CPU), or None if unknown."""
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends differ in what they expose
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if dev.platform == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            return None
    return None


class Engine:
    """Jitted prefill / decode functions for one model config; reuse it across calls."""

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        *,
        options: RunOptions | None = None,
        prefill_chunk: int | None = None,
        kv_dtype: Any = None,
        compute_dtype: Any = None,
        sync_every: int = 16,
    ):
        """prefill_chunk: tokens per prefill call; None: the largest the memory plan fits on
        the device (`plan`), or `DEFAULT_CHUNK` where the device's memory is unknown. With a
        `sequence` mesh axis each chunk is split over it (so it must be a multiple of its size).
        sync_every: decode steps per iteration of the device loop's early-stop check; the
        steps between checks run as a loop of known trip count (no host round trip per token
        on GPU), and a stop at eos is noticed up to sync_every - 1 steps late (those steps
        write eos and do not change the result). Decode steps run the block scan unrolled.
        Measured on H200 (experiments/RESULTS.md): these and `moe_gather` took the 1.5B
        benchmark model's batch-1 step from 3.42 to 1.75 ms."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.sync_every = sync_every
        self.config, self.params = config, params
        self.prefill_chunk = prefill_chunk
        self.kv_dtype = kv_dtype or jnp.asarray(params["embed"]).dtype
        # the engine left-pads every prompt, so each row's valid cache slots are one run
        options = dataclasses.replace(options or RunOptions(), cache_runs=True)
        self.mesh, self.rules = options.mesh, options.rules
        self.attention_impl = options.attention_impl
        self.compute_dtype = compute_dtype
        prefill = functools.partial(
            forward_cached, config, opts=options, compute_dtype=compute_dtype, last_only=True
        )
        step = functools.partial(
            forward_cached, config, compute_dtype=compute_dtype,
            opts=dataclasses.replace(options, unroll_blocks=True),
        )  # fmt: skip
        self._prefill = jax.jit(lambda p, i, m, c: _last(prefill(p, i, m, c)), donate_argnums=3)
        self._step = jax.jit(self._decode_step, static_argnums=4, donate_argnums=1)
        self._loop = jax.jit(self._decode_loop, static_argnums=(4, 5), donate_argnums=1)
        self._forward = step

    def _prefill_attention(self, chunk: int, max_len: int) -> str:
        """What the softmax layers run for a prefill chunk against a cache of max_len slots, as
        the memory planner names it ("xla", "blockwise", "cudnn" or "cudnn_chunk")."""
        dtype = self.compute_dtype or self.params["embed"].dtype
        c = self.config
        q = jax.ShapeDtypeStruct((1, chunk, c.num_heads, c.head_dim), dtype)
        cache = jax.ShapeDtypeStruct((1, max_len, c.num_kv_heads, c.head_dim), dtype)
        impl = resolve_attention_impl(self.attention_impl, q, chunk=cache)
        if impl == "cudnn" and cudnn_lse_unsupported(q, cache) is None:
            return "cudnn_chunk"
        return impl

    def plan(self, batch: int, prompt_len: int, max_new_tokens: int) -> dict:
        """Bucketed shapes and the memory estimate for a request; "chunk_source" says whether
        the prefill chunk was given ("given"), chosen from the plan ("auto": the largest of
        `chunk_candidates` whose planned total fits `device_memory_limit`, else the smallest)
        or the default ("default": the device's memory is unknown)."""
        limit = self.config.max_position_embeddings
        # The last new token is sampled, never fed back: it takes no position.
        if prompt_len + max(max_new_tokens - 1, 0) > limit:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) - 1 exceeds "
                f"the model's max_position_embeddings ({limit}): shorten the prompt or generate "
                "less"
            )
        p = self._sequence_size()
        if self.prefill_chunk is not None:
            if self.prefill_chunk % p:
                raise ValueError(
                    f"--prefill_chunk {self.prefill_chunk} is not a multiple of the mesh's "
                    f"sequence={p} (each chunk is split over it): pass a multiple of {p}"
                )
            return self._plan_with(batch, prompt_len, max_new_tokens, self.prefill_chunk, "given")
        memory_limit = device_memory_limit()
        if memory_limit is None:
            chunk = -(-DEFAULT_CHUNK // p) * p
            return self._plan_with(batch, prompt_len, max_new_tokens, chunk, "default")
        plans = [
            self._plan_with(batch, prompt_len, max_new_tokens, c, "auto")
            for c in chunk_candidates(prompt_len, p)
        ]
        fits = [pl for pl in plans if pl["total"] <= memory_limit]
        return fits[-1] if fits else plans[0]

    def _sequence_size(self) -> int:
        """Tokens of a prefill chunk are split over this many devices (1: not split)."""
        p = sequence.sequence_size(self.mesh)
        if p > 1 and sequence.SEQUENCE in self.rules.mesh_axes("length"):
            return p
        return 1

    def _plan_with(self, batch, prompt_len, max_new_tokens, chunk: int, source: str) -> dict:
        padded, chunk = _bucket_prompt(prompt_len, chunk, self._sequence_size())
        max_len = -(-(padded + max_new_tokens) // _CACHE_BUCKET) * _CACHE_BUCKET
        # Bytes held by the first device (all of them without a mesh).
        dev = jax.tree.leaves(self.params)[0].sharding.device_set
        dev = min(dev, key=lambda d: d.id)
        weights = sum(
            s.data.nbytes for x in jax.tree.leaves(self.params) for s in x.addressable_shards
            if s.device == dev
        )  # fmt: skip
        mem = memory.plan_inference(
            self.config,
            batch=batch,
            prompt_len=padded,
            max_len=max_len,
            mesh_shape=None if self.mesh is None else dict(self.mesh.shape),
            rules=self.rules,
            weights=int(weights),
            param_dtype=self.params["embed"].dtype,
            kv_dtype=self.kv_dtype,
            prefill_chunk=chunk,
            attention_impl=self._prefill_attention(chunk // self._sequence_size(), max_len),
        )
        return {
            "padded_prompt": padded,
            "chunk": chunk,
            "chunk_source": source,
            "max_len": max_len,
            "weights": mem.weights,
            "cache": mem.cache,
            "activations": mem.activations,
            "total": mem.total,
        }

    def check_memory(self, plan: dict) -> None:
        limit = device_memory_limit()
        if limit is not None and plan["total"] > limit:
            raise MemoryError(
                f"estimated {plan['total'] / 2**30:.2f} GiB (weights {plan['weights'] / 2**30:.2f}"
                f" + cache {plan['cache'] / 2**30:.2f} + activations "
                f"{plan['activations'] / 2**30:.2f}) exceeds device memory "
                f"{limit / 2**30:.2f} GiB: lower the batch, prompt or max_new_tokens, or use a mesh"
            )

    def prefill(self, ids: np.ndarray, mask: np.ndarray, plan: dict):
        """Left-pad to the bucket, run the chunks; returns (last logits [B,V], cache)."""
        b, t = ids.shape
        pad = plan["padded_prompt"] - t
        ids = np.pad(ids, ((0, 0), (pad, 0)))
        mask = np.pad(mask, ((0, 0), (pad, 0)))
        cache = init_cache(
            self.config, b, plan["max_len"], self.kv_dtype, mesh=self.mesh, rules=self.rules
        )
        chunk = plan["chunk"]
        for start in range(0, ids.shape[1], chunk):  # a few chunks; each is one jitted call
            logits, cache = self._prefill(
                self.params, ids[:, start : start + chunk], mask[:, start : start + chunk], cache
            )
        return logits, cache

    def _decode_step(self, params, cache, token, key, sp: SamplingParams):
        """Feed token [B] -> (next token [B], its logits [B,V], cache)."""
        ones = jnp.ones((token.shape[0], 1), jnp.int32)
        logits, cache = self._forward(params, token[:, None], ones, cache)
        logits = logits[:, -1]
        return sample_token(logits, key, sp), logits, cache

    def _decode_loop(self, params, cache, first, key, n: int, sp: SamplingParams, eos):
        """n decode steps in one jitted loop; stops early once every row hit eos.

        The loop runs chunks of `sync_every` steps (an inner loop of static trip count) and
        checks for the stop between chunks; the last (n - 1) % sync_every steps run after it
        unless every row is done.
        """
        b, chunk = first.shape[0], self.sync_every
        out = jnp.zeros((b, n), jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, eos)

        def one(_, state):
            i, cache, out, done, key = state
            key, sub = jax.random.split(key)
            tok, _, cache = self._decode_step(params, cache, out[:, i - 1], sub, sp)
            tok = jnp.where(done, eos[0], tok)
            return i + 1, cache, out.at[:, i].set(tok), done | jnp.isin(tok, eos), key

        def steps(count, state):
            if count == 1:
                return one(0, state)
            return jax.lax.fori_loop(0, count, one, state)

        full = (n - 1) // chunk * chunk

        def cond(state):
            i, _, _, done, _ = state
            return (i < 1 + full) & ~jnp.all(done)

        state = jax.lax.while_loop(
            cond, functools.partial(steps, chunk), (1, cache, out, done, key)
        )
        if n - 1 - full:
            state = jax.lax.cond(
                jnp.all(state[3]), lambda s: s, functools.partial(steps, n - 1 - full), state
            )
        i, cache, out, done, _ = state
        # Rows that stopped (and all rows if the loop ended early) hold eos after their eos.
        pos = jnp.arange(n)[None]
        return jnp.where((pos >= i) & done[:, None], eos[0], out), cache


def _last(result):
    logits, cache = result
    return logits[:, -1], cache


def _as_batch(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length>0], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integers, got {ids.dtype}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if np.any(np.diff(mask.astype(np.int32), axis=1) < 0):
        raise ValueError("attention_mask must be left padding (zeros before ones in every row)")
    if np.any(mask.sum(1) == 0):
        raise ValueError("every row needs at least one token (attention_mask row is all zeros)")
    return ids.astype(np.int32), mask.astype(np.int32)


def eos_ids(eos_token_id) -> jax.Array:
    if eos_token_id is None:
        return jnp.asarray([-1], jnp.int32)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return jnp.asarray(ids, jnp.int32)


def generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    engine: Engine | None = None,
) -> np.ndarray:
    """Generate max_new_tokens per row -> int32 [B, max_new_tokens].

    input_ids [B,T] left-padded by attention_mask (1 token, 0 padding). temperature 0 is greedy.
    After a row emits eos, its remaining positions hold eos (the first id when several).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sp = SamplingParams(temperature, top_k, top_p)
    ids, mask = _as_batch(input_ids, attention_mask)
    if engine is None:
        engine = Engine(model.config, model.pure_params(), options=model.options)
    if ids.max() >= engine.config.vocab_size or ids.min() < 0:
        raise ValueError(f"token ids must be in [0, {engine.config.vocab_size})")
    plan = engine.plan(ids.shape[0], ids.shape[1], max_new_tokens)
    engine.check_memory(plan)
    logits, cache = engine.prefill(ids, mask, plan)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    first = sample_token(logits, sub, sp)
    out, _ = engine._loop(
        engine.params, cache, first, key, max_new_tokens, sp, eos_ids(eos_token_id)
    )
    return np.asarray(out)


def generate_stream(
    engine: Engine,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
) -> Iterator[np.ndarray]:
    """Like `generate`, yielding each step's tokens [B] as soon as they are decoded."""
    ids, mask = _as_batch(input_ids, attention_mask)
    plan = engine.plan(ids.shape[0], ids.shape[1], max_new_tokens)
    engine.check_memory(plan)
    logits, cache = engine.prefill(ids, mask, plan)
    yield from stream_after_prefill(
        engine, logits, cache, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
        eos_token_id=eos_token_id,
    )  # fmt: skip


def stream_after_prefill(
    engine: Engine,
    logits: jax.Array,
    cache: dict,
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    seed: int,
    eos_token_id: int | Sequence[int] | None,
) -> Iterator[np.ndarray]:
    """Decode one jitted step at a time from prefill logits [B,V] and its cache, yielding each
    step's tokens [B]; rows that finished repeat eos; stops when every row is done."""
    eos = np.asarray(eos_ids(eos_token_id))
    key, sub = jax.random.split(jax.random.key(seed))
    tok = sample_token(logits, sub, sampling)
    done = np.zeros(logits.shape[0], bool)
    for _ in range(max_new_tokens):
        host = np.where(done, eos[0], np.asarray(tok))
        yield host
        done |= np.isin(host, eos)
        if done.all():
            return
        key, sub = jax.random.split(key)
        tok, _, cache = engine._step(engine.params, cache, jnp.asarray(host), sub, sampling)
