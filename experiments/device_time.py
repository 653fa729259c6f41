"""Device time per timed call, read from the profiler, for JAX and torch alike.

    spans = jax_device_times(run, reps=10)      # [(span_s, busy_s, wall_s)] per call
    spans = torch_device_times(run, reps=10)

Each timed call `run(state)` (state = `setup()`, made before the call and not timed) runs inside
a host annotation `harness_rep_<i>` (JAX `TraceAnnotation`, torch `record_function`) and blocks
until its device work is done; calls are separated by `GAP_S` of host sleep, so the device is
idle between them. After the trace, the device events (JAX: the XSpace read with
`jax.profiler.ProfileData`: the "Stream" lines of /device:GPU:N planes, the "XLA Ops" line of a
TPU plane; torch: the CUDA kernel / memcpy events) are assigned to the call whose host window
they overlap (`split_reps`). A call's device time is its **span**, first event start to last
event end (gaps between its kernels included, as CUDA events around the call would count them);
its **busy** time is the union of its events. If the windows hold no events (host and device
clocks disagree), the events are cut into calls at the `reps - 1` widest idle gaps instead. If
that does not give `reps` groups, or a call's span exceeds its host window by more than 5%,
`NoDeviceEvents` is raised and the caller falls back to the wall clock.

L2 policy (the same for both sides): before every timed call (and every warm-up call) a
`FLUSH_BYTES` buffer is rewritten on the device, more than any L2 of the machines in
`roofline.PEAKS` (50 MB on H100 / H200), so no call finds its inputs in L2 left by the previous
one; the flush runs outside the windows and is not counted. `triton.testing.do_bench`, which the
FLA anchors used, flushes the same way.

On CPU there are no device planes: `cpu_ops=True` reads the host threads' XLA op events
instead (the harness uses it only in tests; CPU timings use the wall clock).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

MARK = "harness_rep_"
GAP_S = 0.002
FLUSH_BYTES = 256 << 20
# derived summary lines of a device plane: not kernels
_DERIVED = {"XLA Modules", "XLA Ops", "Steps", "Framework Ops", "Framework Name Scope",
            "Source code", "XLA TraceMe", "Launch Stats"}  # fmt: skip


class NoDeviceEvents(RuntimeError):
    """The profile held no device events that could be assigned to the timed calls."""


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def _span_busy(events: list[tuple[float, float]]) -> tuple[float, float]:
    return max(e for _, e in events) - min(s for s, _ in events), union_length(events)


def split_reps(
    windows: list[tuple[float, float]],
    events: list[tuple[float, float]],
    flush: list[tuple[float, float]] = (),
) -> tuple[list[tuple[float, float]], str]:
    """[(span, busy)] per window (in the events' unit) and how they were assigned.

    windows: the host intervals of the timed calls, in call order; events: device (start, end)
    intervals; flush: the L2 flush's events (between the windows). An event belongs to the
    window it overlaps ("windows"). If some window holds no event, the events other than the
    flush's are cut at the len(windows) - 1 widest idle gaps instead ("gap_split"). Either way a
    call's span may not exceed its host window by more than 5% (a group that swallowed a flush
    or another call's work would): NoDeviceEvents is raised then, and when no assignment gives
    one non-empty group per window.
    """
    reps = len(windows)
    if not events or not reps:
        raise NoDeviceEvents("no device events")
    groups: list[list[tuple[float, float]]] = [[] for _ in windows]
    for s, e in [*events, *flush]:
        for i, (ws, we) in enumerate(windows):
            if s < we and e > ws:
                groups[i].append((s, e))
                break
    how = "windows"
    if not all(groups):
        how = "gap_split"
        ev = sorted(events)
        cuts = []
        end = float("-inf")
        for i, (s, e) in enumerate(ev):
            if i and s > end:
                cuts.append((s - end, i))
            end = max(end, e)
        if len(cuts) < reps - 1:
            raise NoDeviceEvents(f"{len(cuts) + 1} groups of device events for {reps} calls")
        at = sorted(i for _, i in sorted(cuts, reverse=True)[: reps - 1])
        bounds = [0, *at, len(ev)]
        groups = [ev[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    spans = [_span_busy(g) for g in groups]
    for (span, _), (ws, we) in zip(spans, windows, strict=True):
        if span > 1.05 * (we - ws):
            raise NoDeviceEvents(f"a call's device span ({how}) exceeds its host window")
    return spans, how


# ---------------------------------------------------------------------------------------- JAX


def jax_flush_bytes(platform: str) -> int:
    """The L2 flush size for a JAX platform: FLUSH_BYTES on GPU, none elsewhere (TPU's and the
    CPU's caches are not flushed)."""
    return FLUSH_BYTES if platform == "gpu" else 0


_JAX_FLUSH: dict[int, Any] = {}


def jax_flush_l2(nbytes: int) -> None:
    """Rewrite an nbytes device buffer in place (donated) and wait for it."""
    if nbytes <= 0:
        return
    import jax
    import jax.numpy as jnp

    if nbytes not in _JAX_FLUSH:
        _JAX_FLUSH[nbytes] = (
            jnp.zeros((nbytes // 4,), jnp.int32),
            jax.jit(_l2_flush, donate_argnums=0),
        )
    buf, fn = _JAX_FLUSH[nbytes]
    buf = fn(buf)
    buf.block_until_ready()
    _JAX_FLUSH[nbytes] = (buf, fn)


def _l2_flush(x):
    return x + 1


def _xplane_events(path: str, cpu_ops: bool):
    """(windows by rep index, device events) in ns from one .xplane.pb."""
    from jax.profiler import ProfileData

    windows: dict[int, tuple[float, float]] = {}
    events: list[tuple[float, float]] = []
    for plane in ProfileData.from_file(path).planes:
        lines = list(plane.lines)
        if plane.name.startswith("/host:"):
            for line in lines:
                for ev in line.events:
                    if ev.name.startswith(MARK):
                        windows[int(ev.name[len(MARK) :])] = _interval(ev)
                    elif cpu_ops and plane.name == "/host:CPU" and _is_cpu_op(ev):
                        events.append(_interval(ev))
            continue
        if cpu_ops or not plane.name.startswith(("/device:GPU", "/device:TPU")):
            continue
        names = [ln.name for ln in lines]
        if plane.name.startswith("/device:TPU"):
            keep = {"XLA Ops"}
        elif any(n.startswith("Stream") for n in names):
            keep = {n for n in names if n.startswith("Stream")}
        else:
            keep = set(names) - _DERIVED
        for line in lines:
            if line.name in keep:
                events += [_interval(ev) for ev in line.events if not _is_flush(ev)]
    return windows, events


def _interval(ev) -> tuple[float, float]:
    return ev.start_ns, ev.start_ns + ev.duration_ns


def _is_cpu_op(ev) -> bool:
    stats = dict(ev.stats)
    return "hlo_op" in stats and "l2_flush" not in str(stats.get("hlo_module", ""))


def _is_flush(ev) -> bool:
    return "l2_flush" in str(dict(ev.stats).get("hlo_module", ""))


def jax_device_times(
    run: Callable[[Any], Any],
    reps: int,
    setup: Callable[[], Any] | None = None,
    flush_bytes: int = 0,
    cpu_ops: bool = False,
) -> tuple[list[tuple[float, float, float]], str]:
    """[(span_s, busy_s, wall_s)] of `reps` calls of run(setup()) and how the events were
    assigned; raises NoDeviceEvents (or the profiler's error) when there is no device time."""
    import jax

    tmp = tempfile.mkdtemp(prefix="harness_prof")
    walls = []
    try:
        with jax.profiler.trace(tmp):
            for i in range(reps):
                state = jax.block_until_ready(setup()) if setup is not None else None
                jax_flush_l2(flush_bytes)
                time.sleep(GAP_S)
                with jax.profiler.TraceAnnotation(f"{MARK}{i}"):
                    t0 = time.perf_counter()
                    jax.block_until_ready(run(state))
                    walls.append(time.perf_counter() - t0)
                del state
                time.sleep(GAP_S)
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise NoDeviceEvents("the profiler wrote no .xplane.pb")
        windows, events = _xplane_events(files[0], cpu_ops)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if sorted(windows) != list(range(reps)):
        raise NoDeviceEvents(f"{len(windows)} host windows for {reps} calls")
    spans, how = split_reps([windows[i] for i in range(reps)], events)
    return [(s * 1e-9, b * 1e-9, w) for (s, b), w in zip(spans, walls, strict=True)], how


# -------------------------------------------------------------------------------------- torch


_TORCH_FLUSH: dict[int, Any] = {}


def torch_flush_l2(nbytes: int = FLUSH_BYTES) -> None:
    """Zero an nbytes CUDA buffer (as triton.testing.do_bench does) and wait for it."""
    import torch

    if nbytes <= 0 or not torch.cuda.is_available():
        return
    if nbytes not in _TORCH_FLUSH:
        _TORCH_FLUSH[nbytes] = torch.empty(nbytes, dtype=torch.int8, device="cuda")
    _TORCH_FLUSH[nbytes].zero_()
    torch.cuda.synchronize()


def torch_device_times(
    run: Callable[[Any], Any],
    reps: int,
    setup: Callable[[], Any] | None = None,
    flush_bytes: int = FLUSH_BYTES,
) -> tuple[list[tuple[float, float, float]], str]:
    """`jax_device_times` for a torch callable on CUDA (torch.profiler's kernel events)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            state = setup() if setup is not None else None
            torch_flush_l2(flush_bytes)
            time.sleep(GAP_S)
            with record_function(f"{MARK}{i}"):
                t0 = time.perf_counter()
                run(state)
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - t0)
            del state
            time.sleep(GAP_S)
    windows: dict[int, tuple[float, float]] = {}
    events, fills = [], []  # fills: the flush's zero_ kernels, or a fill inside a timed call
    for ev in prof.events():
        start, end = ev.time_range.start, ev.time_range.end  # microseconds
        if ev.name.startswith(MARK):
            if ev.device_type.name == "CPU":
                windows[int(ev.name[len(MARK) :])] = (start, end)
        elif ev.device_type.name == "CUDA":
            (fills if "FillFunctor" in ev.name else events).append((start, end))
    if sorted(windows) != list(range(reps)):
        raise NoDeviceEvents(f"{len(windows)} host windows for {reps} calls")
    spans, how = split_reps([windows[i] for i in range(reps)], events, fills)
    return [(s * 1e-6, b * 1e-6, w) for (s, b), w in zip(spans, walls, strict=True)], how
