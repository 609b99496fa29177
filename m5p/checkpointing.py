"""Orbax checkpoints of the train state and Grain iterator: verified, resumable onto any mesh.

Guarantees (each drilled by tools/drills.py):
- Every saved checkpoint records a checksum of each state array
  (m5p.state_checksum) in its `meta` item; a non-finite state is never saved.
- `restore_latest` checks the newest checkpoint's parameter shapes against
  the config's (a mismatch is a user error naming the parameter and the
  config field), then restores it and recomputes the checksums. A checkpoint
  that cannot be read or fails the check is reported by step and path and
  moved to `<workdir>/checkpoints.damaged/`, and the previous one is tried:
  garbage is never restored silently, and the moved one no longer counts
  against `keep_checkpoints`.
- When non-finite steps stop a run, the checkpoints holding the state that went
  non-finite are moved to `<workdir>/checkpoints.diverged/` (`set_aside_from`), so
  a rerun resumes from before it.
- Half-written saves (`<step>.orbax-checkpoint-tmp*`, left by a killed run)
  are reported and removed when the Checkpointer starts.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from m5p import distributed, state_checksum
from m5p.failures import ConfigError, Diverged, UserError

log = logging.getLogger("m5p")

TMP_MARKER = ".orbax-checkpoint-tmp"
DAMAGED_DIR = "checkpoints.damaged"
DIVERGED_DIR = "checkpoints.diverged"
# Data fields that set parameter shapes (vocabulary, positions, patches).
SHAPE_DATA_FIELDS = ("vocab_size", "text_len", "table_len", "max_fields", "image_size",
                     "max_frames", "audio_frames", "n_mels", "features")


@contextlib.contextmanager
def _quiet_absl():
  """Orbax warns through absl about a sub-item's missing step metadata: not news here."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


_ORBAX_READS = "_read_array_index_and_device_put"


def _quiet_orbax_reads() -> None:
  """After a failed restore, orbax's other array reads die as orphaned coroutines, each
  printed by Python as 'Exception ignored in: <coroutine ...>' with a TensorStore spec
  (hundreds of lines, some at exit). The failure is already reported once, by step and
  path: from now on this process drops those (and only those) messages."""
  previous = sys.unraisablehook
  if getattr(previous, "m5p_quiet", False):
    return

  def hook(unraisable):
    if _ORBAX_READS in repr(getattr(unraisable, "object", "")):
      return
    previous(unraisable)

  hook.m5p_quiet = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook
  # TensorStore's completion callbacks of those reads then find orbax's event loop
  # closed, and print each RuntimeError through sys.excepthook (PyErr_Print).
  previous_excepthook = sys.excepthook

  def excepthook(kind, value, tb):
    if kind is RuntimeError and str(value) == "Event loop is closed" and _in_asyncio(tb):
      return
    previous_excepthook(kind, value, tb)

  sys.excepthook = excepthook


def _in_asyncio(tb: Any) -> bool:
  """Whether a traceback was raised inside asyncio itself (its innermost frame)."""
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and os.sep + "asyncio" + os.sep in tb.tb_frame.f_code.co_filename


class CheckpointDamaged(Exception):
  """A checkpoint that cannot be restored as saved."""


def _is_primary() -> bool:
  return jax.process_index() == 0


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey.
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree: Any) -> dict[str, tuple]:
  """{'params/word_embed/embedding': shape}: the same names for a live state (dataclass,
  named tuples) and for orbax's metadata of it (dicts and lists)."""
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _plain(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def config_differences(saved: dict, config: ml_collections.ConfigDict, label: str) -> list[str]:
  """'model.width: 64 (<label>) vs 32 (config)' for each shape-setting field that differs."""
  out = []
  for section, keys in (("model", None), ("data", SHAPE_DATA_FIELDS), ("classify", ("hidden",))):
    theirs, ours = _plain(saved.get(section, {})), _plain(config.get(section, {}))
    for k in keys or sorted(set(theirs) | set(ours)):
      a, b = theirs.get(k, "<absent>"), ours.get(k, "<absent>")
      if a != b:
        out.append(f"{section}.{k}: {a} ({label}) vs {b} (config)")
  return out


class Checkpointer:
  """Saves `{state, data_iter, meta}` every so often; restores the newest good one."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool, mesh=None):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.damaged_dir = os.path.abspath(os.path.join(workdir, DAMAGED_DIR))
    self.diverged_dir = os.path.abspath(os.path.join(workdir, DIVERGED_DIR))
    self.mesh = mesh
    if _is_primary():
      self.remove_unfinished()
    distributed.barrier("checkpoints_cleaned")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=False))  # Ours reports them first (remove_unfinished).

  # -- Housekeeping -------------------------------------------------------------

  def remove_unfinished(self) -> list[str]:
    """Removes (and reports) saves a stopped run never finalized; returns their paths."""
    if not os.path.isdir(self.directory):
      return []
    removed = []
    for name in sorted(os.listdir(self.directory)):
      if TMP_MARKER not in name:
        continue
      path = os.path.join(self.directory, name)
      step = name.split(".", 1)[0]
      log.warning("Removing an unfinished checkpoint save of step %s (%s): the run writing it "
                  "stopped before it was complete; it was never used.", step, path)
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
    return removed

  def _move_aside(self, step: int, folder: str) -> str:
    """Moves checkpoint `step` into `folder` (process 0; the others wait); its new path."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(folder, str(step))
    if _is_primary() and os.path.exists(src):
      os.makedirs(folder, exist_ok=True)
      k = 1
      while os.path.exists(dst):
        dst, k = os.path.join(folder, f"{step}.{k}"), k + 1
      os.replace(src, dst)
    distributed.barrier(f"checkpoint_{step}_moved")
    return dst

  def set_aside_from(self, first_step: int) -> list[int]:
    """Moves the checkpoints of steps >= first_step to <workdir>/checkpoints.diverged/
    (they hold a state that went non-finite); returns their steps."""
    self.manager.wait_until_finished()
    steps = [s for s in self.all_steps() if s >= first_step]
    for step in steps:
      self._move_aside(step, self.diverged_dir)
    if steps:
      self.manager.reload()
    return steps

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- Saving ---------------------------------------------------------------------

  def save(self, step: int, state: Any, data_iter: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves `state` with its checksums; Diverged (nothing saved) if it holds a non-finite value."""
    summary = state_checksum.summarize(state, self.mesh)
    if summary["nonfinite"]:
      bad = sorted(summary["nonfinite"])
      raise Diverged(f"step {step}: {len(bad)} state arrays hold non-finite values (e.g. "
                     f"{bad[0]}); not saved, the earlier checkpoints are kept")
    meta = dict(meta, integrity=summary)
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  # -- Restoring ------------------------------------------------------------------

  def check_shapes(self, step: int, abstract_state: Any, config: ml_collections.ConfigDict) -> None:
    """ConfigError naming a parameter and the config fields when the checkpoint's state
    differs in shape from `abstract_state`; CheckpointDamaged when its metadata is unreadable."""
    path = os.path.join(self.step_path(step), "state")
    try:
      with _quiet_absl(), ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
      saved = _shapes(getattr(meta, "item_metadata", meta))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointDamaged(f"its state metadata is unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    wanted = _shapes(abstract_state)
    if saved == wanted:
      return
    if not saved:
      raise CheckpointDamaged("its state holds no arrays")
    saved_config = self._saved_config(step)
    if not saved_config:  # Shapes differ and the config it was saved with is unreadable.
      raise CheckpointDamaged("its meta item (the config it was saved with) is unreadable")
    bad = sorted((k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k)),
                 key=lambda k: (not k.startswith("params/"), k))  # A parameter first.
    fields = config_differences(saved_config, config, "checkpoint")
    shown = "; ".join(fields[:6]) + (f"; and {len(fields) - 6} more" if len(fields) > 6 else "")
    first = bad[0]
    raise ConfigError(
        f"{self.step_path(step)}: the checkpoint's model differs from this config's "
        f"({len(bad)} arrays differ, e.g. {first}: {saved.get(first, 'absent')} in the "
        f"checkpoint vs {wanted.get(first, 'absent')} here); differing config fields: "
        f"{shown or 'none recorded'}. Use the checkpoint's values, or another --workdir.")

  def _saved_config(self, step: int) -> dict:
    path = os.path.join(self.step_path(step), "meta", "metadata")
    try:
      with open(path, encoding="utf-8") as f:
        return json.loads(json.load(f).get("config") or "{}")
    except (OSError, ValueError, AttributeError):
      return {}

  def _restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      _quiet_orbax_reads()
      gc.collect()  # The orphaned reads go now, quietly.
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      raise CheckpointDamaged(f"restoring it failed ({type(e).__name__}: {first})") from None
    state, meta = restored["state"], restored["meta"]
    if not isinstance(meta, dict):
      raise CheckpointDamaged("its meta item is not a JSON object")
    return state, meta

  def verify(self, step: int, state: Any, meta: dict) -> None:
    """CheckpointDamaged unless `state` has the checksums recorded at save time and is finite."""
    summary = state_checksum.summarize(state, self.mesh)
    if summary["nonfinite"]:
      bad = sorted(summary["nonfinite"])
      raise CheckpointDamaged(f"{len(bad)} restored arrays hold non-finite values (e.g. {bad[0]})")
    recorded = meta.get("integrity")
    if not recorded:
      log.warning("Checkpoint of step %d (%s) has no recorded checksums (an older m5p wrote it): "
                  "restored unverified (it is finite).", step, self.step_path(step))
      return
    diff = state_checksum.differences(recorded, summary)
    if diff:
      raise CheckpointDamaged(f"{len(diff)} arrays differ from their checksums at save time "
                              f"(e.g. {diff[0]})")

  def restore_latest(self, abstract_state: Any, data_iter: Any,
                     config: ml_collections.ConfigDict) -> tuple[Any, dict, int] | None:
    """(state, meta, step) of the newest checkpoint that restores and verifies; None if
    there is none. Damaged newer ones are reported and moved aside; if every one is
    damaged, UserError (nothing is moved)."""
    steps = sorted(self.all_steps(), reverse=True)
    failed: list[tuple[int, str]] = []
    for step in steps:
      try:
        self.check_shapes(step, abstract_state, config)
        state, meta = self._restore(step, abstract_state, data_iter)
        self.verify(step, state, meta)
      except CheckpointDamaged as e:
        log.error("Checkpoint of step %d (%s) is damaged: %s.%s", step, self.step_path(step), e,
                  " Trying the previous one." if step != steps[-1] else "")
        failed.append((step, str(e)))
        continue
      for bad_step, _ in failed:
        dst = self._move_aside(bad_step, self.damaged_dir)
        log.error("Moved the damaged checkpoint of step %d to %s; resuming from step %d.",
                  bad_step, dst, step)
      if failed:
        self.manager.reload()
      return state, meta, step
    if failed:
      listing = "; ".join(f"step {s}: {why}" for s, why in failed)
      raise UserError(f"{self.directory}: no usable checkpoint ({listing}). Move the folder "
                      "aside to start from step 0, or restore a good copy.")
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
