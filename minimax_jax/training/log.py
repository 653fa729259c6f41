"""Run logging: ``metrics.jsonl``, TensorBoard events, and a progress bar or plain lines.

Only the main process writes. On resume, lines of ``metrics.jsonl`` past the restored step are
dropped first, so the file always describes one consistent run. TensorBoard events need the
optional ``tensorboardX`` package (``pip install tensorboardX``); without it they are skipped
with one note on stderr.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

METRICS_FILE = "metrics.jsonl"
_SHOWN = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")


def _truncate(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(kept)


def read_metrics(workdir: str) -> list[dict]:
    """All lines of ``WORKDIR/metrics.jsonl`` as dicts."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Writes step and eval metrics; shows progress on a TTY, plain lines otherwise."""

    def __init__(self, workdir: str, start: int, total: int, *, is_main: bool, every: int = 1):
        self.is_main = is_main
        self.start = start
        self.every = every
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb = None
        self.bar = None
        if not is_main:
            return
        _truncate(self.path, start)
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start + 1)
        except ImportError:
            print("train: tensorboardX not installed, no TensorBoard events", file=sys.stderr)
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines instead of a bar
                return
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def _write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}  # fmt: skip
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
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
