"""Joining a multi-process job: whether to call `jax.distributed.initialize`, and with what.

The same command runs on every host of a job (every host of a Cloud TPU slice, every node or
GPU process of a Slurm / Open MPI launch). The mode (``--distributed`` of generate and train,
``train.distributed`` of a run config) decides:

    auto  join when the environment describes a job of more than one process (below); otherwise
          run as one process
    on    always join: JAX's own cluster detection fills in what the environment does not give
          (a clear error when it finds no cluster)
    off   never join: every host runs on its own

``auto`` joins for
- ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``: an explicit launch (JAX itself reads only the address);
- a Slurm job over several nodes (``SLURM_JOB_NUM_NODES`` > 1) or an Open MPI launch of several
  ranks (``OMPI_COMM_WORLD_SIZE`` > 1);
- a Cloud TPU slice of several hosts: ``TPU_WORKER_HOSTNAMES`` (or ``TPU_PROCESS_ADDRESSES``)
  listing more than one host (GKE, and launchers that set them), ``MEGASCALE_NUM_SLICES`` > 1
  (multislice), or, on a Cloud TPU VM with neither, a slice whose worker list in the VM's
  metadata (``worker-network-endpoints``, read by JAX's own detection) has more than one host.
  A single-host TPU VM runs as one process.

In every case but the first, `jax.distributed.initialize()` gets no arguments: JAX's cluster
detection (``jax._src.clusters``) finds the coordinator, the process count and this process's id.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import jax

MODES = ("auto", "on", "off")
# The first call of `maybe_initialize_distributed` in a process decides (a later call, such as
# `make_mesh`'s, keeps that decision: `--distributed off` is not overridden by an "auto" there).
_STATE = {"decided": False}


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def _explicit_args(env: Mapping[str, str]) -> dict:
    """The arguments of a JAX_COORDINATOR_ADDRESS launch, validated."""
    addr = env["JAX_COORDINATOR_ADDRESS"]
    count, pid = _env_int(env, "JAX_NUM_PROCESSES"), _env_int(env, "JAX_PROCESS_ID")
    if not addr or ":" not in addr:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS={addr!r}: expected host:port of process 0")
    if (count is None) != (pid is None):
        raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither")
    if count is not None and not 0 <= pid < count:
        raise ValueError(f"JAX_PROCESS_ID={pid} is outside 0..JAX_NUM_PROCESSES-1={count - 1}")
    args = {"coordinator_address": addr}
    if count is not None:
        args.update(num_processes=count, process_id=pid)
    return args


def _hosts(value: str | None) -> int:
    return len([h for h in (value or "").split(",") if h.strip()])


def multi_process_env(env: Mapping[str, str]) -> str | None:
    """The environment variable that shows a job of several processes (Slurm, Open MPI, a TPU
    slice of several hosts, multislice), or None. Reads only ``env``: no network."""
    if (_env_int(env, "SLURM_JOB_NUM_NODES") or 1) > 1:
        return "SLURM_JOB_NUM_NODES"
    if (_env_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "OMPI_COMM_WORLD_SIZE"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):  # JAX reads them in this order
        if name in env:
            if _hosts(env[name]) > 1:
                return name
            break
    if (_env_int(env, "MEGASCALE_NUM_SLICES") or 1) > 1:
        return "MEGASCALE_NUM_SLICES"
    return None


def tpu_slice_processes() -> int | None:
    """Processes of this Cloud TPU VM's slice(s) by JAX's own detection, or None off a TPU VM.

    On a TPU VM (libtpu installed and TPU chips attached, as `jax` found at import) this asks the
    VM's metadata server, as `jax.distributed.initialize()` would: the hosts of the slice
    (``worker-network-endpoints``) times ``MEGASCALE_NUM_SLICES``. Anywhere else it returns None
    at once, without a network call.
    """
    try:
        from jax._src.clusters import cloud_tpu_cluster as tpu
    except ImportError:  # pragma: no cover - a JAX that moved its private modules
        return None
    if not getattr(tpu, "running_in_cloud_tpu_vm", False):  # set by `import jax`
        return None
    for cluster in (tpu.GkeTpuCluster, tpu.GceTpuCluster):
        try:
            if cluster.is_env_present():
                return int(cluster.get_process_count())
        except Exception:  # noqa: BLE001 - no metadata server: not a slice JAX could join either
            continue
    return None


def distributed_args(
    env: Mapping[str, str] | None = None,
    *,
    mode: str = "auto",
    tpu_processes: Callable[[], int | None] | None = None,
) -> dict | None:
    """The `jax.distributed.initialize` arguments for ``mode`` in ``env`` (default: the process
    environment), or None (run as one process). ``{}`` leaves everything to JAX's detection.

    ``tpu_processes`` (default `tpu_slice_processes`, which on a Cloud TPU VM queries the
    metadata server) is asked only in "auto" mode when the environment alone shows no
    multi-process job.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r}: expected one of {', '.join(MODES)}")
    env = os.environ if env is None else env
    if mode == "off":
        return None
    if "JAX_COORDINATOR_ADDRESS" in env:
        return _explicit_args(env)
    if mode == "on" or multi_process_env(env) is not None:
        return {}
    processes = (tpu_processes or tpu_slice_processes)()
    return {} if processes is not None and processes > 1 else None


def _no_cluster_error(mode: str, error: Exception) -> ValueError:
    return ValueError(
        f"distributed mode {mode!r} (--distributed / train.distributed): JAX found no cluster "
        f"to join ({error}); start the command on every host of a TPU slice or under Slurm / "
        "Open MPI, or set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and "
        "JAX_PROCESS_ID, or use auto / off"
    )


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Calls `jax.distributed.initialize` when ``mode`` and the environment say so (see
    `distributed_args`); must run before anything asks JAX for devices. Only the first call of a
    process decides; later calls return False. Returns True when it initialised."""
    if _STATE["decided"] or jax.distributed.is_initialized():
        return False
    args = distributed_args(mode=mode)
    _STATE["decided"] = True
    if args is None:
        return False
    try:
        jax.distributed.initialize(**args)
    except ValueError as e:  # JAX's detection found nothing: no coordinator / process count
        if args:
            raise
        raise _no_cluster_error(mode, e) from None
    return True
