"""Figures of the committed results (`experiments/results/*.jsonl`), one PNG per topic.

    python experiments/plot.py [--results experiments/results] [--out experiments/results/plots]

| file | what (rows; ratios are taken within one run, as in RESULTS.md) |
|---|---|
| kernels.png | lightning kernel vs FLA, fwd / fwd+bwd / decode (run `final`); packed rows vs XLA |
| decode.png | decode tok/s vs batch beside transformers (newest run with both); batch-1 history |
| prefill.png | prefill us/token vs length, hybrid and lightning-only models, per run |
| moe.png | MoE layer vs the dense FFN by tokens (newest run per size); EP=2 per GPU vs one GPU |
| training.png | training-step MFU and tokens/s (`bench_train`, the full-width slice) |

Every point is a committed row; each panel names its run tags. Needs matplotlib (extra ``plot``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimax_jax import files  # noqa: E402
from minimax_jax.cli import UsageError  # noqa: E402
from minimax_jax.training.plot import pyplot  # noqa: E402

HERE = Path(__file__).resolve().parent
SOFTWARE = "experiments/plot.py"
_K = 1024


def load(results: str | os.PathLike) -> dict[str, list[dict]]:
    """{file stem: rows} of every ``*.jsonl`` under ``results``, each row with ``_order``, the
    index of its run tag's first row in that file (rows are appended run by run)."""
    out = {}
    for path in sorted(Path(results).glob("*.jsonl")):
        rows, first = [], {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                row = files.parse_json(line, f"{path}:{n}")
                row["_order"] = first.setdefault(row.get("run"), len(first))
                rows.append(row)
        out[path.stem] = rows
    return out


def _tag(run: str | None) -> str:
    return run or "untagged"


def _shape(r: dict) -> str:
    t = r["T"]
    return f"B{r['B']} N{r['N']} T{t // _K}K" if t >= _K else f"B{r['B']} N{r['N']}"


def _length_ticks(ax, values) -> None:
    """A log-2 x axis with ticks at ``values``, labelled 4K, 1M, ..."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(values))
    labels = [f"{v // _K**2}M" if v >= _K**2 else f"{v // _K}K" if v >= _K else str(v)
              for v in ticks]  # fmt: skip
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()


def _bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=label)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)


def kernels(rows: dict[str, list[dict]]):
    """Lightning attention: our GPU kernel's speed-up over FLA by shape and pass (run final),
    decode vs FLA, and the packed-rows kernel vs the XLA scan (run r20-h200)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=100)
    final = [r for r in rows["bench_lightning"] if r.get("run") == "final"]
    ratio = {(r["impl"], r["pass"], _shape(r)): r["speedup_vs_fla"] for r in final
             if r.get("speedup_vs_fla")}  # fmt: skip
    shapes = list(dict.fromkeys(_shape(r) for r in final if r["pass"] == "fwd" and r["T"] > 1))
    _bars(axes[0], shapes, {p: [ratio.get(("gpu", p, s)) for s in shapes]
                            for p in ("fwd", "fwd_bwd")})  # fmt: skip
    axes[0].set_title("lightning kernel / FLA chunk_simple_gla (run final)", fontsize=9)
    decode = list(dict.fromkeys(_shape(r) for r in final if r["pass"] == "decode"))
    _bars(axes[1], decode, {i: [ratio.get((i, "decode", s)) for s in decode]
                            for i in ("gpu", "xla")})  # fmt: skip
    axes[1].set_title("decode step / FLA fused_recurrent (run final)", fontsize=9)
    packed = [r for r in rows["bench_lightning"] if r.get("run") == "r20-h200" and r.get("ms")]
    ms = {(r["impl"], r["pass"], r["T"]): r["ms"] for r in packed}
    lengths = sorted({r["T"] for r in packed})
    _bars(axes[2], [f"T{t // _K}K" for t in lengths],
          {p: [ms[("xla_packed", p, t)] / ms[("gpu_packed", p, t)] for t in lengths]
           for p in ("fwd", "fwd_bwd")})  # fmt: skip
    axes[2].set_title("packed rows: kernel / XLA chunked scan (run r20-h200)", fontsize=9)
    for ax in axes:
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_ylabel("speed-up (x, > 1: ours faster)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _decode_rows(rows: dict[str, list[dict]]) -> list[dict]:
    """Decode rows of the default configuration (minimax_jax) and of transformers."""
    return [r for r in rows["bench_generate"]
            if r.get("tokens_per_s") and r.get("prompt")
            and (r["impl"] == "transformers.generate"
                 or r.get("variant") in (None, "default", "base"))]  # fmt: skip


def decode(rows: dict[str, list[dict]]):
    """Decode tokens/s against batch, ours and transformers' `generate`, from the newest run that
    has both at two or more batch sizes; and the batch-1 history over runs."""
    plt = pyplot()
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=100)
    dec = _decode_rows(rows)
    both = [r for r in dec if {"minimax_jax", "transformers.generate"} <= {
        x["impl"] for x in dec if x.get("run") == r.get("run")} and len(
        {x["batch"] for x in dec if x.get("run") == r.get("run")}) > 1]  # fmt: skip
    newest = max(both, key=lambda r: r["_order"])
    run = [r for r in dec if r.get("run") == newest.get("run")]
    for impl, style in (("minimax_jax", "o-"), ("transformers.generate", "s--")):
        pts = sorted({r["batch"]: r["tokens_per_s"] for r in run if r["impl"] == impl}.items())
        ax.plot([b for b, _ in pts], [t for _, t in pts], style, label=impl)
        for b, t in pts:
            ax.annotate(f"{t:.0f}", (b, t), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({r["batch"] for r in run})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.margins(x=0.1, y=0.15)
    ax.set_xlabel("batch")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"decode, 1.55B hybrid MoE, bf16 (run {_tag(newest.get('run'))})", fontsize=9)
    ax.legend(fontsize=8)
    runs = sorted({r["_order"]: _tag(r.get("run")) for r in dec}.items())
    for impl, style in (("minimax_jax", "o-"), ("transformers.generate", "s--")):
        by_run = {}
        for r in dec:
            if r["impl"] == impl and r["batch"] == 1:
                by_run.setdefault(r["_order"], r["tokens_per_s"])
        xs = [i for i, (order, _) in enumerate(runs) if order in by_run]
        hist.plot(xs, [by_run[runs[i][0]] for i in xs], style, label=impl)
    return _by_run_panel(fig, ax, hist, [t for _, t in runs], "tokens/s at batch 1",
                         "batch-1 decode by run (default configuration of each run)")  # fmt: skip


def _by_run_panel(fig, ax, hist, tags: list[str], ylabel: str, title: str):
    """Finishes a two-panel figure whose right panel has one x tick per run: labels, legends,
    grids, layout."""
    hist.set_xticks(range(len(tags)), tags, rotation=45, fontsize=7)
    hist.set_ylabel(ylabel)
    hist.set_title(title, fontsize=9)
    hist.legend(fontsize=8)
    for a in (ax, hist):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _device(r: dict) -> str:
    return str(r.get("device", "")).replace("NVIDIA ", "").split(" ")[0]


def prefill(rows: dict[str, list[dict]]):
    """Prefill microseconds per token against prompt length: hybrid (softmax + lightning) and
    lightning-only models, one line per run and model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    lines: dict[tuple, list] = {}
    for r in rows.get("long_context", []):
        if r.get("kind") == "prefill":
            lines.setdefault((_tag(r.get("run")), r["model"], _device(r)), []).append(r)
    for r in rows["bench_generate"]:
        if "prefill[" in r["impl"]:
            model = r["impl"].split("[")[1].rstrip("]")
            lines.setdefault((_tag(r.get("run")), model, _device(r)), []).append(r)
    for (run, model, device), pts in lines.items():
        pts = sorted(pts, key=lambda r: r["tokens"])
        style = "o-" if model == "hybrid" else "s--"
        ax.plot([r["tokens"] for r in pts], [r["us_per_token"] for r in pts], style,
                label=f"{model}, run {run} ({device})")  # fmt: skip
    _length_ticks(ax, [r["tokens"] for pts in lines.values() for r in pts])
    ax.set_xlabel("prompt tokens (batch 1)")
    ax.set_ylabel("prefill us/token")
    ax.set_title("prefill, 1.55B model (hybrid: 14 lightning + 2 softmax layers)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def moe(rows: dict[str, list[dict]]):
    """The MoE layer's speed as a share of the dense FFN over the same rows (newest run per token
    count), with the goals; and the EP=2 layer per GPU against one GPU, run by run."""
    plt = pyplot()
    fig, (ax, ep) = plt.subplots(1, 2, figsize=(13, 4.4), dpi=100)
    newest: dict[tuple, dict] = {}
    for r in rows["bench_moe"]:
        if r["what"] == "layer_ratio" and r.get("vs_dense") and r.get("impl"):
            key = (r["impl"], r["mode"], r["tokens"])
            if key not in newest or r["_order"] >= newest[key]["_order"]:
                newest[key] = r
    runs = sorted({_tag(r.get("run")) for r in newest.values()})
    for impl, mode in sorted({k[:2] for k in newest}):
        pts = sorted((k[2], r["vs_dense"]) for k, r in newest.items() if k[:2] == (impl, mode))
        ax.plot([t for t, _ in pts], [v for _, v in pts], "o-" if mode == "fwd" else "s--",
                label=f"{impl} {mode}")  # fmt: skip
    for mode, goal in {(r["mode"], r["goal_vs_dense"]) for r in newest.values()}:
        ax.axhline(goal, color="gray", lw=0.8, ls=":")
        ax.annotate(f"goal {mode} {goal}", (ax.get_xlim()[0], goal), fontsize=7, va="bottom")
    _length_ticks(ax, [k[2] for k in newest])
    ax.set_xlabel("tokens")
    ax.set_ylabel("layer speed / dense FFN speed")
    ax.set_title(f"MoE layer E=32 top-2, D=6144, F=9216 (runs {', '.join(runs)})", fontsize=9)
    ax.legend(fontsize=8)
    layer_ep = [r for r in rows["bench_moe"] if r["what"] == "layer_ep" and r["mode"] == "fwd"
                and r.get("per_gpu_vs_single")]  # fmt: skip
    order = sorted({r["_order"]: _tag(r.get("run")) for r in layer_ep}.items())
    for cap, style in ((None, "o-"), (1.25, "s--")):
        best = {}
        for r in layer_ep:
            if r.get("capacity_factor") == cap:
                best[r["_order"]] = max(best.get(r["_order"], 0), r["per_gpu_vs_single"])
        xs = [i for i, (o, _) in enumerate(order) if o in best]
        ep.plot(xs, [best[order[i][0]] for i in xs], style,
                label="dropless" if cap is None else f"capacity {cap}")  # fmt: skip
    return _by_run_panel(fig, ax, ep, [t for _, t in order], "per-GPU speed / one-GPU layer",
                         "EP=2 forward, 64K tokens, two H200 (best row of each run)")  # fmt: skip


def training(rows: dict[str, list[dict]]):
    """Training-step MFU by sequence length (bench_train) with the 40% goal, and tokens/s of the
    training rows (bench_train, the full-width 2-layer slice on two GPUs)."""
    plt = pyplot()
    fig, (ax, tok) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    bench = sorted((r for r in rows["bench_train"] if r.get("mfu")), key=lambda r: r["seq_len"])
    labels = [f"{r['seq_len'] // _K}K" for r in bench]
    ax.bar(labels, [100 * r["mfu"] for r in bench], color="tab:blue")
    ax.axhline(40, color="gray", ls=":", lw=0.8)
    ax.annotate("goal 40%", (0, 40), fontsize=7, va="bottom")
    runs = ", ".join(sorted({_tag(r.get("run")) for r in bench}))
    active = bench[0]["active_params"] / 1e9 if bench else 0
    ax.set_title(f"MFU, {active:.2f}B-active hybrid MoE, 1 GPU (run {runs})", fontsize=9)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("MFU (%)")
    full = [r for r in rows.get("fullscale_x2_train", []) if r.get("tokens_per_s")]
    groups = {f"{active:.2f}B-active hybrid MoE ({_device(r)} x1)": bench for r in bench[:1]}
    if full:
        groups[f"Text-01 slice, {full[0]['layers']} layers ({_device(full[0])} x2)"] = full
    for label, pts in groups.items():
        pts = sorted(pts, key=lambda r: r["seq_len"])
        tok.plot([r["seq_len"] for r in pts], [r["tokens_per_s"] for r in pts], "o-", label=label)
    _length_ticks(tok, [r["seq_len"] for pts in groups.values() for r in pts])
    tok.set_ylim(bottom=0)
    tok.set_xlabel("sequence length")
    tok.set_ylabel("tokens/s")
    tags = sorted({_tag(r.get("run")) for pts in groups.values() for r in pts})
    tok.set_title(f"training-step throughput (runs {', '.join(tags)})", fontsize=9)
    tok.legend(fontsize=8)
    for a in (ax, tok):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


FIGURES: dict[str, Callable] = {"kernels": kernels, "decode": decode, "prefill": prefill,
                                "moe": moe, "training": training}  # fmt: skip


def write(fig, path: Path) -> None:
    """Saves a figure as a PNG through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", metadata={"Software": SOFTWARE})
    pyplot().close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--out", default=str(HERE / "results" / "plots"))
    p.add_argument("--only", action="append", choices=sorted(FIGURES), help="repeatable")
    args = p.parse_args(argv)
    rows = load(args.results)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for name in args.only or FIGURES:
        path = Path(args.out) / f"{name}.png"
        write(FIGURES[name](rows), path)
        written.append(path)
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    try:
        main()
    except (UsageError, files.InputFileError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
