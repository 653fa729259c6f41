"""Train a MiniMax-01 model: one command, a YAML run config, exact resume after preemption.

    python -m minimax_jax.train --config configs/train/demo.yaml --workdir /tmp/demo \
        [--steps N] [--set optim.lr=1e-3 ...]
    python -m minimax_jax.train --export DIR --workdir /tmp/demo [--export_dtype bfloat16]

The run writes ``WORKDIR/metrics.jsonl`` (one JSON line per logged step: step, loss, lr,
grad_norm, tokens_per_s, mfu, ...; eval lines carry eval_loss and eval_ppl), TensorBoard events
under ``WORKDIR/tb`` (when tensorboardX is installed) and Orbax checkpoints under
``WORKDIR/checkpoints``. Starting again with the same WORKDIR restores the newest checkpoint
(params, optimizer state, step, data iterator) and continues bit-for-bit. SIGTERM (preemption)
saves a checkpoint and returns cleanly. Everything the user can get wrong (config keys, data
paths, empty data, tokenizer vs model vocabulary) is checked before anything is compiled.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags, logging

from minimax_jax.training import run_config as tc
from minimax_jax.training.loop import TrainError, export, train

_CONFIG = flags.DEFINE_string("config", None, "YAML run config (configs/train/*.yaml).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: metrics, events, checkpoints.")
_STEPS = flags.DEFINE_integer("steps", None, "Override train.steps.")
_SET = flags.DEFINE_multi_string("set", [], "Override one key: section.key=value (YAML value).")
_EXPORT = flags.DEFINE_string(
    "export", None, "Write the newest checkpoint of --workdir as an HF directory and exit."
)
_EXPORT_DTYPE = flags.DEFINE_string("export_dtype", "float32", "Weight dtype of --export.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        print(f"train: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        if not _WORKDIR.value:
            raise tc.ConfigError("--workdir is required")
        if _EXPORT.value:
            files = export(workdir=_WORKDIR.value, out_dir=_EXPORT.value, dtype=_EXPORT_DTYPE.value)
            print(f"exported {', '.join(files)} to {_EXPORT.value}")
            return
        if not _CONFIG.value:
            raise tc.ConfigError("--config is required")
        config = tc.load(_CONFIG.value, _SET.value)
        summary = train(config=config, workdir=_WORKDIR.value, steps=_STEPS.value)
    except (ValueError, OSError, TrainError) as e:  # ConfigError and DataError are ValueErrors
        print(f"train: error: {e}", file=sys.stderr)
        sys.exit(1)
    summary.pop("state", None)
    print(json.dumps(summary))


def run() -> None:
    """Console-script entry point (``minimax-jax-train``)."""
    app.run(main)


if __name__ == "__main__":
    run()
