"""One pass over a run's config before any heavy work (data, init, compile).

Each problem names its field; all of them come back together as one
`ConfigError` (exit code 2, one line, no traceback: m5p.main). What is
checked:

- counts: total_steps >= 1, batch_size >= 1, accum_steps >= 1,
  keep_checkpoints >= 1; log_every, ckpt_every, eval_every >= 0, where 0 is
  "off" (only the last step is logged, checkpointed and evaluated);
- the mesh against the visible devices, and batch_size against the mesh's
  batch shards, the processes and accum_steps;
- names with a fixed set of values (task, optim.schedule, optim.nonfinite),
  and the logical-axis rules (config.sharding_rules);
- `check_dataset`: data.vocab_size against the dataset tokenizer's (a smaller
  one would clip token ids: refused).

Model shapes against a checkpoint's are checked where the checkpoint is read
(m5p.checkpointing.Checkpointer.check_shapes), before any array is restored.
"""
from __future__ import annotations

import difflib
import math
import os
from typing import Any, Iterable

import ml_collections

from m5p import nonfinite, sharding
from m5p.failures import ConfigError

TASKS = ("pretrain", "classify")
SCHEDULES = ("cosine", "linear")


def _int(config: ml_collections.ConfigDict, path: str, problems: list[str], minimum: int,
         meaning: str = "") -> int | None:
  value: Any = config
  for part in path.split("."):
    value = value.get(part) if hasattr(value, "get") else None
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    problems.append(f"config.{path}={value!r}: expected an integer")
    return None
  if value < minimum:
    problems.append(f"config.{path}={value}: expected >= {minimum}{meaning}")
    return None
  return value


def problems_of(config: ml_collections.ConfigDict, num_devices: int | None = None,
                process_count: int = 1) -> list[str]:
  """The config's problems, one string each (empty when it is fine)."""
  problems: list[str] = []
  _int(config, "total_steps", problems, 1)
  batch = _int(config, "batch_size", problems, 1)
  accum = _int(config, "accum_steps", problems, 1)
  _int(config, "keep_checkpoints", problems, 1)
  for field in ("log_every", "ckpt_every", "eval_every"):
    _int(config, field, problems, 0, " (0 = off: only the last step)")
  for field in ("data.worker_count", "data.read_threads", "data.prefetch"):
    _int(config, field, problems, 0)
  task = config.get("task", "pretrain")
  if task not in TASKS:
    problems.append(f"config.task={task!r}: expected one of {TASKS}")
  schedule = config.optim.get("schedule", "cosine")
  if schedule not in SCHEDULES:
    problems.append(f"config.optim.schedule={schedule!r}: expected one of {SCHEDULES}")
  lr = config.optim.get("lr", 0.0)
  if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
    problems.append(f"config.optim.lr={lr!r}: expected a finite number >= 0")
  warmup = config.optim.get("warmup_frac", 0.0)
  if not isinstance(warmup, (int, float)) or not 0 <= warmup <= 1:
    problems.append(f"config.optim.warmup_frac={warmup!r}: expected a fraction in [0, 1]")
  try:
    nonfinite.policy(config)
  except ConfigError as e:
    problems.append(str(e))
  grace = config.get("preempt_grace_s", 0)
  if not isinstance(grace, (int, float)) or grace < 0:
    problems.append(f"config.preempt_grace_s={grace!r}: expected seconds >= 0 (0: no limit)")
  try:
    sharding.rules(config)
  except ValueError as e:
    problems.append(str(e))
  if accum and accum > 1 and task == "classify":
    problems.append(f"config.accum_steps={accum}: accumulation is for task='pretrain'; "
                    "use 1 with task='classify'")
  if num_devices is not None:
    problems += _mesh_problems(config, num_devices, process_count, batch, accum)
  return problems


def _mesh_problems(config: ml_collections.ConfigDict, num_devices: int, process_count: int,
                   batch: int | None, accum: int | None) -> list[str]:
  problems = []
  wanted = config.mesh.get("num_devices", -1)
  if not isinstance(wanted, int) or wanted == 0 or wanted < -1:
    return [f"config.mesh.num_devices={wanted!r}: expected -1 (all) or a count >= 1"]
  if wanted > num_devices:
    return [f"config.mesh.num_devices={wanted}: only {num_devices} devices are visible"]
  devices = num_devices if wanted == -1 else wanted
  try:
    data, fsdp, _ = sharding.mesh_shape(config.mesh, devices)
  except (ValueError, TypeError) as e:
    return [str(e)]
  if batch is None:
    return problems
  shards = data * fsdp
  if batch % shards:
    problems.append(f"config.batch_size={batch} is not divisible by the mesh's data x fsdp = "
                    f"{shards} batch shards (config.mesh {data} x {fsdp})")
  if batch % process_count:
    problems.append(f"config.batch_size={batch} is not divisible by the {process_count} processes")
  if accum and accum > 1 and batch % (accum * shards):
    problems.append(f"config.accum_steps={accum}: batch_size={batch} must be divisible by "
                    f"accum_steps x data x fsdp = {accum * shards}")
  return problems


def check(config: ml_collections.ConfigDict, num_devices: int | None = None,
          process_count: int = 1) -> None:
  """Raises one ConfigError listing every problem of the config."""
  problems = problems_of(config, num_devices, process_count)
  if problems:
    raise ConfigError("; ".join(problems))


def tokenizer_vocab_size(data_dir: str) -> int:
  from m5p.data import convert, tokenizer  # pylint: disable=import-outside-toplevel
  return tokenizer.Tokenizer(convert.tokenizer_path(data_dir)).vocab_size


def check_dataset(config: ml_collections.ConfigDict, data_dir: str) -> None:
  """ConfigError when config.data.vocab_size is below the dataset tokenizer's vocabulary."""
  have = tokenizer_vocab_size(data_dir)
  want = int(config.data.vocab_size)
  if want < have:
    raise ConfigError(
        f"config.data.vocab_size={want} is smaller than the vocabulary of the dataset's "
        f"tokenizer ({have} pieces, {os.path.join(data_dir, 'tokenizer.model')}): token ids >= "
        f"{want} would be clipped. Set --config.data.vocab_size={have}.")


# ---------------------------------------------------------------------------
# Command-line overrides.


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted field path of the config ('optim.lr', 'mesh.data', ...)."""
  out = []
  for key in config.keys():
    value = config[key]
    path = f"{prefix}{key}"
    out.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      out += field_paths(value, path + ".")
  return out


def unknown_overrides(config: ml_collections.ConfigDict, argv: Iterable[str],
                      flag: str = "config") -> list[str]:
  """'--config.x=1: config has no field 'x'; did you mean config.y?' for each override
  of a field the config lacks."""
  known = set(field_paths(config))
  out = []
  for arg in argv:
    if not arg.startswith(f"--{flag}."):
      continue
    path = arg[len(flag) + 3:].split("=", 1)[0]
    if path in known:
      continue
    close = difflib.get_close_matches(path, sorted(known), n=1, cutoff=0.6)
    hint = (f"; did you mean config.{close[0]}?" if close
            else " (m5p/default_config.py lists the fields)")
    out.append(f"{arg}: config has no field {path!r}{hint}")
  return out
