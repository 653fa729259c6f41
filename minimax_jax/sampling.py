"""Documented import path of the sampling engine (`minimax_jax.sampling.generate`); the code
lives in `minimax_jax.inference.engine`."""

from minimax_jax.inference.engine import (
    Engine,
    SamplingParams,
    generate,
    generate_stream,
    sample_token,
)

__all__ = ["Engine", "SamplingParams", "generate", "generate_stream", "sample_token"]
