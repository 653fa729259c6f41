"""Mark committed result rows that cannot be trusted (issue #24), without deleting them.

    python experiments/invalidate.py [--results experiments/results] [--check]

Each rule names a results file, which rows it concerns, the fields that are wrong
(`invalid_fields`; ["*"]: the row's main figure) and why (`invalid`). Rows the rules match get
both fields; running it again changes nothing. --check exits 1 (and lists them) when a matching
row is not marked yet. Files are rewritten through a temporary file and a rename.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Rule:
    file: str
    matches: Callable[[dict], bool]
    fields: tuple[str, ...]
    reason: str


def _gmm_linear_loss(r: dict) -> bool:
    return (
        r.get("what") in ("gmm", "gmm_ratio") and r.get("mode") == "fwd_bwd" and not r.get("loss")
    )


def _old(r: dict) -> bool:
    """A row written before the #24 harness (which records how it was timed)."""
    return "timing_method" not in r


RULES = (
    Rule("bench_moe.jsonl", _gmm_linear_loss, ("*",),
         "forward+backward of sum(y * dy), a loss linear in y: the gradients need no forward, "
         "so XLA may drop it while tflops counts 3x the forward's FLOPs (rows above the 989 "
         "TFLOP/s datasheet peak, e.g. 877-1131); bench_moe now returns the forward output "
         "(harness.fwd_bwd)"),
    Rule("bench_attention.jsonl", lambda r: r.get("pass") == "fwd_bwd" and _old(r), ("*",),
         "forward+backward of sum(o * dout), linear in o: XLA's backward needs P but not the "
         "forward's P V product, so the xla row may lack it while the cudnn kernel computes "
         "it: the xla/cudnn fwd+bwd ratio compares unequal work"),
    Rule("bench_generate.jsonl", lambda r: r.get("floor_ms") is not None and
         r.get("impl") == "minimax_jax" and "floor_bytes" not in r,
         ("floor_ms", "step_over_floor"),
         "floor over the bandwidth of one 512 MiB x + 1 timed by the wall clock (1.7-2.4 TB/s, "
         "the machine copies at ~4.3), counting the whole embedding table (a step reads B rows)"),
    Rule("bench_generate.jsonl", lambda r: r.get("impl") == "transformers.generate",
         ("tokens_per_s", "step_ms"),
         "not comparable with the minimax_jax rows: transformers' eager generate (no static "
         "cache, no torch.compile) timed with its prefill, against our decode loop alone"),
    Rule("bench_train.jsonl", lambda r: "mfu" in r and "peak_source" not in r, ("mfu",),
         "MFU over a measured 8192^3 matmul (742 TFLOP/s), not the datasheet's 989 TFLOP/s"),
    Rule("bench_lightning.jsonl", lambda r: _old(r) and (r.get("speedup_vs_fla") is not None
         or r.get("frac_of_copy_bw") is not None), ("speedup_vs_fla", "frac_of_copy_bw"),
         "FLA timed by triton do_bench (CUDA events per call, launch included, L2 flushed) "
         "against ours by the wall clock over 5 back-to-back calls (decode: per step inside a "
         "jitted 32-step loop, no launch, warm L2): unlike clocks; frac_of_copy_bw divides by "
         "an x + 1's bandwidth, not a device copy"),
    Rule("long_context.jsonl", lambda r: r.get("kind") == "prefill" and "peak_is_own" not in r,
         ("peak_bytes", "activation_peak"),
         "the process peak is cumulative: these rows shared a process with the cuDNN rate "
         "probe, the reference check and other lengths, so the peak need not be this row's"),
    Rule("fullscale_x2.jsonl", lambda r: r.get("planned_over_peak") is not None and
         r.get("peak_raised") is False, ("planned_over_peak",),
         "compares the plan with a peak set before this row ran (peak_raised false)"),
    Rule("fullscale_x2_train.jsonl", lambda r: r.get("planned_over_peak") is not None and
         r.get("peak_raised") is False, ("planned_over_peak",),
         "compares the plan with a peak set before this row ran (peak_raised false)"),
    Rule("fullscale_x2.jsonl", lambda r: r.get("floor_over_step") is not None and
         "timing_method" not in r, ("floor_ms", "floor_over_step"),
         "floor over the bandwidth of an fp32 x + 1 (best of 5, wall clock), not a device copy"),
)  # fmt: skip


def _mark(row: dict, rules: list[Rule]) -> dict:
    fields, reasons = [], []
    for rule in rules:
        if rule.matches(row):
            fields += [f for f in rule.fields if f not in fields]
            reasons.append(rule.reason)
    if not reasons:
        return row
    return {**row, "invalid": "; ".join(reasons), "invalid_fields": fields}


def apply(results: Path = RESULTS, check: bool = False) -> list[str]:
    """Mark the rows; returns "file:line" of rows that were (check: would be) changed."""
    changed = []
    for name in sorted({r.file for r in RULES}):
        path = results / name
        if not path.exists():
            continue
        rules = [r for r in RULES if r.file == name]
        lines = path.read_text().splitlines()
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                out.append(line)
                continue
            row = json.loads(line)
            marked = _mark(row, rules)
            if marked != row:
                changed.append(f"{name}:{n}")
                line = json.dumps(marked)
            out.append(line)
        if changed and not check and any(c.startswith(name + ":") for c in changed):
            fd, tmp = tempfile.mkstemp(dir=results, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(out) + "\n")
            os.replace(tmp, path)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--check", action="store_true", help="only report unmarked rows (exit 1)")
    args = ap.parse_args(argv)
    changed = apply(args.results, args.check)
    for c in changed:
        print(("unmarked: " if args.check else "marked: ") + c)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
