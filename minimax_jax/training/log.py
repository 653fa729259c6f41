"""Run logging: ``metrics.jsonl``, TensorBoard events, and a progress bar or plain lines.

Only the main process writes. On resume, lines of ``metrics.jsonl`` past the restored step are
dropped first, so the file always describes one consistent run. TensorBoard events need the
optional ``tensorboardX`` package (``pip install tensorboardX``); without it they are skipped
with one note on stderr.

A URL WORKDIR (``gs://``, ``s3://``, ``az://``; ``minimax_jax.paths``): object stores cannot
append, so the lines are kept in memory and ``metrics.jsonl`` is rewritten whole (one object)
at most every ``flush_seconds`` and at ``close``; no TensorBoard events are written there (one
note on stderr).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from minimax_jax import paths

METRICS_FILE = "metrics.jsonl"
_SHOWN = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")


def _kept(path: str, last_step: int) -> list[str]:
    """The lines of ``path`` up to ``last_step`` ([] without the file)."""
    if not paths.exists(path):
        return []
    lines = paths.read_text(path).splitlines(keepends=True)
    return [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]


def _truncate(path: str, last_step: int) -> None:
    if os.path.exists(path):
        kept = _kept(path, last_step)
        with open(path, "w") as f:
            f.writelines(kept)


def read_metrics(workdir: str) -> list[dict]:
    """All lines of ``WORKDIR/metrics.jsonl`` (local or a URL) as dicts."""
    text = paths.read_text(paths.join(workdir, METRICS_FILE))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class MetricsLog:
    """Writes step and eval metrics; shows progress on a TTY, plain lines otherwise."""

    def __init__(
        self,
        workdir: str,
        start: int,
        total: int,
        *,
        is_main: bool,
        every: int = 1,
        flush_seconds: float = 30.0,
    ):
        self.is_main = is_main
        self.start = start
        self.every = every
        self.path = paths.join(workdir, METRICS_FILE)
        self.remote = paths.is_url(workdir)
        self.flush_seconds = flush_seconds
        self.tb = None
        self.bar = None
        if not is_main:
            return
        if self.remote:  # lines in memory, the object rewritten whole (see the module docstring)
            self.file = None
            self._lines = _kept(self.path, start)
            self._flushed = time.monotonic()
            self._flush()
            print("train: a URL --workdir gets no TensorBoard events", file=sys.stderr)
        else:
            _truncate(self.path, start)
            self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
            self._open_tensorboard(workdir, start)
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines instead of a bar
                return
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def _open_tensorboard(self, workdir: str, start: int) -> None:
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start + 1)
        except ImportError:
            print("train: tensorboardX not installed, no TensorBoard events", file=sys.stderr)

    def _flush(self, force: bool = True) -> None:
        """A URL workdir: rewrites ``metrics.jsonl`` if forced or ``flush_seconds`` passed."""
        if force or time.monotonic() - self._flushed >= self.flush_seconds:
            paths.write_text(self.path, "".join(self._lines))
            self._flushed = time.monotonic()

    def _write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}  # fmt: skip
        if self.remote:
            self._lines.append(json.dumps(clean) + "\n")
            self._flush(force=False)
        else:
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def step(self, metrics: dict[str, Any], *, force: bool = False) -> None:
        """One training step's metrics (written every ``every`` steps, or when forced)."""
        if not self.is_main:
            return
        step = metrics["step"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
            )
        if step % self.every and not force and step != self.start + 1:
            return
        self._write(metrics)
        if metrics.get("skipped"):
            self.note(f"step {step}: non-finite loss or gradient, update skipped")
        if self.bar is None:
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in _SHOWN)
            print(f"step {step} {shown}", file=sys.stderr, flush=True)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        self._write({"step": step, **metrics})
        loss, ppl = metrics["eval_loss"], metrics["eval_ppl"]
        self.note(f"eval step {step}: loss={loss:.4f} ppl={ppl:.2f}")

    def note(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self.remote:
            self._flush()
        else:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
