"""A short demo on CPU: a random tiny MiniMax (one 7+1 block, 4 experts), batched with left padding.

    python -m minimax_jax.demo [--preset tiny-remote] [--new_tokens 8]

Runs one jitted forward over a left-padded batch, checks each padded row against the same row run
alone, greedy-decodes a few tokens by repeated forwards, and prints the full MiniMax-M1 parameter
count from `jax.eval_shape` (nothing allocated). Replaced by `python -m minimax_jax.generate` once
the trained demo model exists.
"""

import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.ops.decoder import forward

_PRESET = flags.DEFINE_string("preset", "tiny-remote", "Model preset (configs/*.json).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 8, "Greedy tokens to decode.")


def run_demo(*, preset: str, new_tokens: int, seed: int = 0) -> dict:
    """Returns what it printed as numbers (tests call this)."""
    cfg = ModelConfig.preset(preset)
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(seed))
    params = model.pure_params()
    fwd = jax.jit(lambda p, i, m: forward(cfg, p, i, m)[0])
    rng = np.random.RandomState(seed)
    lengths = [24, 9, 3]
    ids = rng.randint(0, cfg.vocab_size, (len(lengths), max(lengths))).astype(np.int32)
    mask = np.arange(max(lengths))[None] >= max(lengths) - np.array(lengths)[:, None]
    start = time.perf_counter()
    logits = np.asarray(fwd(params, ids, mask.astype(np.int32)))
    first_s = time.perf_counter() - start
    worst = 0.0
    for i, n in enumerate(lengths):
        alone = np.asarray(fwd(params, ids[i : i + 1, -n:], np.ones((1, n), np.int32)))[0]
        worst = max(worst, float(np.abs(logits[i, -n:] - alone).max() / np.abs(alone).max()))
    seq = ids[:1, -lengths[0] :]
    for _ in range(new_tokens):
        nxt = np.asarray(fwd(params, seq, np.ones_like(seq)))[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], axis=1)
    full = ModelConfig.preset("minimax-m1-80k")
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(full, rngs=nnx.Rngs(0)))
    n_full = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    pattern = "".join("L" if k == "linear_attention" else "F" for k in cfg.layer_types)
    print(
        f"preset {preset}: {cfg.num_layers} layers ({pattern}), {cfg.param_count():,} params "
        f"on {jax.devices()[0].platform}"
    )
    print(
        f"forward [3, {max(lengths)}] with left padding: {first_s:.2f}s incl. compile; "
        f"padded rows vs alone: max rel err {worst:.1e}"
    )
    print(f"greedy continuation: {seq[0, -new_tokens:].tolist()}")
    print(f"MiniMax-M1 (eval_shape, nothing allocated): {n_full:,} parameters")
    return {"pad_rel_err": worst, "full_params": n_full, "tokens": seq[0, -new_tokens:].tolist()}


def main(argv):
    del argv
    try:
        run_demo(preset=_PRESET.value, new_tokens=_NEW_TOKENS.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
