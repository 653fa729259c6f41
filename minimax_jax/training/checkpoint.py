"""Training checkpoints with Orbax, and the params-only export that ``from_pretrained`` loads.

A checkpoint ``WORKDIR/checkpoints/<step>/`` holds three items:

* ``state``: the train state pytree {params (fp32), opt_state, step} (Orbax StandardSave; every
  process writes its shards, restore places them with the shardings of the abstract target);
* ``data``: the grain iterator state of this process (JSON);
* ``config``: the run config and the model's HF config (JSON), checked on restore.

Saves are asynchronous (the device-to-host copy happens before ``save`` returns, so the train
state may be donated right after); only finished checkpoints are ever restored, so a run killed
in the middle of a save restarts from the previous one. Steps in ``pinned`` (the newest checkpoint
from before a run's first non-finite step) are never rotated out; they are recorded in
``WORKDIR/pinned_checkpoints.json`` so a resumed run keeps them too.

WORKDIR may be a ``gs://`` / ``s3://`` / ``az://`` URL (``minimax_jax.paths``): Orbax writes
there itself (its commit protocol needs no rename on object stores); the pinned-steps file is
written whole as one object, and setting an unreadable checkpoint aside moves its files one by
one (object stores cannot rename a directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

from minimax_jax import paths
from minimax_jax.hf.pretrained import save_pretrained
from minimax_jax.model.causal_lm import MiniMaxForCausalLM

ITEMS = ("state", "data", "config")
PINNED_FILE = "pinned_checkpoints.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (unwritable directory, full disk): the run must end."""


@contextlib.contextmanager
def _writing(directory: str):
    """Any failure of a save (raised here or by Orbax's background threads) as one
    ``CheckpointWriteError`` naming the directory."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax raises many kinds from its threads
        detail = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointWriteError(f"cannot write a checkpoint under {directory}: {detail}") from e


class _Pinned(pp.PreservationPolicy):
    """Preserves the steps in a set that may grow during the run."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        return [c.step in self.steps for c in checkpoints]


class Checkpointer:
    """Save every ``every`` steps (and when forced), keep the ``keep`` newest, restore latest.

    Due steps are the multiples of ``every`` and JAX's preemption sync points; unlike Orbax's
    default policy, not also the first step of a run (one full save of a large model that
    nobody asked for).
    """

    def __init__(
        self, directory: str, *, every: int, keep: int, async_save: bool = True, create=True
    ):
        # a URL stays a string (os.path.abspath would make "gs://b" a local "gs:/b")
        self.directory = directory if paths.is_url(directory) else os.path.abspath(directory)
        self._pinned_file = paths.join(paths.parent(self.directory), PINNED_FILE)
        self.pinned: set[int] = set()
        if paths.isfile(self._pinned_file):
            self.pinned = {int(s) for s in read_json(self._pinned_file).get("steps", [])}
        policy = pp.AnyPreservationPolicy([pp.LatestN(keep), _Pinned(self.pinned)])
        options = ocp.CheckpointManagerOptions(
            should_save_fn=lambda step, _last: step % every == 0,
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=create,
            read_only=not create,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def pin(self, step: int) -> None:
        """Keeps checkpoint ``step`` whatever ``keep`` says (recorded for resumed runs too)."""
        self.pinned.add(step)
        paths.write_text(self._pinned_file, json.dumps({"steps": sorted(self.pinned)}))

    def set_aside(self, step: int) -> str:
        """Moves unreadable checkpoint ``step`` to ``WORKDIR/unreadable_checkpoints/<step>``
        (kept for inspection, out of the way of a new save of that step); returns where."""
        dest = paths.join(paths.parent(self.directory), "unreadable_checkpoints", str(step))
        paths.makedirs(paths.parent(dest))
        if paths.exists(dest):  # an earlier set-aside of this step
            paths.rmtree(dest)
        paths.move_tree(paths.join(self.directory, str(step)), dest)
        self.manager.reload()
        return dest

    def save(self, step: int, state: Any, data_state: dict, config: dict, *, force=False) -> bool:
        """Starts a save of ``step`` if it is due (or ``force``); returns whether it started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        with _writing(self.directory):
            return self.manager.save(step, args=args, force=force)

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The train state, placed like ``abstract_state``'s shardings (the JSON items are read
        by `restore_config` / `restore_data`)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def restore_config(self, step: int) -> dict:
        return self._restore_json(step, "config")

    def restore_data(self, step: int) -> dict:
        """The data iterator state alone (cheap: checked before the weights are read)."""
        return self._restore_json(step, "data")

    def _restore_json(self, step: int, item: str) -> dict:
        args = ocp.args.Composite(**{item: ocp.args.JsonRestore()})
        return self.manager.restore(step, args=args)[item]

    def wait(self) -> None:
        with _writing(self.directory):
            self.manager.wait_until_finished()

    def close(self) -> None:
        with _writing(self.directory):
            self.manager.wait_until_finished()
            self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restore targets."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def export_pretrained(
    params: dict,
    model_config: Any,
    out_dir: str,
    *,
    dtype: Any = jnp.float32,
    tokenizer_dir: str | None = None,
    schema: str | None = None,
) -> list[str]:
    """Writes params (our nested layout) as an HF directory loadable by ``from_pretrained``.

    Floating weights are cast to ``dtype`` (the MoE router stays fp32, as the model keeps it);
    ``tokenizer.json`` / ``tokenizer_config.json`` are copied from ``tokenizer_dir`` when given.
    Returns the file names written.
    """
    model = nnx.eval_shape(
        lambda: MiniMaxForCausalLM(model_config, rngs=nnx.Rngs(0), param_dtype=dtype)
    )
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    abstract = nnx.to_pure_dict(state)

    def cast(spec, value):
        return jnp.asarray(jax.device_get(value)).astype(spec.dtype)

    pure = dict(params)
    pure["blocks"] = {i: b for i, b in enumerate(params["blocks"])}
    nnx.replace_by_pure_dict(state, jax.tree.map(cast, abstract, pure))
    written = save_pretrained(nnx.merge(graphdef, state, rest), out_dir, schema=schema)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
            written.append(name)
    return written


def read_json(path: str) -> dict:
    """A JSON file, local or at a URL."""
    return json.loads(paths.read_text(path))
