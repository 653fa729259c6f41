"""Device-side profiles for the benchmark scripts: where the kernel time goes.

`kernel_profile(fn, reps)` runs fn() (which must block) under `jax.profiler.trace`, reads the
XSpace it wrote with `jax.profiler.ProfileData` (no TensorBoard needed) and sums the device
events per XLA op (the `hlo_op` stat; the kernel name when there is none), per rep. It also
returns, per device, the span from the first kernel's start to the last kernel's end and the
busy time (the union of the kernel intervals): span - busy is the time the device sat idle
between kernels (launch gaps, host waits). `torch_profile` does the same for a torch callable
with `torch.profiler`, so both sides of a comparison come from the same kind of measurement.
"""

from __future__ import annotations

import collections
import glob
import os
import shutil
import tempfile

import jax

from experiments.device_time import union_length as _union_ns


def _device_events(path: str):
    """(device plane name, line name, event name, hlo_op, start_ns, duration_ns) of every device
    kernel/memcpy event in one .xplane.pb. Without device planes (CPU), the host threads' XLA op
    events stand in (a smoke test of the script, not a GPU-like profile)."""
    from jax.profiler import ProfileData

    planes = list(ProfileData.from_file(path).planes)
    on_device = any(p.name.startswith("/device:") for p in planes)
    for plane in planes:
        if not plane.name.startswith("/device:" if on_device else "/host:CPU"):
            continue
        for line in plane.lines:
            if line.name in ("XLA Modules", "XLA Ops", "Steps", "Framework Ops"):
                continue  # derived summary lines, not kernels
            for ev in line.events:
                stats = dict(ev.stats)
                op = stats.get("hlo_op")
                if not on_device and not op:
                    continue
                yield (
                    plane.name,
                    line.name,
                    ev.name,
                    str(op or ev.name),
                    ev.start_ns,
                    ev.duration_ns,
                )


_KINDS = (("nccl", ("nccl",)), ("copy", ("memcpy", "memset")),
          ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90", "cublas")),
          ("triton", ("triton",)), ("mosaic", ("mosaic", "mgpu")))  # fmt: skip


def kernel_kind(name: str) -> str:
    """A coarse class of a kernel from its name (gemm, triton, nccl, copy, mosaic, other)."""
    low = name.lower()
    for kind, keys in _KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def kernel_profile(fn, reps: int = 3, top: int = 30) -> dict:
    """Profile `reps` calls of fn() (warm it up first: compiles would be traced too).

    Returns {"devices": {plane: {"span_us", "busy_us", "idle_us", "kernels"}} per rep,
    "by_kind": {kind: {"us", "count"}} per rep (`kernel_kind`),
    "top": [{"op", "kernel", "us", "count", "share"}] per rep over all devices, top entries,
    "top_kernels": the same per kernel name}.
    """
    tmp = tempfile.mkdtemp(prefix="jaxprof")
    try:
        with jax.profiler.trace(tmp):
            for _ in range(reps):
                fn()
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return {"error": "no xplane.pb written"}
        per_op = collections.defaultdict(lambda: [0.0, 0, ""])
        per_kernel = collections.defaultdict(lambda: [0.0, 0, ""])
        by_kind = collections.defaultdict(lambda: [0.0, 0])
        spans = collections.defaultdict(list)
        for plane, _line, name, op, start, dur in _device_events(files[0]):
            kind = by_kind[kernel_kind(name)]
            kind[0] += dur
            kind[1] += 1
            for acc, label in ((per_op[op], name), (per_kernel[name[:120]], op)):
                acc[0] += dur
                acc[1] += 1
                acc[2] = acc[2] or label[:120]
            spans[plane].append((start, start + dur))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    devices = {}
    for plane, iv in spans.items():
        span = max(e for _, e in iv) - min(s for s, _ in iv)
        busy = _union_ns(iv)
        devices[plane] = {"span_us": span / 1e3 / reps, "busy_us": busy / 1e3 / reps,
                          "idle_us": (span - busy) / 1e3 / reps,
                          "kernels": len(iv) / reps}  # fmt: skip
    total = sum(v[0] for v in per_op.values()) or 1.0
    rows = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
    top_rows = [{"op": op, "kernel": kern, "us": ns / 1e3 / reps, "count": n / reps,
                 "share": ns / total} for op, (ns, n, kern) in rows]  # fmt: skip
    kinds = {k: {"us": ns / 1e3 / reps, "count": n / reps} for k, (ns, n) in by_kind.items()}
    # Kernels inside a command buffer share its op name: the same totals per kernel name too.
    krows = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    top_kernels = [{"kernel": kern, "op": op, "us": ns / 1e3 / reps, "count": n / reps,
                    "share": ns / total} for kern, (ns, n, op) in krows]  # fmt: skip
    return {"devices": devices, "by_kind": kinds, "top": top_rows, "top_kernels": top_kernels,
            "reps": reps}  # fmt: skip


def torch_profile(fn, reps: int = 3, top: int = 30) -> dict:
    """The same summary for a torch callable on CUDA (device time per kernel name, per rep)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0.0, 0])
    by_kind = collections.defaultdict(lambda: [0.0, 0])
    iv = []
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        start = ev.time_range.start
        dur = ev.time_range.end - start
        per[ev.name][0] += dur
        per[ev.name][1] += 1
        by_kind[kernel_kind(ev.name)][0] += dur
        by_kind[kernel_kind(ev.name)][1] += 1
        iv.append((start, start + dur))
    if not iv:
        return {"error": "no CUDA events"}
    span = max(e for _, e in iv) - min(s for s, _ in iv)  # microseconds
    total = sum(v[0] for v in per.values()) or 1.0
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "devices": {
            "cuda": {
                "span_us": span / reps,
                "busy_us": _union_ns(iv) / reps,
                "kernels": len(iv) / reps,
            }
        },  # fmt: skip
        "by_kind": {k: {"us": us / reps, "count": n / reps} for k, (us, n) in by_kind.items()},
        "top": [
            {"kernel": k[:120], "us": us / reps, "count": n / reps, "share": us / total}
            for k, (us, n) in rows
        ],  # fmt: skip
        "reps": reps,
    }
