"""Compiles the real train step for a TPU topology on this machine, and prints
per-chip memory, FLOPs, XLA's time estimate (and the MFU it implies) and the
collectives of one step.

python tools/aot_compile.py --config=configs/scale_base.py --topology=v5p:4x4x4 \\
    [--batch_size=4096] [--config.model.dtype=bfloat16] [--config.mesh.fsdp=64 ...] [--json=FILE]

Needs libtpu (the 'tpu' extra: pip install -e ".[tpu]"), whose compile-only
mode builds TPU programs without a TPU (m5p.aot). Runs on the CPU
(JAX_PLATFORMS=cpu is set unless given). Exit status 3: the step does not fit
the chip's HBM (the report says by how much).
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402  (after the environment above)
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/scale_base.py", "Config file.", lock_config=True)
flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:16x16, v5p:4x4x4, v4:2x2x1.")
flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's batch_size).")
flags.DEFINE_string("json", None, "Also write the report to this JSON file.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.ERROR)
  from m5p import aot  # pylint: disable=import-outside-toplevel
  try:
    report = aot.compile_report(FLAGS.config, FLAGS.topology, FLAGS.batch_size)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  print(aot.format_report(report), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  if "does_not_fit" in report:
    sys.exit(3)


if __name__ == "__main__":
  app.run(main)
