"""Entry point: `python -m m5p.main --config=configs/demo.py --workdir=DIR [--config.x=y ...]`.

Prepares the dataset (synthetic when none is configured), trains SCALE with
checkpoints in DIR (resuming if DIR has one), evaluates, and prints where the
results are. With `--config=configs/finetune_cls.py --config.init_from=E` it
fine-tunes the export E as a classifier instead (config.task='classify'), on
E's dataset unless data.dir / data.raw_dir say otherwise.
"""
from __future__ import annotations

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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  t0 = time.perf_counter()
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  config = FLAGS.config
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # Library chatter (TFDS, orbax); m5p logs its own.
  # Imported here so that --help stays fast and jax sees the environment first.
  import jax
  from m5p import distributed, prepare, train
  kind = distributed.initialize()  # Before any device is touched; no-op for one process.
  _setup_logging(workdir, jax.process_index())
  if kind:
    logging.getLogger("m5p").info("Process %d of %d (%s cluster).", jax.process_index(),
                                  jax.process_count(), kind)
  log = logging.getLogger("m5p")
  log.info("Config:\n%s", config)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  data_dir = export_data_dir(config) or prepare.ensure_dataset(config, workdir)
  results = train.train_and_evaluate(config, workdir, data_dir)
  if jax.process_index() == 0:
    print(summary(workdir, results, time.perf_counter() - t0), flush=True)


if __name__ == "__main__":
  app.run(main)
