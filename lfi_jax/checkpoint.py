"""Orbax checkpoints holding the train state and the data iterator, together.

One checkpoint = {"state": params, optimizer state, step} + {"data": the grain iterator's
state, one file per process}. Every process writes its own shards of the state (orbax's
`ocdbt.process_<i>` folders) and its own iterator file (`data/process_<i>-of-<n>.json`).

Restores go against the *current* shardings (ShapeDtypeStructs carrying the new run's
NamedShardings), so a checkpoint written on one topology restores onto another: a run on
2 processes x 4 devices resumes on 1 process with 4 devices, or with 1.

The data iterator: with the same process count each process restores its own file. With
another process count those files do not exist; the train pipeline's global stream does not
depend on the process count (`lfi_jax.data.pipeline`: local batch t of every process together
make global batch t), so when the saved files all hold the same plain position
(`{"next_index": k}`) and the new iterator's state has that form too, the iterator is set to
position k and training continues on exactly the batches it would have seen. Otherwise (e.g.
iterators with worker processes, whose state is per worker) it restarts from its seed, with
a warning.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any

import grain.checkpoint as gc
import jax
import orbax.checkpoint as ocp

from lfi_jax.errors import UserError

log = logging.getLogger(__name__)


def _grain_args():
    return gc.CheckpointSave, gc.CheckpointRestore


class CheckpointMismatch(ValueError):
    """A checkpoint whose tree does not fit the train state asked for (one line, naming the dir)."""


class Checkpointer:
    """`read_only=True` (for loaders: evaluation, export) never creates, saves or deletes."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, enable_async_checkpointing=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def complete_steps(self) -> list[int]:
        """The steps whose checkpoint is completely written (finalized) on disk, ascending; an
        interrupted or still-running save is not among them."""
        return complete_steps(self.directory)

    def is_complete(self, step: int) -> bool:
        """Whether the checkpoint of `step` is completely written (finalized) on disk."""
        return int(step) in self.complete_steps()

    def _step_or_latest(self, step: int | None) -> int:
        steps = self.complete_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        if step is None:
            return steps[-1]
        if int(step) not in steps:  # a step the user asked for (--step): their error to fix
            raise UserError(f"no checkpoint of step {step} in {self.directory} (it has {steps})")
        return int(step)

    def _mismatch(self, step: int, e: Exception) -> CheckpointMismatch:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        if len(first) > 160:
            first = first[:157] + "..."
        return CheckpointMismatch(
            f"checkpoint {os.path.join(self.directory, str(step))} does not fit this run's train state "
            f"(model / optimizer config changed?): {type(e).__name__}: {first}"
        )

    def restore_params(self, abstract_params: Any, *, step: int | None = None):
        """Only the parameters (`state["params"]`) of the checkpoint of `step` (default: the
        latest complete one), onto the shardings of `abstract_params`; the optimizer state is
        not read. Returns (step, params)."""
        step = self._step_or_latest(step)
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        )
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
        except (ValueError, KeyError, TypeError) as e:
            raise self._mismatch(step, e) from e
        return step, restored["state"]["params"]

    def save(self, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
        save, _ = _grain_args()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = save(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iter=None, *, step: int | None = None):
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding),
        whatever topology wrote the checkpoint; `data_iter` (if given) is set to the saved
        position (see the module docstring). Returns (step, state)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        _, restore = _grain_args()
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise self._mismatch(step, e) from e
        state = restored["state"]
        if data_iter is not None:
            try:
                self.manager.restore(step, args=ocp.args.Composite(data=restore(data_iter)))
            except (ValueError, FileNotFoundError, KeyError) as e:  # other process count, or no data item
                position = self._saved_position(step)
                if position is not None and _plain_position(_get_state(data_iter)):
                    data_iter.set_state({"next_index": position})
                    log.warning(
                        "data iterator state of step %d was saved by another process count (%s); "
                        "continuing the global stream at batch %d",
                        step, e, position,
                    )
                else:
                    log.warning("data iterator state not restored from step %d (%s); restarting the iterator", step, e)
        return step, state

    def _saved_position(self, step: int) -> int | None:
        """The position all processes' saved iterator files agree on, if they are all plain
        `{"next_index": k}` states and every process of the saving run left one."""
        files = glob.glob(os.path.join(self.directory, str(step), "data", "process_*-of-*.json"))
        positions, counts = set(), set()
        for path in files:
            m = re.search(r"process_(\d+)-of-(\d+)\.json$", path)
            if not m:
                continue
            counts.add(int(m.group(2)))
            try:
                with open(path) as f:
                    state = json.load(f)
            except (OSError, ValueError):
                return None
            if not _plain_position(state):
                return None
            positions.add(int(state["next_index"]))
        if len(positions) != 1 or len(counts) != 1 or len(files) != counts.pop():
            return None
        return positions.pop()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def complete_steps(directory: str) -> list[int]:
    """The completely written (finalized) checkpoint steps in `directory`, ascending ([] when it
    does not exist); reads the directory only (no checkpoint manager is made). Orbax writes a
    step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` when it is complete
    (on object stores, where there is no rename, it marks it with `<step>/commit_success.txt`)."""
    if not os.path.isdir(directory):
        return []
    return sorted(ocp.path.step.checkpoint_steps(directory))


def _get_state(data_iter) -> Any:
    try:
        return data_iter.get_state()
    except Exception:  # an iterator without a readable state: nothing to reposition
        return None


def _plain_position(state: Any) -> bool:
    return isinstance(state, dict) and set(state) == {"next_index"} and isinstance(state["next_index"], int)


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
