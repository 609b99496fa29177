"""Entry point: `python -m m5p.main --config=configs/demo.py --workdir=DIR [--config.x=y ...]`.

Prepares the dataset (synthetic when none is configured), trains SCALE with
checkpoints in DIR (resuming if DIR has one), evaluates, and prints where the
results are. With `--config=configs/finetune_cls.py --config.init_from=E` it
fine-tunes the export E as a classifier instead (config.task='classify'), on
E's dataset unless data.dir / data.raw_dir say otherwise.

Exit codes (m5p.failures): 0 done; 1 crash; 2 user error (one line on
stderr, no traceback: bad config or override, missing data, a workdir held by
another run, no usable checkpoint); 3 diverged (non-finite steps); 75
preempted by SIGTERM / SIGINT after checkpointing (rerun to resume).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (python), e.g. configs/demo.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for data, checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def _setup_logging(workdir: str, process_index: int = 0) -> None:
  fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
  name = "train.log" if process_index == 0 else f"train.process{process_index}.log"
  logger = logging.getLogger("m5p")
  logger.setLevel(logging.INFO)
  logger.propagate = False
  for handler in (logging.StreamHandler(sys.stdout),
                  logging.FileHandler(os.path.join(workdir, name), encoding="utf-8")):
    handler.setFormatter(fmt)
    logger.addHandler(handler)


def export_data_dir(config) -> str:
  """The dataset an export (config.init_from) was made from, when the config
  names none: fine-tuning then reads the same items the export embedded."""
  if not config.get("init_from") or config.data.dir or config.data.raw_dir:
    return ""
  path = os.path.join(config.init_from, "manifest.json")
  source = ""
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      source = json.load(f).get("source_data_dir", "")
  if not (source and os.path.exists(os.path.join(source, "manifest.json"))):
    raise FileNotFoundError(
        f"config.init_from={config.init_from!r}: the export's dataset ({source or 'not recorded'}) "
        "is not there; pass --config.data.dir=DATA (a converted dataset).")
  return source


def summary(workdir: str, results: dict, seconds: float) -> str:
  lines = [f"m5p finished in {seconds / 60:.1f} min. Results in {os.path.abspath(workdir)}:",
           "  eval.json (metrics), report.md (tables and plots), metrics.jsonl + tensorboard/ (training curves), checkpoints/, train.log"]
  r = results.get("classification")
  if r:
    rand, major = results.get("classification_random", {}), results.get("classification_majority", {})
    nan = float("nan")
    lines.append(f"  {'classification':30s} top-1 {r['top1']:6.2f}  top-5 {r['top5']:6.2f}  "
                 f"macro-F1 {r['macro_f1']:6.2f}   (random: {rand.get('top1', nan):.2f} / "
                 f"{rand.get('top5', nan):.2f} / {rand.get('macro_f1', nan):.2f}; majority class: "
                 f"{major.get('top1', nan):.2f} / {major.get('top5', nan):.2f} / "
                 f"{major.get('macro_f1', nan):.2f})")
  base = results.get("coarse_retrieval_random", {})
  for task in ("coarse_retrieval", "coarse_retrieval_contrastive"):
    r = results.get(task)
    if r:
      lines.append(f"  {task:30s} mAP@1 {r['mAP@1']:6.2f}  mAP@5 {r['mAP@5']:6.2f}  mAP@10 {r['mAP@10']:6.2f}"
                   f"   (random embeddings: {base.get('mAP@1', float('nan')):.2f} / "
                   f"{base.get('mAP@5', float('nan')):.2f} / {base.get('mAP@10', float('nan')):.2f})")
  return "\n".join(lines)


def _fail(message: str, code: int) -> None:
  """One line on stderr (and in the log), then exit `code`: no traceback."""
  for handler in logging.getLogger("m5p").handlers:
    if isinstance(handler, logging.FileHandler):  # The console gets the line below only.
      handler.handle(logging.LogRecord("m5p", logging.ERROR, __file__, 0, "%s", (message,), None))
      handler.flush()
  sys.stderr.write(f"m5p: error: {message}\n")
  sys.stderr.flush()
  sys.exit(code)


def _traceback_to_log_file() -> None:
  """The current exception's traceback, into train.log only (the console gets one line)."""
  for handler in logging.getLogger("m5p").handlers:
    if isinstance(handler, logging.FileHandler):
      handler.handle(logging.LogRecord("m5p", logging.DEBUG, __file__, 0, "Traceback of the error:",
                                       None, sys.exc_info()))


def _share_lock_verdict(held: bool, message: str) -> None:
  """Multi-host: process 0 took (or was refused) the workdir lock; every process learns which."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  client = jax_distributed.global_state.client
  key = "m5p_workdir_lock"
  if jax.process_index() == 0:
    client.key_value_set(key, "ok" if held else message or "refused")
  else:
    verdict = client.blocking_key_value_get(key, 600_000)
    if verdict != "ok":
      from m5p import failures  # pylint: disable=import-outside-toplevel
      raise failures.UserError(f"process 0: {verdict}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from m5p import failures  # pylint: disable=import-outside-toplevel
  from m5p.data.raw_layout import ConversionError  # pylint: disable=import-outside-toplevel
  try:
    _run()
  except failures.Preempted as e:
    logging.getLogger("m5p").warning("%s (exit code %d).", e, failures.EXIT_PREEMPTED)
    sys.exit(failures.EXIT_PREEMPTED)
  except failures.Diverged as e:
    _fail(f"diverged: {e}", failures.EXIT_DIVERGED)
  except (failures.UserError, ConversionError) as e:
    _fail(str(e), failures.EXIT_USER_ERROR)
  except (ValueError, FileNotFoundError) as e:  # m5p's refusals (e.g. a dataset too small).
    _traceback_to_log_file()
    _fail(f"{e} (traceback in train.log)", failures.EXIT_USER_ERROR)
  except KeyboardInterrupt:  # Before the trainer's handlers are in place (e.g. data preparation).
    _fail("interrupted before training started; nothing to checkpoint", 130)


def _run() -> None:
  t0 = time.perf_counter()
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  config = FLAGS.config
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # Library chatter (TFDS, orbax); m5p logs its own.
  # Imported here so that --help stays fast and jax sees the environment first.
  import jax
  from m5p import config_check, distributed, failures, prepare, train, workdir_lock
  kind = distributed.initialize()  # Before any device is touched; no-op for one process.
  # The whole config at once, before the lock, the data or any compile.
  config_check.check(config, num_devices=len(jax.devices()), process_count=jax.process_count())
  lock: contextlib.AbstractContextManager = contextlib.nullcontext()
  notices: list[str] = []  # Logged once the log is set up (after the lock: not into another run's).
  if jax.process_index() == 0:
    lock = workdir_lock.WorkdirLock(workdir, announce=notices.append)
    try:
      lock.__enter__()
    except failures.UserError as e:
      _share_lock_verdict(False, str(e))
      raise
  _share_lock_verdict(True, "")
  try:
    _setup_logging(workdir, jax.process_index())
    log = logging.getLogger("m5p")
    for notice in notices:
      log.warning("%s", notice)
    if kind:
      log.info("Process %d of %d (%s cluster).", jax.process_index(), jax.process_count(), kind)
    log.info("Config:\n%s", config)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    try:
      data_dir = export_data_dir(config) or prepare.ensure_dataset(config, workdir)
    except FileNotFoundError as e:  # A data.dir / init_from that is not there: the user's to fix.
      raise failures.UserError(str(e)) from None
    results = train.train_and_evaluate(config, workdir, data_dir)
    if jax.process_index() == 0:
      print(summary(workdir, results, time.perf_counter() - t0), flush=True)
  finally:
    lock.__exit__(None, None, None)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with user errors as one line and exit code 2: an override of
  a field the config does not have gets 'did you mean', a config file that does not
  load names the file."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get("seed")  # A config file that failed to load raises only when read.
    return rest
  except flags.Error as e:
    message = str(e)
  except Exception as e:  # pylint: disable=broad-except  (config_flags raises plain errors)
    message = f"{type(e).__name__}: {e}"
  from m5p import config_check, failures  # pylint: disable=import-outside-toplevel
  from m5p.config_loader import load_config  # pylint: disable=import-outside-toplevel
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg:
    try:
      unknown = config_check.unknown_overrides(load_config(config_arg), argv)
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      unknown = [f"--config={config_arg}: cannot load the config file ({first})"]
    if unknown:
      message = "; ".join(unknown)
  _fail(" ".join(message.split()), failures.EXIT_USER_ERROR)
  return []


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
