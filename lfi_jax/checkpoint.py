"""Orbax checkpoints holding the train state and the data iterator, together.

One checkpoint = {"state": params, optimizer state, step} + {"data": the grain iterator's
state, one file per process}. Restores go against the *current* shardings, so a checkpoint
written on one topology restores onto another (the data iterator state only where the
process count is unchanged; elsewhere the iterator restarts from its seed, with a warning).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _grain_args():
    import grain.checkpoint as gc

    return gc.CheckpointSave, gc.CheckpointRestore


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
        save, _ = _grain_args()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = save(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iter=None, *, step: int | None = None):
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        _, restore = _grain_args()
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        if data_iter is not None:
            try:
                self.manager.restore(step, args=ocp.args.Composite(data=restore(data_iter)))
            except (ValueError, FileNotFoundError, KeyError) as e:  # other process count, or no data item
                log.warning("data iterator state not restored from step %d (%s); restarting the iterator", step, e)
        return step, state

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
