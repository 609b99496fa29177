"""Re-runs a run's final evaluation from a checkpoint.

python -m m5p.evaluate --workdir=W [--step=N] [--mesh=data,fsdp,model] [--data_dir=D]

Restores the params of checkpoint N (default: the latest; the optimizer
state is not read), embeds the eval split (and the probe's train split) and
runs the tasks training runs at its end (`m5p.train.evaluate`: the same code,
so the same numbers on the same mesh), writes W/eval.json and prints a table.
Then W/report.md (m5p/evaluation/report.py): the tables beside their random
floors, retrieval examples with images and titles, a 2-D map of the
embeddings and the learned modality weights, PNGs in W/report/ (--noreport:
none; it costs one more embedding pass of the eval split).
A fine-tuned run (task='classify') is scored as its training scored it: the
classifier's top-1 / top-5 / macro-F1 on `classify.eval_list`, beside the
random and majority-class floors (no report).
"""
from __future__ import annotations

import json
import os

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory (holds checkpoints/ and config.json).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("data_dir", "", "Converted dataset (default: the run's data.dir or W/data).")
  flags.DEFINE_string("mesh", "", "Mesh data,fsdp,model (default: the run's config.mesh).")
  flags.DEFINE_bool("any_modality", True, "Also the 31 x 31 any-modality retrieval matrix "
                    "(W/any_modality.json, .md, .png).")
  flags.DEFINE_bool("report", True, "Also write W/report.md with its plots in W/report/.")


def evaluate(workdir: str, *, step: int | None = None, data_dir: str = "", mesh: str = "",
             any_modality: bool = True, report: bool = True) -> dict:
  """Evaluates checkpoint `step` of `workdir`; writes workdir/eval.json (and, with
  `report`, workdir/report.md); returns the results."""
  import jax
  from m5p import export, sharding, train
  from m5p.state import TrainState

  config = export.mesh_from_flag(export.load_run_config(workdir, step), mesh)
  data_dir = data_dir or export.run_data_dir(workdir, config)
  device_mesh = sharding.make_mesh(config.mesh)
  params, step = export.restore_params(workdir, config, device_mesh, step, data_dir)
  shardings = jax.tree.map(lambda a: a.sharding, params)
  state = TrainState(step=step, params=params, opt_state=None)
  model = train.make_model(config, data_dir)  # The Classifier for a task='classify' run.
  embed_fn = train.make_eval_fn(model, config, device_mesh, shardings)
  results = train.evaluate(model, state, config, device_mesh,
                           TrainState(step=None, params=shardings, opt_state=None), data_dir,
                           workdir, embed_fn=embed_fn, any_modality=any_modality, report=report)
  return results


_COUNTS = ("gallery_size", "k", "seeds", "converged", "unseen_test")


def table(results: dict) -> str:
  """One line per task: its headline rates (mAP@k for retrieval), each beside the
  random-embedding floor in brackets; eval.json has every metric."""
  lines = []
  for task in sorted(t for t in results if not t.endswith("_random") and t != "meta"
                     and not t.startswith("any_modality")):
    base_task = task.removesuffix("_contrastive")  # Shares coarse_retrieval's floor.
    floor = results.get(f"{task}_random") or results.get(f"{base_task}_random", {})
    cells = []
    for metric, value in results[task].items():
      if (metric in _COUNTS or metric.startswith(("num_", "Prec@", "Recall@"))
          or metric.endswith("_std")):
        continue
      base = f" ({floor[metric]:.2f})" if metric in floor else ""
      cells.append(f"{metric} {value:.2f}{base}")
    lines.append(f"  {task:29s} " + "  ".join(cells))
  if "any_modality_query" in results:
    q = results["any_modality_query"]
    best = max(q, key=q.get)
    lines.append(f"  any_modality (31 query subsets vs full products): best {best} {q[best]:.2f}, "
                 "table in any_modality.md, heatmap in any_modality.png")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax chatter.
  from m5p import distributed
  distributed.initialize()
  import jax
  results = evaluate(FLAGS.workdir, step=FLAGS.step, data_dir=FLAGS.data_dir, mesh=FLAGS.mesh,
                     any_modality=FLAGS.any_modality, report=FLAGS.report)
  if jax.process_index() == 0:
    path = os.path.join(os.path.abspath(FLAGS.workdir), "eval.json")
    with open(path, encoding="utf-8") as f:
      step = int(json.load(f)["meta"]["step"])
    print(f"step {step}: {path} (random-embedding floor in brackets)\n{table(results)}", flush=True)
    if FLAGS.report:
      print(f"report: {os.path.join(os.path.abspath(FLAGS.workdir), 'report.md')}", flush=True)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
