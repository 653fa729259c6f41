"""Multi-process training on CPU: two `python -m minimax_jax.train` processes (2 devices each)
joined by `jax.distributed` through the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment, against one process with 4 devices fed the same global batches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import train_fixtures as fx

from minimax_jax import distributed as dist
from minimax_jax import sharding as shard_lib
from minimax_jax.training import data as data_lib
from minimax_jax.training import loop as train_lib
from minimax_jax.training import run_config as tc
from minimax_jax.training.log import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fx.make_corpus(str(tmp_path_factory.mktemp("corpus")), n_docs=6, words=8)


def test_distributed_args_from_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}  # fmt: skip
    want = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert shard_lib.distributed_args(env) == want
    assert shard_lib.distributed_args({"JAX_COORDINATOR_ADDRESS": "h:1"}) == {
        "coordinator_address": "h:1"
    }  # the rest from a cluster JAX detects
    assert shard_lib.distributed_args({}) is None
    assert shard_lib.distributed_args({"SLURM_JOB_NUM_NODES": "1"}) is None
    assert shard_lib.distributed_args({"SLURM_JOB_NUM_NODES": "2"}) == {}
    assert shard_lib.distributed_args({"OMPI_COMM_WORLD_SIZE": "8"}) == {}
    bad = [
        ({**env, "JAX_PROCESS_ID": "4"}, "outside 0..JAX_NUM_PROCESSES-1=3"),
        ({**env, "JAX_NUM_PROCESSES": "four"}, "JAX_NUM_PROCESSES='four' is not an integer"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "set both"),
        ({"JAX_COORDINATOR_ADDRESS": "hostonly"}, "expected host:port"),
    ]
    for e, message in bad:
        with pytest.raises(ValueError, match=message):
            shard_lib.distributed_args(e)


# Every variable the detection (ours and JAX's clusters) reads: cleared around the tests below.
_CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "SLURM_JOB_NUM_NODES", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                 "SLURM_PROCID", "SLURM_LOCALID", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri",
                 "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                 "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "MEGASCALE_COORDINATOR_ADDRESS",
                 "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_PORT")  # fmt: skip
# A 4-host TPU slice as GKE (and launchers such as xpk) describe it; numeric addresses, so JAX's
# wait for the coordinator's name resolves without a network. JAX reads the MEGASCALE_* values
# from the VM's metadata when they are not in the environment.
_SLICE = {"TPU_WORKER_HOSTNAMES": "127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4", "TPU_WORKER_ID": "2",
          "MEGASCALE_COORDINATOR_ADDRESS": "127.0.0.1", "MEGASCALE_NUM_SLICES": "1",
          "MEGASCALE_SLICE_ID": "0"}  # fmt: skip


def _no_metadata():
    raise AssertionError("the TPU metadata was asked for although the environment decides")


def test_distributed_modes_and_tpu_slices():
    """auto: a single-host TPU VM runs as one process, a slice of several hosts (environment or
    metadata) and multislice join with JAX's detection ({}); off never joins; on always does."""
    args = dist.distributed_args
    one_host = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}
    assert args(one_host, tpu_processes=lambda: 1) is None  # GKE single host
    assert args({}, tpu_processes=lambda: 1) is None  # GCE TPU VM, metadata lists one worker
    assert args({}, tpu_processes=lambda: None) is None  # not a TPU VM
    assert args(_SLICE, tpu_processes=_no_metadata) == {}
    assert args({"TPU_PROCESS_ADDRESSES": "h0:1,h1:1"}, tpu_processes=_no_metadata) == {}
    assert args({}, tpu_processes=lambda: 4) == {}  # GCE slice: 4 workers in the metadata
    multislice = {**one_host, "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1"}
    assert args(multislice, tpu_processes=_no_metadata) == {}
    explicit = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    everything = {**_SLICE, **explicit, "SLURM_JOB_NUM_NODES": "4"}
    assert args(everything, mode="off", tpu_processes=_no_metadata) is None
    assert args({}, mode="off", tpu_processes=_no_metadata) is None
    assert args({}, mode="on", tpu_processes=_no_metadata) == {}
    assert args(one_host, mode="on", tpu_processes=_no_metadata) == {}
    want = {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    assert args(explicit, mode="on") == want == args(explicit, mode="auto")
    with pytest.raises(ValueError, match="distributed mode 'yes': expected one of auto, on, off"):
        args({}, mode="yes")


def test_detection_agrees_with_jax_clusters(monkeypatch):
    """On a (simulated) Cloud TPU VM, JAX's own cluster detection finds 4 processes for the slice
    environment that `distributed_args` joins, and 1 for the single host that it does not; off a
    TPU VM `tpu_slice_processes` answers None without asking the metadata server."""
    from jax._src.clusters import cloud_tpu_cluster, cluster

    for name in _CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: _no_metadata())
    assert dist.tpu_slice_processes() is None  # this machine is no TPU VM
    for module in (cloud_tpu_cluster, cluster):
        monkeypatch.setattr(module, "running_in_cloud_tpu_vm", True)
    detect = cluster.ClusterEnv.auto_detect_unset_distributed_params
    for name, value in _SLICE.items():
        monkeypatch.setenv(name, value)
    assert detect(None, None, None, None, None, 5) == ("127.0.0.1:8482", 4, 2, None)
    assert dist.distributed_args(tpu_processes=_no_metadata) == {}
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "2")
    monkeypatch.setenv("MEGASCALE_SLICE_ID", "1")
    assert detect(None, None, None, None, None, 5)[1:3] == (8, 6)  # slice 1, worker 2 of 4
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")
    monkeypatch.setenv("MEGASCALE_SLICE_ID", "0")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "127.0.0.1")
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    assert detect(None, None, None, None, None, 5)[1:3] == (1, 0)
    assert dist.tpu_slice_processes() == 1  # JAX's GKE detection, through ours
    assert dist.distributed_args() is None


def test_maybe_initialize_follows_the_mode(monkeypatch):
    """`maybe_initialize_distributed`: a slice environment calls `jax.distributed.initialize()`
    with no arguments (JAX detects the rest) once per process; off never calls it; on without a
    cluster turns JAX's complaint into an error naming the variables to set."""
    calls = []

    def initialize(**kwargs):
        calls.append(kwargs)
        if not kwargs and "TPU_WORKER_HOSTNAMES" not in os.environ:
            raise ValueError("coordinator_address should be defined.")  # what JAX raises

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "tpu_slice_processes", lambda: None)
    for name in _CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)

    def fresh(mode):
        monkeypatch.setitem(dist._STATE, "decided", False)
        return dist.maybe_initialize_distributed(mode)

    assert fresh("auto") is False and calls == []
    for name, value in _SLICE.items():
        monkeypatch.setenv(name, value)
    assert fresh("off") is False and calls == []
    assert dist.maybe_initialize_distributed("auto") is False and calls == []  # off stands
    assert fresh("auto") is True and calls == [{}]
    assert dist.maybe_initialize_distributed() is False and calls == [{}]  # e.g. make_mesh's
    for name in _SLICE:
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="JAX found no cluster.*JAX_COORDINATOR_ADDRESS"):
        fresh("on")
    assert calls == [{}, {}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(cfg: str, workdir: str, cache: str, extra: list[str] = ()) -> list[subprocess.Popen]:
    """Two processes of one job, each with 2 CPU devices, sharing a compilation cache."""
    port, procs = _free_port(), []
    for pid in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            JAX_NUM_CPU_DEVICES="2",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            JAX_COMPILATION_CACHE_DIR=cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            PYTHONPATH=fx.REPO,
        )
        env.pop("XLA_FLAGS", None)
        cmd = [sys.executable, "-m", "minimax_jax.train", "--config", cfg, "--workdir", workdir]
        procs.append(subprocess.Popen([*cmd, *extra], cwd=fx.REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 300.0) -> list[dict]:
    """Waits for every process; each must exit 0. Returns their final JSON summaries."""
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, stderr[-3000:]
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _wait_for_step(procs: list[subprocess.Popen], workdir: str, step: int, timeout=300.0) -> None:
    path = os.path.join(workdir, "metrics.jsonl")
    start = time.time()
    while time.time() - start < timeout:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a process ended early: {p.communicate()[1][-3000:]}")
        if os.path.exists(path):
            rows = [json.loads(x) for x in open(path) if x.strip()]
            if any(r.get("step", 0) >= step and "loss" in r for r in rows):
                return
        time.sleep(0.05)
    for p in procs:
        p.kill()
    raise AssertionError(f"timed out waiting for step {step}")


class _ProcessRows:
    """One process's view of a 2-process job, replayed in a single process: the global batch is
    process 0's rows followed by process 1's (the order `make_array_from_process_local_data`
    gives on a mesh whose devices are listed process by process)."""

    def __init__(self, parts):
        self.parts = parts

    def __iter__(self):
        return self

    def __next__(self):
        got = [next(p) for p in self.parts]
        return {k: np.concatenate([g[k] for g in got]) for k in got[0]}

    def get_state(self):
        return self.parts[0].get_state()


def _one_process_reference(cfg, workdir: str, monkeypatch) -> dict[int, dict]:
    real_train, real_eval = data_lib.train_dataset, data_lib.eval_batches

    def train_dataset(*args, process_index, process_count, **kw):
        assert (process_index, process_count) == (0, 1)
        return _ProcessRows([real_train(*args, process_index=i, process_count=2, **kw)
                             for i in range(2)])  # fmt: skip

    def eval_batches(*args, process_index, process_count, batch_size, **kw):
        assert (process_index, process_count) == (0, 1)
        per = [real_eval(*args, process_index=i, process_count=2, batch_size=batch_size, **kw)
               for i in range(2)]  # fmt: skip
        return [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*per, strict=True)]

    monkeypatch.setattr(data_lib, "train_dataset", train_dataset)
    monkeypatch.setattr(data_lib, "eval_batches", eval_batches)
    setup = train_lib.prepare(cfg)
    assert setup.mesh.devices.size == 4
    train_lib.train(config=cfg, workdir=workdir, setup=setup)
    return _rows(workdir)


def _rows(workdir: str) -> dict[int, dict]:
    """step -> merged train and eval metrics."""
    out: dict[int, dict] = {}
    for r in read_metrics(workdir):
        out.setdefault(r["step"], {}).update(r)
    return out


@pytest.mark.slow
def test_two_processes_match_one_then_sigterm_and_resume(corpus, tmp_path, monkeypatch):
    """A 2-process job (2 x 2 CPU devices, FSDP over 4) computes the same losses and eval losses
    as one process with 4 devices fed the same global batches; SIGTERM to one process makes both
    save the same step and exit 0; restarted, both resume and the later steps match too."""
    raw = fx.raw_config(
        *corpus,
        model=fx.TWO_LAYERS,
        data={"batch_size": 8, "eval_fraction": 0.34, "eval_batches": 2},
        optim={"decay_steps": 30, "warmup_steps": 3},
        train={"steps": 1000, "eval_every": 4, "log_every": 1},
        checkpoint={"every": 1000},
        mesh={"num_devices": None},
    )
    cfg_path = fx.write_yaml(str(tmp_path / "run.yaml"), raw)
    work, cache = str(tmp_path / "job"), str(tmp_path / "xla_cache")

    procs = _launch(cfg_path, work, cache)
    _wait_for_step(procs, work, 5)
    procs[1].send_signal(signal.SIGTERM)  # one host is told; the sync point stops both
    first = _finish(procs)
    k = first[0]["step"]
    assert all(s["preempted"] for s in first) and first[1]["step"] == k >= 5, first
    saved = os.path.join(work, "checkpoints", str(k))
    assert os.listdir(os.path.join(work, "checkpoints")) == [str(k)]  # checkpoint.every is 1000
    with open(os.path.join(saved, "data", "metadata")) as f:  # both processes' positions
        positions = json.load(f)["processes"]
    assert len(positions) == 2 and all(index > 0 for index, _ in positions), positions

    again = _finish(_launch(cfg_path, work, cache, ["--steps", str(k + 3)]))
    assert [s["step"] for s in again] == [k + 3, k + 3] and not again[0]["preempted"]
    got = _rows(work)
    assert sorted(got) == list(range(1, k + 4)), sorted(got)  # one writer, no repeated steps

    ref = {**raw, "train": {**raw["train"], "steps": k + 3}, "mesh": {"num_devices": 4}}
    ref_cfg = fx.config(*corpus, **ref)
    want = _one_process_reference(ref_cfg, str(tmp_path / "one"), monkeypatch)
    assert sorted(want) == sorted(got)
    for key in ("loss", "grad_norm", "eval_loss"):
        steps = [s for s in want if key in want[s]]
        assert all(key in got[s] for s in steps), (key, steps)
        np.testing.assert_allclose([got[s][key] for s in steps], [want[s][key] for s in steps],
                                   rtol=1e-5, err_msg=key)  # fmt: skip
    assert {4, k + 3} <= {s for s in want if "eval_loss" in want[s]}
    # the 2-process checkpoint does not resume in one process (the data order would change)
    with pytest.raises(tc.ConfigError, match="written by 2 processes, this run has 1"):
        train_lib.train(config=ref_cfg, workdir=work, steps=k + 4)


def test_bad_process_split_fails_before_compiling(corpus, monkeypatch):
    """With 2 processes: a batch that does not split into processes x microbatches, fewer
    training documents than processes, or a mesh on part of the devices is refused by `prepare`
    with the reason."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    cfg = fx.config(*corpus, data={"batch_size": 6, "grad_accum": 2}, mesh={"num_devices": None})
    with pytest.raises(tc.ConfigError, match="batch_size = 6 must split into 2 process"):
        train_lib.prepare(cfg)
    cfg = fx.config(*corpus, data={"eval_fraction": 0.9}, mesh={"num_devices": None})
    with pytest.raises(data_lib.DataError, match="1 training document.* cannot feed 2 processes"):
        train_lib.prepare(cfg)
    cfg = fx.config(*corpus, mesh={"num_devices": 2})
    with pytest.raises(tc.ConfigError, match="mesh must span all 8 devices of every process"):
        train_lib.prepare(cfg)


def test_generate_two_processes_print_once():
    """`python -m minimax_jax.generate --mesh tensor=2` as a 2-process job (one CPU device each):
    process 0 prints the greedy text of a one-process run; process 1 prints nothing."""
    cmd = [sys.executable, "-m", "minimax_jax.generate", "--prompt", "def add(a, b):",
           "--max_new_tokens", "8", "--greedy", "--prefill_chunk", "16"]  # fmt: skip
    base = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=fx.REPO)
    base.pop("XLA_FLAGS", None)
    one = subprocess.run(cmd, cwd=fx.REPO, env=base, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [
        subprocess.Popen([*cmd, "--mesh", "tensor=2"], cwd=fx.REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(base, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
        for i in range(2)
    ]  # fmt: skip
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr[-3000:]
            outs.append((stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # gloo (CPU collectives) itself prints "[Gloo] Rank i is connected ..." on stdout
    text = ["".join(x for x in o.splitlines(True) if not x.startswith("[Gloo]")) for o, _ in outs]
    assert one.stdout.strip() and text[0] == one.stdout
    assert text[1] == "" and "[done]" in outs[0][1] and "[done]" not in outs[1][1]
