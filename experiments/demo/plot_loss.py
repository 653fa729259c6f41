"""Loss curve of a training run (``metrics.jsonl`` of `minimax_jax.train`) as a PNG.

    python experiments/demo/plot_loss.py /tmp/demo/metrics.jsonl \
        minimax_jax/demo_model/loss_curve.png

Train loss (every logged step, and its running mean over 10 logged steps) and the in-loop
held-out loss against tokens seen; the learning rate on a second axis. Needs matplotlib (not a
project dependency: ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics")
    p.add_argument("out")
    p.add_argument("--tokens_per_step", type=int, default=16 * 2048)  # demo_gpu.yaml: 16 x 2048
    p.add_argument("--title", default="demo model (configs/train/demo_gpu.yaml)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(args.metrics) if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    mtok = args.tokens_per_step / 1e6
    x = np.array([r["step"] for r in train]) * mtok
    loss = np.array([r["loss"] for r in train])
    k = min(10, len(loss))
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(x, loss, color="tab:blue", alpha=0.25, lw=0.8, label="train loss (logged steps)")
    ax.plot(x[k - 1 :], smooth, color="tab:blue", lw=1.6, label=f"train loss (mean of {k})")
    label = "in-loop eval loss (1% of the corpus files)"
    ax.plot([r["step"] * mtok for r in evals], [r["eval_loss"] for r in evals], "o-",
            color="tab:red", lw=1.6, ms=4, label=label)  # fmt: skip
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(max(0.0, min(loss.min(), min(r["eval_loss"] for r in evals)) - 0.2), 6.0)
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(x, [r["lr"] for r in train], color="tab:gray", ls="--", lw=1, label="learning rate")
    lr.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + lr.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper right", fontsize=8)
    ax.set_title(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
