"""Train a MiniMax-01 model: one command, a YAML run config, exact resume after preemption.

    python -m minimax_jax.train --config configs/train/demo.yaml --workdir /tmp/demo \
        [--steps N] [--set optim.lr=1e-3 ...]
    python -m minimax_jax.train --export DIR --workdir /tmp/demo [--export_dtype bfloat16]
    python -m minimax_jax.train --plot /tmp/demo [--plot_out curves.png]

The run writes ``WORKDIR/metrics.jsonl`` (one JSON line per logged step: step, loss, lr,
grad_norm, tokens_per_s, mfu, ...; eval lines carry eval_loss and eval_ppl), TensorBoard events
under ``WORKDIR/tb`` (when tensorboardX is installed) and Orbax checkpoints under
``WORKDIR/checkpoints``. Starting again with the same WORKDIR restores the newest checkpoint
(params, optimizer state, step, data iterator) and continues bit-for-bit. SIGTERM (preemption)
saves a checkpoint and returns cleanly. Everything the user can get wrong (config keys, data
paths, empty data, tokenizer vs model vocabulary) is checked before anything is compiled.
The resolved run config is written to ``WORKDIR/run_config.yaml`` at start. Started on every
host of a TPU slice (or under Slurm / Open MPI) the hosts join one job (``--distributed``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags, logging

from minimax_jax import cli
from minimax_jax.distributed import MODES as DISTRIBUTED_MODES
from minimax_jax.training import run_config as tc
from minimax_jax.training.loop import export, train
from minimax_jax.training.plot import plot_run

_CONFIG = flags.DEFINE_string("config", None, "YAML run config (configs/train/*.yaml).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (local or a gs:// / s3:// URL): metrics, events, checkpoints."
)
_STEPS = flags.DEFINE_integer("steps", None, "Override train.steps.")
_SET = flags.DEFINE_multi_string("set", [], "Override one key: section.key=value (YAML value).")
_EXPORT = flags.DEFINE_string(
    "export", None, "Write the newest checkpoint of --workdir as an HF directory (or URL), exit."
)
_EXPORT_DTYPE = flags.DEFINE_enum(
    "export_dtype", "float32", ["float32", "bfloat16", "float16"], "Weight dtype of --export."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "With --export: replace DIR if it holds only an earlier export."
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    None,
    list(DISTRIBUTED_MODES),
    "Join a multi-process job (jax.distributed): auto = when the environment shows one (a TPU "
    "slice of several hosts, Slurm, Open MPI, JAX_COORDINATOR_ADDRESS); on = always (JAX "
    "detects the cluster); off = never. Default: the run config's train.distributed (auto).",
)
_PLOT = flags.DEFINE_string(
    "plot", None, "Render WORKDIR's metrics.jsonl (loss, lr, throughput) as a PNG and exit."
)
_PLOT_OUT = flags.DEFINE_string(
    "plot_out", None, "With --plot: the PNG (default WORKDIR/metrics.png)."
)
_HOLDERS = (_CONFIG, _WORKDIR, _STEPS, _SET, _EXPORT, _EXPORT_DTYPE, _OVERWRITE, _DISTRIBUTED,
            _PLOT, _PLOT_OUT)  # fmt: skip


def main(argv: Sequence[str]) -> None:
    del argv  # stray arguments are refused by cli.run
    if not cli.DEBUG.value:
        # Orbax logs a failed save's tracebacks from its threads; the error line says it all.
        logging.set_verbosity(logging.FATAL)
    cli.guard(_work, hard_exit=True)


def _work() -> None:
    if _PLOT.value:
        print(f"wrote {plot_run(_PLOT.value, _PLOT_OUT.value)}")
        return
    if _PLOT_OUT.value:
        raise cli.UsageError("--plot_out needs --plot WORKDIR")
    if not _WORKDIR.value:
        raise cli.UsageError("--workdir is required (see --help)")
    if _EXPORT.value:
        files = export(
            workdir=_WORKDIR.value,
            out_dir=_EXPORT.value,
            dtype=_EXPORT_DTYPE.value,
            overwrite=_OVERWRITE.value,
        )
        print(f"exported {', '.join(files)} to {_EXPORT.value}")
        return
    if not _CONFIG.value:
        raise cli.UsageError("--config is required (see --help)")
    if _STEPS.value is not None and _STEPS.value < 1:
        raise cli.UsageError(f"--steps {_STEPS.value}: must be >= 1")
    overrides = list(_SET.value)
    if _DISTRIBUTED.value is not None:
        overrides.append(f"train.distributed={_DISTRIBUTED.value}")
    config = tc.load(_CONFIG.value, overrides)
    summary = train(config=config, workdir=_WORKDIR.value, steps=_STEPS.value)
    summary.pop("state", None)
    print(json.dumps(summary))


def run() -> None:
    """Console-script entry point (``minimax-jax-train``)."""
    cli.run(main, __doc__, _HOLDERS)


if __name__ == "__main__":
    run()
