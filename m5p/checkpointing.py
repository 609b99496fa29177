"""Orbax checkpoints of the train state and the Grain iterator, resumable onto any mesh."""
from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves `{state, data_iter, meta}` every so often; restores the latest one."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, meta: dict, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """Restores onto the shardings carried by `abstract_state`; `data_iter` is reset in place."""
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
