"""Shared pieces of the full-scale scripts (`run_fullscale.py`, `train_slice.py`).

Mesh flags, JAX setup, the Text-01 layer slice, random weights created in their shards with
bounded temporaries, device-memory readings, JSON rows and a wall-clock budget. Nothing here
imports JAX at module level: `setup_jax` must run first (it picks CPU devices for smoke runs).
"""

from __future__ import annotations

import json
import math
import sys
import time

LIN, FULL = "linear_attention", "full_attention"
GiB = 2**30


def parse_mesh(text: str) -> dict[str, int]:
    """'expert=2,tensor=4' -> sizes of all four mesh axes (missing ones are 1)."""
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in sizes:
            raise SystemExit(f"--mesh: unknown axis {name!r} (data, fsdp, expert, tensor)")
        sizes[name] = int(value)
    return sizes


def add_run_args(ap, budget_s: float, run_reserve_s: float) -> None:
    """The flags both scripts share: kernels, time budget, compile threads, smoke mode, output."""
    ap.add_argument("--lightning_impl", default=None, help="default: xla if heads are sharded")
    ap.add_argument("--budget_s", type=float, default=budget_s)
    ap.add_argument("--first_row_guess_s", type=float, default=30)
    ap.add_argument("--run_reserve_s", type=float, default=run_reserve_s,
                    help="budget kept for the rows")  # fmt: skip
    ap.add_argument("--compile_workers", type=int, default=4, help="programs compiled at once")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cpu_devices", type=int, default=0)
    ap.add_argument("--out", default=None)


def setup_jax(cpu_devices: int = 0):
    """Import JAX; with cpu_devices, run on that many simulated CPU devices."""
    import jax

    if cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    return jax


def text01_slice(tiny: bool, layers: int | None = None, layer_types: str | None = None):
    """MiniMax-Text-01 (tiny: the tiny-m1-2blocks preset) cut to its first `layers` layers, or
    to explicit comma-separated `layer_types` (e.g. 'linear_attention,full_attention')."""
    from minimax_jax import ModelConfig

    cfg = ModelConfig.preset("tiny-m1-2blocks" if tiny else "minimax-text-01")
    types = tuple(layer_types.split(",")) if layer_types else cfg.layer_types[:layers]
    return cfg.replace(num_layers=len(types), layer_types=types)


def heads_sharded(cfg, mesh, rules) -> bool:
    """True when the rules split attention heads over more than one device on this mesh."""
    return any(a is not None for a in rules.spec(("heads",), mesh, (cfg.num_heads,)))


def lightning_impl(flag: str | None, cfg, mesh, rules) -> str:
    """--lightning_impl, defaulting to "xla" when heads are sharded (GSPMD then partitions the
    chunked scan over heads; a Pallas kernel is an opaque custom call that it would replicate)
    and "auto" otherwise."""
    if flag:
        return flag
    return "xla" if heads_sharded(cfg, mesh, rules) else "auto"


def _local_shape(shape, spec, mesh) -> tuple[int, ...]:
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(dim // math.prod(mesh.shape[a] for a in axes))
    return tuple(out)


def _leaf_init_fn(shape, dtype, spec, mesh, std, limit):
    """A jitted key -> array of `shape` placed as `spec`: each device draws only its own shard
    (keys folded with its index on the axes the leaf is split over; replicas draw the same), in
    pieces of at most `limit` elements (a lax.map), so temporaries stay small."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    local = _local_shape(shape, spec, mesh)
    axes = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
    total = math.prod(local)
    steps = next(s for s in range(max(1, -(-total // limit)), total + 1) if total % s == 0)

    def body(key):
        if std is None:
            return jnp.ones(local, dtype)
        for a in axes:
            key = jax.random.fold_in(key, jax.lax.axis_index(a))
        draw = lambda k: (std * jax.random.normal(k, (total // steps,))).astype(dtype)  # noqa: E731
        return jax.lax.map(draw, jax.random.split(key, steps)).reshape(local)

    fn = jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(), out_specs=spec)
    return jax.jit(fn)


def init_random_params(cfg, mesh, rules, dtype, seed: int = 0, limit: int = 1 << 25):
    """Random weights (N(0, initializer_range); norms ones; router fp32) created directly in
    the shards `rules` give them on `mesh`: no full copy of any weight on any device, and at
    most `limit` elements of temporaries per device. Returns (params like model.pure_params(),
    seconds including compiles)."""
    import jax
    from flax import nnx

    from minimax_jax import MiniMaxForCausalLM
    from minimax_jax.model.causal_lm import to_pure
    from minimax_jax.sharding import pure_param_shardings

    t0 = time.perf_counter()
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype))
    state = nnx.state(abstract, nnx.Param)
    shapes, shardings = to_pure(state), pure_param_shardings(state, mesh, rules)
    fns, key, count = {}, jax.random.key(seed), [0]

    def one(path, leaf, sharding):
        names = [str(getattr(k, "key", "")) for k in path]
        std = None if any("norm" in n for n in names) else cfg.initializer_range
        sig = (leaf.shape, leaf.dtype, sharding.spec, std)
        if sig not in fns:
            fns[sig] = _leaf_init_fn(leaf.shape, leaf.dtype, sharding.spec, mesh, std, limit)
        count[0] += 1
        return fns[sig](jax.random.fold_in(key, count[0]))

    params = jax.tree_util.tree_map_with_path(one, shapes, shardings)
    jax.block_until_ready(params)
    return params, time.perf_counter() - t0


def device_bytes(tree, device=None) -> int:
    """Bytes of the shards of every array in tree held by device (default: the first)."""
    import jax

    device = device or jax.devices()[0]
    return sum(
        s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
        if s.device == device
    )  # fmt: skip


def memory_stats() -> dict:
    """Per local device: bytes_in_use, peak_bytes_in_use, bytes_limit (GPU; {} on CPU)."""
    import jax

    out = {}
    for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
        vals = [(d.memory_stats() or {}).get(key) for d in jax.local_devices()]
        if all(v is not None for v in vals):
            out[key] = vals
    return out


def gib(x) -> float | None:
    return None if x is None else round(x / GiB, 3)


class Compiler:
    """Compiles a script's programs at once: each jitted call is lowered in the main thread and
    compiled in a worker thread (XLA releases the GIL). Later calls of the same jitted function
    with matching arguments reuse the executable (JAX's compile cache), so the rows only run."""

    def __init__(self, workers: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.jobs, self.t0 = ThreadPoolExecutor(workers), {}, time.perf_counter()

    def submit(self, name: str, lower) -> None:
        """lower: () -> jax.stages.Lowered (e.g. lambda: jitted.lower(*abstract_args))."""
        from concurrent.futures import Future

        try:
            lowered = lower()
        except Exception as exc:  # noqa: BLE001 - reported by get()
            self.jobs[name] = Future()
            self.jobs[name].set_exception(exc)
            return
        self.jobs[name] = self.pool.submit(
            lambda: (lowered.compile(), time.perf_counter() - self.t0)
        )

    def wait(self, timeout: float) -> None:
        from concurrent.futures import wait

        wait(list(self.jobs.values()), timeout=max(timeout, 1))

    def get(self, name: str):
        """(compiled, seconds from the first submit); raises the compile's error, or
        TimeoutError while it is still compiling."""
        job = self.jobs[name]
        if not job.done():
            raise TimeoutError(f"{name}: still compiling when the budget ran out")
        return job.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def xla_memory(compiled) -> dict:
    """XLA's own per-device bytes for a compiled program; total = arguments + outputs - aliased
    (donated) + temporaries, i.e. what the program holds at its peak."""
    m = compiled.memory_analysis()
    out = {k: getattr(m, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")}
    return out | {"total": out["argument"] + out["output"] - out["alias"] + out["temp"]}


class Rows:
    """Prints each row as a JSON line and appends it to `path` (if given), with `base` fields
    and what `experiments.harness` gives every row (commit, versions, device, command line)."""

    def __init__(self, path: str | None, base: dict):
        from experiments import harness

        meta = {**harness.env_info(), "argv": " ".join(sys.argv)}
        self.path, self.base = path, {**meta, **base}

    def write(self, row: dict) -> dict:
        row = self.base | row
        line = json.dumps(row)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        return row


class Budget:
    """Wall-clock budget from process start: a row runs only if its estimate fits what is left.
    The default estimate is the longest row so far (first_guess_s before any row)."""

    def __init__(self, budget_s: float, first_guess_s: float):
        self.t0, self.budget_s, self.first_guess_s = time.perf_counter(), budget_s, first_guess_s
        self.rows: list[float] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def estimate(self) -> float:
        return max(self.rows) if self.rows else self.first_guess_s

    def allows(self, estimate: float | None = None) -> bool:
        est = self.estimate() if estimate is None else estimate
        return self.elapsed() + est <= self.budget_s

    def done(self, seconds: float) -> None:
        self.rows.append(seconds)

    def skip_row(self, what, estimate: float | None = None) -> dict:
        est = self.estimate() if estimate is None else estimate
        return {"row": "skipped", "skipped": what, "elapsed_s": round(self.elapsed(), 1),
                "budget_s": self.budget_s, "estimate_s": round(est, 1)}  # fmt: skip


def run_row(
    rows: Rows, budget: Budget, what: str, plan, fn, compiler=None, program=None, estimate=None
) -> None:
    """One measured row, beside its plan (a `memory.MemoryPlan`, printed by the script before
    compiling): skipped when its program did not compile in time or the budget is short; the
    peak per device before and after fn() (cumulative over the process: scripts run rows in
    increasing plan) and XLA's bytes of the compiled program (per program, not cumulative)."""
    import dataclasses

    out = {"row": what, "planned": dataclasses.asdict(plan) | {"total": plan.total},
           "planned_gib": gib(plan.total)}  # fmt: skip
    if program is not None:
        try:
            compiled, out["compile_s"] = compiler.get(program)
            out["xla_bytes"] = xla_memory(compiled)
            out["planned_over_xla"] = plan.total / out["xla_bytes"]["total"]
        except TimeoutError as exc:
            rows.write(budget.skip_row(what, 0) | {"reason": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - report the row, go on with the next
            rows.write(out | {"error": f"compile: {type(exc).__name__}: {str(exc)[:2000]}"})
            return
    if not budget.allows(estimate):
        rows.write(budget.skip_row(what, estimate))
        return
    before = memory_stats()
    t0 = time.perf_counter()
    try:
        out |= fn()
    except Exception as exc:  # noqa: BLE001 - one failed row must not end the run
        out["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    out["row_s"] = time.perf_counter() - t0
    budget.done(out["row_s"])
    after = memory_stats()
    peak_before = max(before.get("peak_bytes_in_use", [0]))
    peak = max(after["peak_bytes_in_use"]) if after else None
    raised = bool(peak and peak > peak_before)
    rows.write(out | {
        "peak_bytes_per_device": after.get("peak_bytes_in_use"),
        "peak_before": peak_before or None, "peak_raised": raised, "peak_is_own": raised,
        "bytes_in_use_before": before.get("bytes_in_use"),
        # a peak this row did not raise belongs to an earlier row or the init: no comparison
        "planned_over_peak": plan.total / peak if raised else None,
        "compared_with": "planned total vs the peak after the row, only when the row raised it "
        "(the peak is cumulative over the process), and vs XLA's total of the compiled program",
    })  # fmt: skip


def summarize(paths) -> None:
    """One short line per JSON row of the given files (the driver prints it last)."""
    keys = ("init_s", "planned_weight_bytes", "placed_weight_bytes_dev0", "planned_over_placed",
            "planned_over_in_use", "planned_optimizer_bytes", "placed_optimizer_bytes_dev0",
            "copy_gbps", "chunk",
            "decode_step_ms", "decode_tok_per_s", "floor_over_step", "prefill_s",
            "prefill_tok_per_s", "first_call_s", "first_step_s", "step_s", "tokens_per_s",
            "model_tflops_per_s_per_device", "planned_gib", "planned_over_peak", "peak_raised",
            "planned_over_xla", "compile_s", "skipped", "estimate_s", "elapsed_s",
            "error")  # fmt: skip
    for path in paths:
        try:
            lines = open(path).read().splitlines()
        except OSError as exc:
            print(f"{path}: {exc}")
            continue
        for line in lines:
            r = json.loads(line)
            parts = [f"{r.get('bench')}/{r.get('rules')}/{r.get('row')}"]
            parts += [f"{k}={_short(r[k])}" for k in keys if r.get(k) is not None]
            if r.get("xla_bytes"):
                parts.append(f"xla_gib={gib(r['xla_bytes']['total'])}")
            for k in ("bytes_in_use", "peak_bytes_per_device", "bytes_limit"):
                if r.get(k):
                    parts.append(f"{k}_gib={[gib(p) for p in r[k]]}")
            print(" ".join(parts)[:600])


def _short(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)[:300] if isinstance(v, str) else v


if __name__ == "__main__":
    import sys

    summarize(sys.argv[1:])
