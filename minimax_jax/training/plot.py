"""Curves of a training run (`python -m minimax_jax.train --plot WORKDIR`): loss (train and eval),
learning rate and throughput (tokens/s, MFU) of ``WORKDIR/metrics.jsonl`` against the step, as
one PNG.

Needs matplotlib (extra ``plot``: ``pip install 'minimax_jax[plot]'``), imported only here and only
when a plot is drawn. The PNG is written through a temporary file and a rename; an existing file
at the output path is replaced only when an earlier ``--plot`` wrote it (its PNG ``Software`` tag).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

from minimax_jax import files
from minimax_jax.cli import UsageError
from minimax_jax.training.log import METRICS_FILE

PLOT_FILE = "metrics.png"
SOFTWARE = "minimax_jax.train --plot"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display), or a one-line `UsageError` saying
    how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "plotting needs matplotlib, which is not installed: pip install 'minimax_jax[plot]' "
            "(or matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_rows(path: str) -> list[dict]:
    """The JSON lines of a metrics file (a bad line is an error naming the file and line)."""
    text = files.read_text(path, "a metrics.jsonl")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            rows.append(files.parse_json(line, f"{path}:{n}"))
    return rows


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows with a finite ``key``."""
    pairs = [(r["step"], r[key]) for r in rows
             if isinstance(r, dict) and isinstance(r.get("step"), int)
             and _finite(r.get(key))]  # fmt: skip
    return [p[0] for p in pairs], [p[1] for p in pairs]


def figure(rows: list[dict], title: str = "") -> Any:
    """A matplotlib Figure with three panels: loss, learning rate, tokens/s (MFU on the right)."""
    plt = pyplot()
    fig, (ax_loss, ax_lr, ax_tok) = plt.subplots(3, 1, figsize=(8, 9), dpi=100, sharex=True)
    steps, loss = _series(rows, "loss")
    ax_loss.plot(steps, loss, color="tab:blue", lw=1, label="train loss")
    e_steps, e_loss = _series(rows, "eval_loss")
    if e_steps:
        ax_loss.plot(e_steps, e_loss, "o-", color="tab:red", ms=3, lw=1.2, label="eval loss")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_lr.plot(*_series(rows, "lr"), color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_tok.plot(*_series(rows, "tokens_per_s"), color="tab:green", lw=1, label="tokens/s")
    ax_tok.set_ylabel("tokens/s")
    ax_tok.set_xlabel("step")
    # MFU is tokens/s times a constant of the run: a second scale on the same curve
    ratios = [r["mfu"] / r["tokens_per_s"] for r in rows
              if isinstance(r, dict) and _finite(r.get("mfu")) and _finite(r.get("tokens_per_s"))
              and r["tokens_per_s"] > 0 and r["mfu"] > 0]  # fmt: skip
    if ratios:
        k = 100 * sorted(ratios)[len(ratios) // 2]
        mfu = ax_tok.secondary_yaxis("right", functions=(lambda x: x * k, lambda y: y / k))
        mfu.set_ylabel("MFU (%)")
    for ax in (ax_loss, ax_lr, ax_tok):
        ax.grid(alpha=0.3)
    ax_loss.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_png(fig: Any, out: str) -> None:
    """Saves ``fig`` as a PNG tagged as ours, through a temporary file and a rename."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": SOFTWARE})
    pyplot().close(fig)
    files.write_atomic(out, buf.getvalue())


def _check_replaceable(out: str) -> None:
    if not os.path.exists(out):
        return
    from PIL import Image

    try:
        with Image.open(out) as image:
            ours = image.format == "PNG" and image.info.get("Software") == SOFTWARE
    except OSError:
        ours = False
    if not ours:
        raise UsageError(
            f"--plot_out {out} exists and was not written by train --plot: remove it or choose "
            "another --plot_out"
        )


def plot_run(workdir: str, out: str | None = None) -> str:
    """Renders ``WORKDIR/metrics.jsonl`` into ``out`` (default ``WORKDIR/metrics.png``)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--plot {workdir}: no {METRICS_FILE} there (not a train workdir)")
    rows = read_rows(path)
    if not _series(rows, "loss")[0]:
        raise UsageError(f"--plot {workdir}: {METRICS_FILE} has no training steps yet")
    out = out or os.path.join(workdir, PLOT_FILE)
    _check_replaceable(out)
    save_png(figure(rows, title=os.path.abspath(workdir)), out)
    return out
