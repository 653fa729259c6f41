"""Prints a model configuration's shape, layer pattern and parameter counts.

Usage::

    python -m minimax_jax.info --preset minimax-m1-80k
    python -m minimax_jax.info --hf_config /path/to/checkpoint_dir_or_config.json
    python -m minimax_jax.info --hf_config MiniMaxAI/MiniMax-M1-80k   # fetches config.json only
    minimax-jax-info --preset tiny-remote          # console script (setup.cfg)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags

from minimax_jax import cli, paths
from minimax_jax.config import FULL, ModelConfig

_PRESET = flags.DEFINE_string("preset", None, "Preset name from the configs package.")
_CONFIG = flags.DEFINE_string(
    "hf_config", None, "HF config.json, a directory holding one, a hub id or a URL."
)


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _pattern(cfg: ModelConfig) -> str:
    """``"LLLLLLLF x 10"``: one letter per layer of the repeating block (L lightning, F full)."""
    block = "".join("F" if t == FULL else "L" for t in cfg.block_pattern)
    return f"{block} x {cfg.num_blocks}"


def describe(*, preset: str | None = None, config: str | os.PathLike | None = None) -> str:
    """Summary of a preset or HF config as text; exactly one of ``preset``/``config``.

    Raises:
      ValueError: neither or both given, unknown preset, or an invalid config.
      FileNotFoundError: ``config`` does not exist.
    """
    if (preset is None) == (config is None):
        raise ValueError("give exactly one of --preset or --hf_config")
    if preset is not None:
        cfg = ModelConfig.preset(preset)
    else:  # a local file or directory, a hub id (its config.json alone is fetched) or a URL
        with paths.as_local(config, "--hf_config", patterns=paths.CONFIG_FILES) as local:
            cfg = ModelConfig.from_hf(local)
    total, active = cfg.param_count(), cfg.active_param_count()
    rope = "full" if cfg.rotary_dim == cfg.head_dim else f"partial {cfg.rotary_dim}/{cfg.head_dim}"
    lines = [
        f"source:        {preset or config} ({cfg.schema} schema, {cfg.architecture})",
        f"layers:        {cfg.num_layers} ({cfg.num_lightning_layers} lightning, "
        f"{cfg.num_full_layers} softmax)",
        f"pattern:       {_pattern(cfg)} (period {cfg.period})",
        f"hidden:        D={cfg.hidden_size}, heads N={cfg.num_heads} x H={cfg.head_dim}, "
        f"kv heads K={cfg.num_kv_heads}",
        f"moe:           E={cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, "
        f"F={cfg.intermediate_size}",
        f"vocab:         {cfg.vocab_size} (tied embeddings: {cfg.tie_word_embeddings})",
        f"rope:          {rope}, theta {cfg.rope_theta:g}",
        f"lightning:     block {cfg.block_size}, slopes '{cfg.slope_formula}'",
        f"residual:      postnorm={cfg.postnorm}, alpha/beta linear "
        f"{cfg.linear_attn_alpha:g}/{cfg.linear_attn_beta:g}, full "
        f"{cfg.full_attn_alpha:g}/{cfg.full_attn_beta:g}, mlp {cfg.mlp_alpha:g}/{cfg.mlp_beta:g}",
        f"params:        {total:,} ({_human(total)})",
        f"active/token:  {active:,} ({_human(active)}; excludes embedding and lm_head)",
        f"bf16 bytes:    {2 * total:,} ({2 * total / 2**30:.2f} GiB)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """absl entry point: prints ``describe(...)``; returns the exit code (bad input -> one line
    on stderr, 2)."""
    if len(argv) > 1:
        print(f"error: unexpected arguments {list(argv[1:])}", file=sys.stderr)
        return cli.EXIT_USAGE
    try:
        cli.guard(lambda: print(describe(preset=_PRESET.value, config=_CONFIG.value)))
    except SystemExit as e:
        return int(e.code or 0)
    return cli.EXIT_OK


def run() -> None:
    """Console-script entry point (``minimax-jax-info``)."""
    cli.run(main, __doc__, (_PRESET, _CONFIG))


if __name__ == "__main__":
    run()
