"""Run one benchmark suite (a topic) on the machine at hand, each part under a time cap.

    python experiments/run.py SUITE [--out DIR] [--deadline S] [--dry-run]
    python experiments/run.py --list

Suites and what they run: `--list`, or SUITES below. Every part is one command (a benchmark
script or a GPU test file) with a cap in seconds: at most its own cap and what is left before
the suite's deadline (default 570 s, under a device command's 10 minutes). A part past its cap
is stopped (its process group gets SIGTERM, then SIGKILL) and the suite goes on; rows already
written stay (the scripts write each row as it is measured). Rows go to DIR/<script>.jsonl
(default $OUT, else /tmp/out), the parts' output to DIR/<suite>.log. Afterwards, on the machine
that keeps the repository, append the rows to experiments/results/ with a run tag:

    python experiments/collect.py FILES_AT --run <tag>

--dry-run prints the commands without running anything. An unknown suite is one `error:` line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU_TEST = ("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider")


@dataclasses.dataclass(frozen=True)
class Part:
    """One command of a suite. `args` are python's arguments: a script path (or `-m pytest`) and
    its flags, with `{out}` (the output folder) and `{budget}` (the cap minus 30 s) filled in."""

    name: str
    args: tuple[str, ...]
    cap_s: int
    reserve_s: int = 0  # seconds left for the parts after this one
    env: tuple[tuple[str, str], ...] = ()
    fla: bool = False  # add --no-fla when flash-linear-attention is not installed
    # when set, `retry` runs if no row of `measured_file` has one of `measured` as a key
    measured: tuple[str, ...] = ()
    measured_file: str = ""
    retry: Part | None = None
    stdout: str = ""  # a file in the output folder for this part's output (default: the log)

    def scripts(self) -> list[str]:
        return [a for a in self.args if a.endswith(".py")]


_WHEELS: list[str | None] = []


def carried_wheels() -> str | None:
    """A folder on the import path for the wheels carried in .whl/ (the GPU machine has no
    grain: the device README's "carry"), installed once with pip --target; None when there are
    none or grain is already importable."""
    if not _WHEELS:
        wheels = sorted(str(w) for w in (REPO / ".whl").glob("*.whl"))
        target = None
        if wheels and importlib.util.find_spec("grain") is None:
            target = "/tmp/carried_site"
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                            "--no-deps", "--no-compile", "--upgrade", "--target", target,
                            *wheels], check=False)  # fmt: skip
        _WHEELS.append(target)
    return _WHEELS[0]


def bench(script: str, *flags: str, cap: int, out: str | None = None, **kw) -> Part:
    """A benchmark script writing rows to {out}/<out or script>.jsonl."""
    name = kw.pop("name", script)
    jsonl = f"{{out}}/{out or script}.jsonl"
    return Part(name, (f"experiments/{script}.py", *flags, "--out", jsonl), cap, **kw)


def gpu_tests(*files: str, cap: int) -> Part:
    return Part("tests", (*GPU_TEST, *files), cap)


def fullscale_parts(extra: tuple[str, ...] = ()) -> list[Part]:
    """The full-width slices on 2 devices: the first 20 layers of MiniMax-Text-01 (decode b1/b16,
    prefill 8K/32K), then a training step of a 2-layer slice (seq 4K and 8K), both EP=2 with the
    ep_fold rules; a part that measured nothing is retried with tp_ep (attention replicated, the
    Pallas lightning kernel, one compile at a time) if time is left."""
    env = (("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95"),)  # the 20-layer slice needs ~116 GiB
    inf = ("experiments/fullscale/run_fullscale.py", "--budget_s", "{budget}", "--layers", "20",
           "--mesh", "expert=2", "--out", "{out}/fullscale_x2.jsonl")  # fmt: skip
    train = ("experiments/fullscale/train_slice.py", "--budget_s", "{budget}", "--mesh",
             "expert=2", "--out", "{out}/fullscale_x2_train.jsonl")  # fmt: skip
    inf_keys, inf_file = ("decode_tok_per_s", "prefill_tok_per_s"), "fullscale_x2.jsonl"
    inf_tp = (*inf, "--rules", "tp_ep", "--lightning_impl", "auto", "--compile_workers", "1")
    train_tp = (*train, "--rules", "tp_ep", "--shapes", "1x4096", "--compile_workers", "1")
    inf_retry = Part("inference-tp_ep", (*inf_tp, *extra), 300, 170, env)
    train_retry = Part("train-tp_ep", (*train_tp, *extra), 150, 0, env)
    return [
        Part("inference", (*inf, "--rules", "ep_fold", *extra), 330, 180, env,
             measured=inf_keys, measured_file=inf_file, retry=inf_retry),
        Part("train", (*train, "--rules", "ep_fold", *extra), 210, 0, env,
             measured=("tokens_per_s",), measured_file="fullscale_x2_train.jsonl",
             retry=train_retry),
        Part("summary", ("experiments/fullscale/common.py", "{out}/fullscale_x2.jsonl",
                         "{out}/fullscale_x2_train.jsonl"), 30,
             stdout="fullscale_x2_summary.txt"),
    ]  # fmt: skip


# The suites: (devices, what it measures, parts). Topics as in experiments/RESULTS.md.
SUITES: dict[str, tuple[str, str, list[Part]]] = {
    "lightning": ("1 GPU", "lightning kernels: GPU tests, decode step, fwd and fwd+bwd vs FLA", [
        gpu_tests("tests/test_lightning_gpu.py", cap=120),
        bench("bench_lightning", "--shapes", "none", cap=120, name="decode", fla=True),
        bench("bench_lightning", "--skip-decode", cap=330, name="fwd-bwd", fla=True),
    ]),
    "lightning-sweep": ("1 GPU", "lightning kernel configurations per shape (--sweep)", [
        bench("bench_lightning", "--sweep", "--skip-decode", cap=560, name="sweep", fla=True),
    ]),
    "lightning-packed": ("1 GPU", "packed rows (segment ids): kernel with / without ids, XLA", [
        bench("bench_lightning", "--packed", "2048", "--shapes", "0,1", "--no-fla", cap=200,
              name="packed"),
    ]),
    "moe": ("1 GPU", "MoE layer at 4K and 16K tokens: padded (auto), Mosaic kernels, dense, "
                     "ragged_dot; GPU tests first", [
        gpu_tests("tests/test_moe_padded.py", "tests/test_grouped_matmul.py", cap=120),
        bench("bench_moe", "--tokens", "4096", "--impls", "auto,gpu", cap=220, name="4k"),
        bench("bench_moe", "--tokens", "16384", "--impls", "auto,gpu", cap=220, name="16k"),
    ]),
    "moe-64k": ("1 GPU", "MoE layer at 64K tokens (no ragged_dot: ~1 s per pass)", [
        bench("bench_moe", "--tokens", "65536", "--impls", "auto,gpu", "--no_gmm",
              "--ragged_max_tokens", "0", cap=540, name="64k"),
    ]),
    "moe-probe": ("1 GPU", "batched GEMM over padded groups vs gmm; gmm block sweep", [
        bench("probe_bmm", cap=200, name="probe"),
        bench("bench_moe", "--tokens", "4096", "--impls", "gpu", "--sweep",
              "--ragged_max_tokens", "0", cap=300, name="gmm-sweep"),
    ]),
    "ep": ("2 GPUs", "expert parallelism EP=2 at 64K tokens, padded and Mosaic receive FFN", [
        bench("bench_moe", "--tokens", "65536", "--ep", "--ep_only", "--impls", "padded",
              cap=280, name="ep-padded"),
        bench("bench_moe", "--tokens", "65536", "--ep", "--ep_only", "--impls", "gpu",
              cap=280, name="ep-gpu"),
    ]),
    "generate": ("1 GPU", "decode at batch 1 and 16: ours (decode loop alone, checked against "
                          "the uncached forward), then transformers eager and static cache + "
                          "torch.compile (best configuration), both timed the same way", [
        bench("bench_generate", "--no_hf", "--prefill", "", "--new_tokens", "64", "--variants",
              "default,1:mvxla", cap=200, name="decode"),
        bench("bench_generate", "--no_ours", "--prefill", "", "--new_tokens", "64",
              "--hf_variants", "eager,compiled", cap=340, name="transformers"),
    ]),
    "generate-prefill": ("1 GPU", "prefill per token 16K-128K, hybrid and lightning-only", [
        bench("bench_generate", "--no_hf", "--no_ours", "--batches", "1", "--new_tokens", "64",
              "--prefill", "16384,32768,65536,131072", "--chunk", "4096", cap=540,
              name="prefill"),
    ]),
    "roofline": ("1 GPU", "device-to-device copy per size, x + 1, bf16 matmul, datasheet", [
        bench("bench_roofline", cap=200, name="roofline"),
    ]),
    "matvec": ("1 GPU", "decode-sized matmul formulations and the matvec kernel's tilings", [
        gpu_tests("tests/test_matvec.py", cap=100),
        bench("bench_matvec", cap=150, name="formulations"),
        bench("bench_matvec", "--batches", "1", "--sweep", cap=300, name="sweep"),
    ]),
    "attention": ("1 GPU", "softmax attention core, xla vs cudnn; the model's GPU tests", [
        gpu_tests("tests/test_attention_impl.py", cap=90),
        bench("bench_attention", cap=450, name="core"),
    ]),
    "long-context": ("1 GPU", "attention GPU tests; the --impl check against xla and the cuDNN "
                              "causal rate; 1.55B prefill 32K, 128K beside lightning-only (a "
                              "process per part, so each peak is its own)", [
        gpu_tests("tests/test_attention_impl.py", "tests/test_attention_cudnn_chunk.py", cap=100),
        bench("bench_long_context", "--lengths", "", "--no_lightning_only", cap=90,
              name="check"),
        bench("bench_long_context", "--lengths", "32768,131072", "--no_check", "--isolate",
              "--budget_s", "{budget}", cap=330, name="short"),
    ]),
    "long-context-1m": ("1 GPU", "the same at 512K and 1M tokens (one timed call each; a "
                                 "process per row, so each peak is its own)", [
        bench("bench_long_context", "--lengths", "524288,1048576", "--reps", "1", "--no_check",
              "--isolate", "--budget_s", "{budget}", cap=560, name="long"),
    ]),
    "int8": ("1 GPU", "int8 weights (#22): the int8 kernel GPU tests; decode of the 1.55B model "
                      "at batch 1 and 16 with bf16, experts_int8 and int8 weights; the MoE layer "
                      "forward at 16K tokens with experts_int8 vs bf16", [
        gpu_tests("tests/test_int8_kernels.py", cap=120),
        bench("bench_generate", "--no_hf", "--prefill", "", "--new_tokens", "64", "--variants",
              "default,q8e,q8", cap=240, name="decode"),
        bench("bench_moe", "--tokens", "16384", "--impls", "auto,gpu", "--no_gmm",
              "--ragged_max_tokens", "0", "--int8", "--routings", "", cap=200, name="moe16k"),
    ]),
    "train": ("1 GPU", "training-step throughput and MFU, unpacked then packed rows", [
        bench("bench_train", "--tokens", "16384", "--breakdown", "4096", cap=330, name="step"),
        bench("bench_train", "--seq", "4096", "--tokens", "16384", "--packed", "--breakdown",
              cap=230, name="packed"),
    ]),
    "train-attention": ("1 GPU", "training step at 4K with the softmax layers on xla vs cudnn", [
        bench("bench_train", "--seq", "4096", "--tokens", "16384", "--breakdown",
              "--attention_impl", "xla", cap=280, name="xla"),
        bench("bench_train", "--seq", "4096", "--tokens", "16384", "--breakdown",
              "--attention_impl", "cudnn", cap=280, name="cudnn"),
    ]),
    "vision": ("1 GPU", "VL-01 vision tower + projector beside transformers", [
        bench("bench_vision", "--budget_s", "{budget}", cap=400, name="tower"),
    ]),
    "profile": ("1 GPU", "kernel profiles: decode step, 4K MoE layer, vision tower", [
        bench("bench_generate", "--no_hf", "--prefill", "", "--new_tokens", "64", "--profile",
              "--reps", "3", cap=150, name="decode"),
        bench("bench_moe", "--tokens", "4096", "--profile", "--ragged_max_tokens", "0",
              "--routings", "", cap=200, name="moe"),
        bench("bench_vision", "--profile", "--budget_s", "{budget}", cap=200, name="vision"),
    ]),
    "fullscale": ("2 GPUs (H200)", "full-width MiniMax-Text-01 slices: inference, training",
                  fullscale_parts()),
    "fullscale-smoke": ("CPU", "the fullscale suite on tiny configs, 2 CPU devices",
                        fullscale_parts(("--tiny", "--cpu_devices", "2"))),
    "gpu-tests": ("1 GPU", "every test marked gpu", [
        gpu_tests("tests/", cap=560),
    ]),
}  # fmt: skip


def command(part: Part, out: Path, budget: int, python: str = sys.executable) -> list[str]:
    args = [a.format(out=out, budget=budget) for a in part.args]
    if part.fla and importlib.util.find_spec("fla") is None:
        args.append("--no-fla")
    return [python, *args]


def has_measurement(path: Path, keys: tuple[str, ...]) -> bool:
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and any(k in row for k in keys):
            return True
    return False


class Runner:
    def __init__(self, suite: str, out: Path, deadline: int):
        self.suite, self.out, self.deadline = suite, out, deadline
        self.t0 = time.monotonic()
        self.log = out / f"{suite}.log"

    def left(self) -> int:
        return int(self.deadline - (time.monotonic() - self.t0))

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        with open(self.log, "a") as f:
            f.write(msg + "\n")

    def run(self, part: Part) -> int | None:
        cap = min(part.cap_s, self.left() - part.reserve_s)
        if cap < 30:
            self.say(f"[{part.name}] skipped: {cap} s left")
            return None
        cmd = command(part, self.out, max(cap - 30, 10))
        path = os.pathsep.join(
            filter(None, [str(REPO), carried_wheels(), os.environ.get("PYTHONPATH")])
        )
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
               "XLA_PYTHON_CLIENT_PREALLOCATE": "false", **dict(part.env)}  # fmt: skip
        self.say(f"[{part.name}] {shlex.join(cmd)}  (cap {cap} s)")
        sink = self.out / part.stdout if part.stdout else self.log
        with open(sink, "a") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
            try:
                rc = proc.wait(timeout=cap)
            except subprocess.TimeoutExpired:
                rc = 124
                _stop(proc)
        self.say(f"[{part.name}] exit {rc} at {int(time.monotonic() - self.t0)} s")
        if part.retry is not None and not has_measurement(
            self.out / part.measured_file, part.measured
        ):
            self.say(f"[{part.name}] measured nothing: retrying as {part.retry.name}")
            return self.run(part.retry)
        return rc


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group, SIGKILL 5 s later if it is still there."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def dry_run(suite: str, out: Path) -> int:
    missing = []
    for part in SUITES[suite][2]:
        for p in (part, part.retry) if part.retry else (part,):
            print(f"[{p.name}] cap {p.cap_s} s: {shlex.join(command(p, out, p.cap_s - 30))}")
            missing += [s for s in p.scripts() if not (REPO / s).exists()]
    if missing:
        print(f"error: missing scripts: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite", nargs="?", help="suite name (see --list)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/out"))
    ap.add_argument("--deadline", type=int, default=570, help="seconds for the whole suite")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--list", action="store_true", help="list the suites")
    args = ap.parse_args(argv)
    if args.list:
        for name, (devices, what, _) in SUITES.items():
            print(f"{name:16s} {devices:14s} {what}")
        return 0
    if args.suite not in SUITES:
        print(f"error: unknown suite {args.suite!r}; one of: {', '.join(SUITES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.dry_run:
        return dry_run(args.suite, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.suite, args.out, args.deadline)
    runner.say(f"# suite {args.suite} ({SUITES[args.suite][1]}) -> {args.out}")
    for part in SUITES[args.suite][2]:
        runner.run(part)
    runner.say(f"# suite {args.suite} done at {int(time.monotonic() - runner.t0)} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
