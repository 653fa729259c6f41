"""The training loop behind `python -m minimax_jax.train`: setup checks, the step loop,
evaluation, checkpoints and exact resume, and export to an HF directory."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from minimax_jax import files, outputs, paths
from minimax_jax import sharding as shard_lib
from minimax_jax.config import ModelConfig
from minimax_jax.hf.pretrained import from_pretrained
from minimax_jax.model.causal_lm import MiniMaxForCausalLM
from minimax_jax.model.decoder import RunOptions
from minimax_jax.training import checkpoint as ckpt
from minimax_jax.training import data as data_lib
from minimax_jax.training import log as log_lib
from minimax_jax.training import run_config as tc
from minimax_jax.training.log import MetricsLog
from minimax_jax.training.step import (
    build_optimizer,
    flops_per_token,
    make_eval_step,
    make_train_step,
    measure_peak_flops,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
RUN_CONFIG_FILE = "run_config.yaml"  # the resolved run config, written into the workdir at start
PROFILE_DIR = "profile"  # train.profile's jax.profiler trace, under the workdir
# URL schemes a run directory may have: Orbax 0.12 writes TensorStore arrays to local paths and
# gs:// only (an s3:// directory would be collapsed into a local "s3:/..." by its spec builder).
ORBAX_SCHEMES = ("gs",)


class TrainError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row)."""


@dataclasses.dataclass
class Setup:
    """Everything checked and opened before compilation."""

    config: tc.TrainConfig
    model_config: ModelConfig
    tokenizer: Any
    eos_id: int
    docs: data_lib.Documents
    train_idx: np.ndarray
    eval_idx: np.ndarray
    mesh: jax.sharding.Mesh
    rules: shard_lib.ShardingRules
    steps: int


def _dtype(name: str | None, key: str) -> Any:
    if name is None:
        return None
    if name not in DTYPES:
        raise tc.ConfigError(f"{key} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_model_config(section: tc.ModelSection) -> ModelConfig:
    """The ModelConfig of the run: preset, config file or init_from dir, then overrides."""
    if section.preset is not None:
        cfg = ModelConfig.preset(section.preset)
    else:
        key = "model.config" if section.config else "model.init_from"
        with paths.as_local(section.config or section.init_from, key,
                            patterns=paths.CONFIG_FILES) as local:  # fmt: skip
            cfg = ModelConfig.from_hf(local)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(section.overrides) - fields)
    if unknown:
        raise tc.ConfigError(f"unknown key model.overrides.{unknown[0]}: not a ModelConfig field")
    return cfg.replace(**section.overrides)


def prepare(config: tc.TrainConfig, steps: int | None = None) -> Setup:
    """Validates the run against its model, tokenizer, data and devices (no compilation)."""
    # before anything asks JAX for devices
    shard_lib.maybe_initialize_distributed(config.train.distributed)
    if jax.process_index() == 0:  # only the main process logs
        log_lib.check_backends(config.log.backends)
    model_config = resolve_model_config(config.model)
    _dtype(config.model.param_dtype, "model.param_dtype")
    _dtype(config.model.compute_dtype, "model.compute_dtype")
    d = config.data
    tok_path = d.tokenizer or config.model.init_from
    tokenizer = data_lib.load_tokenizer(tok_path, "data.tokenizer" if d.tokenizer else
                                        "model.init_from")  # fmt: skip
    n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_vocab > model_config.vocab_size:
        raise data_lib.DataError(
            f"tokenizer {tok_path!r} has {n_vocab} tokens but the model's vocab_size is "
            f"{model_config.vocab_size}: use a matching tokenizer or set "
            "model.overrides.vocab_size"
        )
    eos_id = tokenizer.token_to_id(d.eos_token)
    if eos_id is None:
        raise data_lib.DataError(f"tokenizer {tok_path!r} has no eos token {d.eos_token!r}")
    docs = data_lib.open_documents(d.sources)
    train_idx, eval_idx = data_lib.split_documents(len(docs), d.eval_fraction, d.seed)
    rules, mesh_cfg = shard_lib.load_rules(config.mesh.rules)
    sizes = {a: getattr(config.mesh, a) for a in shard_lib.MESH_AXES}
    mesh_cfg = dataclasses.replace(mesh_cfg, **{a: s for a, s in sizes.items() if s is not None})
    n, pcount = config.mesh.num_devices, jax.process_count()
    if pcount > 1 and n is not None and n != jax.device_count():
        raise tc.ConfigError(
            f"mesh.num_devices = {n} in a job of {pcount} processes: the mesh must "
            f"span all {jax.device_count()} devices of every process (set it to null)"
        )
    mesh = shard_lib.make_mesh(mesh_cfg, None if n is None else jax.devices()[:n])
    run_options(config, mesh, rules)  # validates the model's kernel / MoE / remat choices
    if d.seq_len % mesh.shape["sequence"]:
        raise tc.ConfigError(
            f"data.seq_len = {d.seq_len} does not split over mesh.sequence = "
            f"{mesh.shape['sequence']}: make seq_len a multiple of it"
        )
    if d.batch_size % (pcount * d.grad_accum):
        raise tc.ConfigError(
            f"data.batch_size = {d.batch_size} must split into {pcount} process(es) x "
            f"{d.grad_accum} microbatch(es) of whole rows"
        )
    if len(train_idx) < pcount:
        raise data_lib.DataError(
            f"{len(train_idx)} training document(s) cannot feed {pcount} processes (each reads "
            "every process_count-th document): add documents"
        )
    rows = d.batch_size // d.grad_accum
    batch_ways = math.prod(mesh.shape[a] for a in rules.mesh_axes("batch"))
    if rows % batch_ways:
        raise tc.ConfigError(
            f"data.batch_size / grad_accum = {rows} rows must divide over the {batch_ways} "
            "devices the batch is sharded on"
        )
    return Setup(config, model_config, tokenizer, eos_id, docs, train_idx, eval_idx, mesh,
                 rules, steps or config.train.steps)  # fmt: skip


def run_options(config: tc.TrainConfig, mesh, rules) -> RunOptions:
    """The model's run options for training on ``mesh``: activations constrained by the rules at
    block boundaries and the MoE under shard_map (experts split where the rules say so). On one
    device (unless moe_impl is "ep") the plain single-device path, as `bench_train.py` times it."""
    m = config.model
    sharded = mesh.devices.size > 1 or m.moe_impl == "ep"
    # matvec "xla": the one-row matvec kernel has no VJP
    return RunOptions(
        m.lightning_impl, m.moe_impl, m.remat, mesh=mesh if sharded else None,
        rules=rules if sharded else None, matvec_impl="xla", attention_impl=m.attention_impl,
    )  # fmt: skip


def _param_shardings(setup: Setup, param_dtype: Any) -> dict:
    abstract = nnx.eval_shape(
        lambda: MiniMaxForCausalLM(setup.model_config, rngs=nnx.Rngs(0), param_dtype=param_dtype)
    )
    return shard_lib.pure_param_shardings(nnx.state(abstract, nnx.Param), setup.mesh, setup.rules)


def init_state(setup: Setup, tx) -> dict:
    """Fresh (or init_from) train state placed by the sharding rules."""
    m = setup.config.model
    dtype = _dtype(m.param_dtype, "model.param_dtype")
    p_shard = _param_shardings(setup, dtype)
    if m.init_from is not None:
        fn = shard_lib.leaf_sharding_fn(p_shard)
        with paths.as_local(m.init_from, "model.init_from") as local:
            params = from_pretrained(local, dtype=dtype, sharding=fn).pure_params()
    else:
        seed = setup.config.train.seed

        def make():
            model = MiniMaxForCausalLM(setup.model_config, rngs=nnx.Rngs(seed), param_dtype=dtype)
            return model.pure_params()

        params = jax.jit(make, out_shardings=p_shard)()
    opt_state = jax.jit(tx.init)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(setup.mesh, PartitionSpec()))
    return {"params": params, "opt_state": opt_state, "step": step}


def _batch_sharding(setup: Setup) -> NamedSharding:
    """[A,B,T]: microbatch axis unsharded, rows over the rules' batch axes."""
    row_spec = setup.rules.spec(("batch", "length"), setup.mesh)
    return NamedSharding(setup.mesh, PartitionSpec(None, *row_spec))


def _to_global(batch: dict, sharding: NamedSharding, accum: int) -> dict:
    """This process's rows [B_local,T] -> global arrays [A, B_global/A, T]."""

    def one(x):
        local = x.reshape(accum, x.shape[0] // accum, x.shape[1])
        return jax.make_array_from_process_local_data(sharding, local)

    return {k: one(v) for k, v in batch.items()}


def run_eval(setup: Setup, eval_fn, params, batches: list, sharding: NamedSharding) -> dict:
    """Mean token NLL and perplexity over the held-out batches."""
    total, count = 0.0, 0.0
    for b in batches:
        nll, n = eval_fn(params, {k: v[0] for k, v in _to_global(b, sharding, 1).items()})
        total, count = total + float(nll), count + float(n)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0)), "eval_tokens": count}


class _Preemption:
    """Sets a flag on SIGTERM (only installable from the main thread).

    Not installed in a multi-process job: there `jax.distributed.initialize` has installed JAX's
    own SIGTERM notifier, which feeds the preemption sync point (`_preempted`); a Python handler
    would replace it and SIGTERM would be ignored.
    """

    def __init__(self):
        self.flag = False
        self.previous = None

    def __enter__(self):
        main = threading.current_thread() is threading.main_thread()
        if main and jax.process_count() == 1:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.flag = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _run_config(setup: Setup) -> dict:
    return {"train": setup.config.to_dict(), "model": setup.model_config.to_hf()}


def write_run_config(workdir: str, config: tc.TrainConfig, steps: int) -> str:
    """Writes the resolved run config (the YAML file, ``--set`` and ``--steps`` applied, every
    default filled in) to ``WORKDIR/run_config.yaml``; it is itself a valid ``--config``."""
    resolved = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))
    text = (
        "# The resolved run config of this workdir (--config, --set and --steps applied, defaults\n"
        "# filled in), written by minimax_jax.train at the start of each run. Usable as --config.\n"
        + yaml.safe_dump(resolved.to_dict(), sort_keys=False, default_flow_style=False)
    )
    path = paths.join(workdir, RUN_CONFIG_FILE)
    if paths.is_url(workdir):  # an object store writes one object whole, never half
        paths.write_text(path, text)
    else:
        files.write_atomic(path, text)
    return path


def _restore_or_init(setup: Setup, tx, checkpointer, data_iter) -> tuple[dict, int]:
    """The newest readable checkpoint's state and step (else a fresh state and 0); unreadable
    newer ones are set aside with a warning."""
    state = init_state(setup, tx)
    for step in sorted(checkpointer.manager.all_steps(), reverse=True):
        try:
            return _restore(setup, checkpointer, data_iter, state, step), step
        except tc.ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any corruption: fall back to the previous one
            moved = checkpointer.set_aside(step)
            detail = " ".join(str(e).split())[:300] or type(e).__name__
            print(
                f"warning: checkpoint {step} is unreadable ({type(e).__name__}: {detail}); moved "
                f"to {moved}, resuming from the previous one",
                file=sys.stderr,
                flush=True,
            )
    return state, 0


def _restore(setup: Setup, checkpointer, data_iter, state: dict, step: int) -> dict:
    saved = checkpointer.restore_config(step)
    if ModelConfig.from_hf(saved["model"]) != ModelConfig.from_hf(setup.model_config.to_hf()):
        raise tc.ConfigError(
            f"the checkpoint in {checkpointer.directory} is of a different model: use a new "
            "--workdir or the same model config"
        )
    # the data positions first: a different process count is refused before the weights are read
    _set_data_state(data_iter, checkpointer.restore_data(step))
    restored = checkpointer.restore_state(step, ckpt.abstract_like(state))
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored["params"])):
        raise ValueError("non-finite parameters")
    return restored


@dataclasses.dataclass
class _Run:
    """What `train` builds before the step loop."""

    setup: Setup
    state: dict
    start: int
    data_iter: data_lib.Prefetch
    checkpointer: ckpt.Checkpointer
    log: MetricsLog
    step_fn: Any
    eval_fn: Any
    eval_data: list
    schedule: Any
    compute: Any
    workdir: str


class _Profile:
    """A `jax.profiler` trace of steps [start_step, start_step + steps) (``train.profile``) into
    ``WORKDIR/profile``; every process writes its own host's file."""

    def __init__(self, profile: dict | None, workdir: str):
        self.first = profile["start_step"] if profile else None
        self.last = self.first + profile["steps"] - 1 if profile else None
        self.directory = paths.join(workdir, PROFILE_DIR)
        self.active = False

    def before(self, step: int) -> None:
        if self.first is not None and not self.active and self.first <= step <= self.last:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and step >= self.last:
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False


def train(
    *,
    config: tc.TrainConfig,
    workdir: str,
    steps: int | None = None,
    setup: Setup | None = None,
) -> dict:
    """Runs (or resumes) training; returns a summary {step, loss, eval_loss, preempted, state}.

    ``workdir``: a local directory or a ``gs://`` URL (checkpoints through Orbax, which writes
    TensorStore arrays to local paths and ``gs://`` only; ``metrics.jsonl`` through
    ``etils.epath``; see ``minimax_jax.paths``)."""
    workdir = paths.location(workdir, "--workdir", ORBAX_SCHEMES)  # refused before any work
    setup = setup or prepare(config, steps)
    cfg, d = setup.config, setup.config.data
    with paths.remote(workdir, "--workdir"):
        paths.makedirs(workdir)
    if jax.process_index() == 0:
        write_run_config(workdir, cfg, setup.steps)
    tx, schedule = build_optimizer(cfg.optim, setup.steps)
    opts = run_options(cfg, setup.mesh, setup.rules)
    compute = _dtype(cfg.model.compute_dtype, "model.compute_dtype")
    pid, pcount = jax.process_index(), jax.process_count()
    data_iter = data_lib.Prefetch(data_lib.train_dataset(
        setup.docs, setup.train_idx, setup.tokenizer, setup.eos_id, seq_len=d.seq_len,
        batch_size=d.batch_size, seed=d.seed, process_index=pid, process_count=pcount,
    ), d.prefetch)  # fmt: skip
    with paths.remote(workdir, "--workdir"):  # Orbax on gs:// also needs google-cloud-storage
        checkpointer = ckpt.Checkpointer(
            paths.join(workdir, "checkpoints"), every=cfg.checkpoint.every,
            keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
        )  # fmt: skip
    with shard_lib.use_mesh(setup.mesh):
        state, start = _restore_or_init(setup, tx, checkpointer, data_iter)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        step_fn = jax.jit(
            make_train_step(setup.model_config, opts, compute, cfg.optim, tx),
            donate_argnums=0, out_shardings=(shardings, None),
        )  # fmt: skip
        eval_fn = jax.jit(make_eval_step(setup.model_config, opts, compute))
        eval_data = data_lib.eval_batches(
            setup.docs, setup.eval_idx, setup.tokenizer, setup.eos_id, seq_len=d.seq_len,
            batch_size=d.batch_size // d.grad_accum, max_batches=d.eval_batches,
            process_index=pid, process_count=pcount,
        ) if len(setup.eval_idx) else []  # fmt: skip
        log = MetricsLog(workdir, start, setup.steps, is_main=pid == 0, every=cfg.train.log_every,
                         log_section=cfg.log, config=_run_config(setup))  # fmt: skip
        run = _Run(setup, state, start, data_iter, checkpointer, log, step_fn, eval_fn, eval_data,
                   schedule, compute, workdir)  # fmt: skip
        try:
            return _loop(run)
        finally:
            data_iter.close()
            log.close()
            checkpointer.close()


def _data_state(it: data_lib.Prefetch) -> dict:
    """Every process's iterator position after the batches it returned (gathered: Orbax writes
    JSON from process 0 only)."""
    state = it.get_state()
    local = np.asarray([state["index"], state["offset"]], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        local = multihost_utils.process_allgather(local)
    return {"processes": np.asarray(local).reshape(-1, 2).tolist()}


def _set_data_state(it: data_lib.Prefetch, state: dict) -> None:
    rows = state["processes"]
    if len(rows) != jax.process_count():
        raise tc.ConfigError(
            f"the checkpoint was written by {len(rows)} processes, this run has "
            f"{jax.process_count()}: the data order cannot be resumed exactly"
        )
    index, offset = rows[jax.process_index()]
    it.set_state({"index": index, "offset": offset})


def _preempted(run: _Run, flag: bool, step: int) -> bool:
    """SIGTERM seen (one process), or JAX's multi-host preemption sync point reached."""
    if jax.process_count() == 1:
        return flag
    return run.checkpointer.manager.reached_preemption(step)


def _loop(run: _Run) -> dict:
    """The step loop of `train`."""
    setup, cfg, d = run.setup, run.setup.config, run.setup.config.data
    state, ckpter = run.state, run.checkpointer
    sharding = _batch_sharding(setup)
    peak = _peak_flops(cfg, run.compute)
    flops_tok = flops_per_token(setup.model_config, d.seq_len)
    run_cfg, summary = _run_config(setup), {"step": run.start, "preempted": False}
    bad_in_row, t_last = 0, time.perf_counter()
    last_saved, pinned = ckpter.latest_step(), None
    profile = _Profile(cfg.train.profile, run.workdir)
    with _Preemption() as signalled, contextlib.ExitStack() as cleanup:
        cleanup.callback(profile.stop)
        for step in range(run.start + 1, setup.steps + 1):
            profile.before(step)
            batch = _to_global(next(run.data_iter), sharding, d.grad_accum)
            state, metrics = run.step_fn(state, batch)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            profile.after(step, state)
            now = time.perf_counter()
            tok_s, t_last = d.batch_size * d.seq_len / (now - t_last), now
            m.update(step=step, lr=float(run.schedule(step - 1)), tokens_per_s=tok_s,
                     mfu=tok_s * flops_tok / (peak * jax.device_count()))  # fmt: skip
            last = step == setup.steps
            stop = _preempted(run, signalled.flag, step)
            if m["skipped"] and pinned is None and last_saved is not None:
                # the first non-finite step: its predecessor checkpoint is never rotated out
                pinned = last_saved
                ckpter.pin(pinned)
            if last or stop or ckpter.manager.should_save(step):
                ckpter.save(step, state, _data_state(run.data_iter), run_cfg, force=True)
                last_saved = step
            bad_in_row = bad_in_row + 1 if m["skipped"] else 0
            run.log.step(m, force=last or bool(m["skipped"]))
            summary.update(step=step, loss=m["loss"])
            if run.eval_data and _eval_due(cfg.train.eval_every, step, last):
                ev = run_eval(setup, run.eval_fn, state["params"], run.eval_data, sharding)
                run.log.eval(step, ev)
                summary.update(ev)
            if bad_in_row >= cfg.train.max_nonfinite:
                kept = f"checkpoint {pinned}" if pinned is not None else "no checkpoint"
                raise TrainError(
                    f"{bad_in_row} non-finite steps in a row (last at step {step}): lower "
                    f"optim.lr, enable clipping or check the data; {kept} (the newest from before "
                    "the first non-finite step) is kept"
                )
            if stop:
                ckpter.wait()
                run.log.note(f"preempted: saved checkpoint {step}, exiting")
                summary["preempted"] = True
                break
    summary["state"] = state
    return summary


def _eval_due(every: int, step: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def _peak_flops(cfg: tc.TrainConfig, compute: Any) -> float:
    if cfg.train.peak_tflops is not None:
        return cfg.train.peak_tflops * 1e12
    return measure_peak_flops(compute or _dtype(cfg.model.param_dtype, "model.param_dtype"))


def export(
    *, workdir: str, out_dir: str, dtype: str = "float32", overwrite: bool = False
) -> list[str]:
    """Writes the newest checkpoint's params as an HF directory (+ the run's tokenizer files).

    ``out_dir`` is built beside itself and renamed into place (``minimax_jax.outputs``); an
    existing one is refused unless ``overwrite`` and it is empty or an earlier export / conversion.
    """
    workdir = paths.location(workdir, "--workdir", ORBAX_SCHEMES)
    out = paths.location(out_dir, "--export")
    directory = paths.join(workdir, "checkpoints")
    if not paths.isdir(directory):
        raise FileNotFoundError(f"no checkpoint under {directory} to export")
    in_dir = directory if paths.is_url(directory) else Path(directory)
    flag = "--workdir checkpoints"
    outputs.prepare_output(in_dir, out, overwrite, flag, "--export")
    with paths.remote(workdir, "--workdir"):
        checkpointer = ckpt.Checkpointer(directory, every=1, keep=1, create=False)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory} to export")
    saved = checkpointer.restore_config(step)
    config = tc.from_dict(saved["train"])
    model_config = ModelConfig.from_hf(saved["model"])
    restored = checkpointer.manager.restore(step, args=ckpt.ocp.args.Composite(
        state=ckpt.ocp.args.StandardRestore()))["state"]  # fmt: skip
    checkpointer.close()
    params = restored["params"]
    params["blocks"] = _as_list(params["blocks"])
    tok = config.data.tokenizer or config.model.init_from
    key = "data.tokenizer" if config.data.tokenizer else "model.init_from"
    jdtype = _dtype(dtype, "--export_dtype")

    with contextlib.ExitStack() as stack:
        try:  # the run's tokenizer files go along when they can still be found
            local = stack.enter_context(paths.as_local(tok, key, patterns=paths.TOKENIZER_FILES))
            tok_dir = str(local if local.is_dir() else local.parent)
        except (paths.PathError, OSError) as e:
            print(f"warning: exporting without the tokenizer files: {e}", file=sys.stderr)
            tok_dir = None

        def build(tmp: Path) -> list[str]:
            return ckpt.export_pretrained(params, model_config, str(tmp), dtype=jdtype,
                                          tokenizer_dir=tok_dir)  # fmt: skip

        return outputs.atomic_output(out, overwrite, build, in_dir=in_dir, in_flag=flag,
                                     out_flag="--export", written_by="train --export")  # fmt: skip


def _as_list(blocks: Any) -> list:
    if isinstance(blocks, dict):
        return [blocks[k] for k in sorted(blocks, key=int)]
    return list(blocks)
