"""Lightning attention (MiniMax-01 linear attention with per-head exponential decay): dispatcher.

Einsum letters: B batch, T sequence length, N heads, H head dim, C block (chunk) length.

    lightning_attention(q, k, v, slopes, *, initial_state=None, segment_ids=None,
                        implementation="auto", block_size=None) -> (o, final_state)
    lightning_decode(q, k, v, slopes, state, *, implementation="auto") -> (o, new_state)

Per head with slope s (no 1/sqrt(H) scale):  S_t = exp(-s) S_{t-1} + k_t^T v_t ;  o_t = q_t S_t.
q, k, v [B, T, N, H] any float dtype; slopes [N] fp32; states [B, N, H, H] fp32; o has q's dtype.
segment_ids [B, T] int32: the state restarts from zero at every change of id (`initial_state`
applies to the tokens before the first change); final_state is the state after the last token.
Gradients flow to q, k, v and initial_state (explicit custom_vjp backward in xla/tpu); slopes get
zero gradient. Any T (padded internally with identity steps).

Implementations: "reference" (token scan, tests only), "xla" (chunked scan; the CPU path and
always-working fallback), "tpu" (Pallas Mosaic kernel), "gpu" (Pallas Triton kernels,
`pallas_kernels.lightning.gpu`: its adapters `lightning_attention(q, k, v, slopes, *,
initial_state, segment_ids, block_size)` and `lightning_decode(q, k, v, slopes, state)`; in
interpret mode `lightning_attention_gpu` / `lightning_decode_gpu` with `interpret=True`).
"auto": tpu on TPU, gpu on GPU, else xla; "auto" also falls back to xla for inputs the gpu
kernels do not support (head dims that are not powers of two >= 16).
Pallas kernels run on CPU in interpret mode inside `with interpret_mode():` (or
`set_interpret(True)`), which is how the tests exercise them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax

from pallas_kernels import platform
from pallas_kernels.lightning import decode as _decode
from pallas_kernels.lightning import gpu as _gpu
from pallas_kernels.lightning import reference as _reference
from pallas_kernels.lightning import tpu as _tpu
from pallas_kernels.lightning import xla as _xla

__all__ = [
    "IMPLEMENTATIONS",
    "LightningConfig",
    "interpret_mode",
    "lightning_attention",
    "lightning_decode",
    "resolve_implementation",
    "set_interpret",
]

IMPLEMENTATIONS = ("auto", "reference", "xla", "tpu", "gpu")

_INTERPRET = False


def set_interpret(value: bool) -> None:
    """Run the Pallas implementations ("tpu", "gpu") in interpret mode (CPU) from now on."""
    global _INTERPRET
    _INTERPRET = bool(value)


@contextlib.contextmanager
def interpret_mode(value: bool = True) -> Iterator[None]:
    """Context manager form of `set_interpret` (applies at trace time)."""
    old = _INTERPRET
    set_interpret(value)
    try:
        yield
    finally:
        set_interpret(old)


@dataclasses.dataclass(frozen=True)
class LightningConfig:
    """Validated dispatch options. block_size None = the implementation's default (256)."""

    implementation: str = "auto"
    block_size: int | None = None

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}"
            )
        if self.block_size is not None:
            if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
                raise ValueError(f"block_size must be an int or None, got {self.block_size!r}")
            if self.block_size < 1:
                raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def resolve_implementation(implementation: str = "auto") -> str:
    """Map "auto" to a concrete implementation for the default backend."""
    LightningConfig(implementation=implementation)
    if implementation != "auto":
        return implementation
    if platform.on_tpu():
        return "tpu"
    if platform.on_gpu():
        return "gpu"
    return "xla"


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str = "auto",
    block_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Lightning attention over a sequence. Returns (o [B, T, N, H] q.dtype, S [B, N, H, H] f32)."""
    cfg = LightningConfig(implementation=implementation, block_size=block_size)
    _reference.check_inputs(q, k, v, slopes, initial_state, segment_ids)
    impl = resolve_implementation(cfg.implementation)
    slopes = jax.lax.stop_gradient(slopes.astype("float32"))
    kwargs = dict(initial_state=initial_state, segment_ids=segment_ids)
    if impl == "reference":
        return _reference.lightning_attention_reference(q, k, v, slopes, **kwargs)
    if impl == "xla":
        return _xla.lightning_attention_xla(q, k, v, slopes, block_size=cfg.block_size, **kwargs)
    if impl == "tpu":
        return _tpu.lightning_attention_tpu(
            q, k, v, slopes, block_size=cfg.block_size, interpret=_INTERPRET, **kwargs
        )
    # Packed rows (segment_ids) take the kernel too: on H200 it ran 3.8-6.4x faster than the XLA
    # chunked scan with ids, at 1.17-1.21x the kernel's own time without them
    # (experiments/results/bench_lightning.jsonl).
    if not _gpu_supports(q):
        if cfg.implementation == "auto":
            return _xla.lightning_attention_xla(
                q, k, v, slopes, block_size=cfg.block_size, **kwargs
            )
        raise ValueError(
            'implementation="gpu" needs head dims that are powers of two >= 16 '
            f'(got H={q.shape[-1]}); use implementation="auto" or "xla"'
        )
    if _INTERPRET:  # the adapter has no interpret flag; same block policy as the adapter
        block = cfg.block_size if cfg.block_size in (32, 64, 128) else None
        return _gpu.lightning_attention_gpu(
            q, k, v, slopes, initial_state, segment_ids=segment_ids, block_size=block,
            interpret=True,
        )  # fmt: skip
    # The adapter keeps its tuned block unless block_size is 32/64/128 (256 is a poor GPU tile).
    return _gpu.lightning_attention(
        q, k, v, slopes, initial_state=initial_state, segment_ids=segment_ids,
        block_size=cfg.block_size,
    )  # fmt: skip


def _gpu_supports(q: jax.Array) -> bool:
    """What the gpu kernels handle: head dim a power of two >= 16."""
    h = q.shape[-1]
    return h >= 16 and h & (h - 1) == 0


def lightning_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    state: jax.Array,
    *,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """One token per sequence: q, k, v [B, N, H], state [B, N, H, H] fp32 -> (o, new_state).

    "reference"/"xla": fused jnp update; "tpu": Pallas kernel over B*N rows; "gpu": the gpu
    module's `lightning_decode_gpu` (xla update when H is not a power of two >= 16). "auto":
    tpu on TPU, else xla (faster than the gpu kernel on H200). Only the jnp paths ("xla",
    "reference") are differentiable; the kernels are for inference.
    """
    cfg = LightningConfig(implementation=implementation)
    _decode.check_decode_inputs(q, k, v, slopes, state)
    impl = resolve_implementation(cfg.implementation)
    if impl == "gpu" and cfg.implementation == "auto":
        # Measured on H200 (experiments/RESULTS.md): XLA's fused update is 4-7% faster than the
        # Pallas decode kernel at B >= 64 and equal at B = 1, so "auto" keeps XLA for decode.
        impl = "xla"
    if impl == "tpu":
        return _decode.lightning_decode_pallas(q, k, v, slopes, state, interpret=_INTERPRET)
    if impl == "gpu" and _gpu_supports(q):
        if not isinstance(state, jax.core.Tracer):
            # The gpu kernel donates `state`; an eager caller keeps its array (under jit the
            # donation of an inner jit is moot, and the caller's jit decides).
            state = state.copy()
        if _INTERPRET:
            return _gpu.lightning_decode_gpu(q, k, v, slopes, state, interpret=True)
        return _gpu.lightning_decode(q, k, v, slopes, state)
    return _decode.lightning_decode_xla(q, k, v, slopes, state)
