"""SCALE's claims, reproduced by one command, and m5p's decisions against the authors'.

  python tools/ablate.py --output_dir=/tmp/m5p_ablation            # ~49 min on 2 CPU cores
  python tools/ablate.py --output_dir=/tmp/m5p_ablation_quick --quick   # a minute: CI's form

On a synthetic M5Product (generated and converted once; a second copy with
one modality deliberately corrupted), it trains the demo model at a reduced
budget for every variant below and seed, evaluates each with the same code
`python -m m5p.evaluate` runs, and writes:
  DIR/ablation.md            mean +- std over seeds of coarse mAP@1 / mAP@5 and
                             fine-grained mAP@1 per variant, the random-embedding
                             baseline beside them, and claim by claim whether
                             (a)-(d) held and by how much;
  DIR/ablation.png           coarse mAP@1 per variant with error bars;
  DIR/modality_weights.png   learned pair weights (batch mean of G_b[i, j]) over
                             training, the clean run beside the corrupted one;
  DIR/ablation.json          every run's numbers;
  DIR/runs/<variant>/seed<k>/  each run's workdir (eval.json, metrics.jsonl, train.log).
Finished runs are kept: rerunning the command resumes where it stopped.

Variants (SCALE.md section 7's claims; m5p defaults = `base`):
  (a) text -> +image -> +table -> +video -> +audio (= base)   data.modalities
  (b) base (per_sample_logits) and pair_loss_weights vs uniform loss.harmonization
  (c) base (incomplete items kept) vs complete_only            data.train_complete_only
  (d) corrupted: base trained on the copy whose --corrupt_modality is replaced,
      for --corrupt_fraction of its items, by another product's; its learned
      weight against the clean run's
  decisions: authors (configs/scale_authors.py's method), and one m5p
      decision reverted at a time: zeros (missing='zeros'), ntxent,
      single_positive (multi_positive off).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Where the data, the runs and the report go.")
flags.DEFINE_bool("quick", False, "A reduced version (tiny model, 160 products, 3 steps, one seed, "
                  "a few variants): checks the tool end to end, its numbers mean nothing.")
flags.DEFINE_integer("seeds", 3, "Training seeds per variant (--quick: 1).")
flags.DEFINE_integer("steps", 160, "Train steps per run.")
flags.DEFINE_integer("batch_size", 32, "Global batch per step.")
flags.DEFINE_integer("products", 1600, "Synthetic products (train + test).")
flags.DEFINE_float("lr", 2e-3, "Peak learning rate (the demo's).")
flags.DEFINE_string("corrupt_modality", "image", "(d): the modality corrupted in the second copy.")
flags.DEFINE_float("corrupt_fraction", 0.6, "(d): share of the items holding it that are corrupted.")
flags.DEFINE_list("only", [], "Run only these variants (the report covers what has run).")
flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/m5p_ablate_jax"),
                    "Persistent XLA compilation cache ('' = none).")
flags.mark_flag_as_required("output_dir")

ALL = ("text", "table", "image", "video", "audio")


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  group: str
  description: str
  overrides: tuple = ()  # ((dotted config key, value), ...)
  data: str = "clean"  # | 'corrupt'


def variants(corrupt_modality: str) -> list[Variant]:
  from configs.scale_authors import AUTHORS_METHOD  # pylint: disable=import-outside-toplevel
  mods = lambda *m: (("data.modalities", tuple(m)),)
  return [
      Variant("base", "m5p", "m5p defaults: 5 modalities, per_sample_logits, clip, mask, "
              "multi-positive"),
      Variant("text", "(a) modalities", "text only", mods("text")),
      Variant("+image", "(a) modalities", "text, image", mods("text", "image")),
      Variant("+table", "(a) modalities", "text, image, table", mods("text", "image", "table")),
      Variant("+video", "(a) modalities", "text, image, table, video",
              mods("text", "image", "table", "video")),
      Variant("pair_loss_weights", "(b) harmonization", "G weights the pair losses (paper text)",
              (("loss.harmonization", "pair_loss_weights"),)),
      Variant("uniform", "(b) harmonization", "no harmonization: the mean of the pair losses",
              (("loss.harmonization", "uniform"),)),
      Variant("complete_only", "(c) incomplete items", "trained on the items holding all five "
              "modalities only", (("data.train_complete_only", True),)),
      Variant("corrupted", "(d) noisy modality", f"{corrupt_modality} corrupted in training and "
              "test data", (), "corrupt"),
      Variant("authors", "decisions", "configs/scale_authors.py's method (zeros, ntxent, "
              "single positive)", tuple(AUTHORS_METHOD.items())),
      Variant("zeros", "decisions", "missing modalities zero-filled and attended",
              (("model.missing", "zeros"),)),
      Variant("ntxent", "decisions", "NT-Xent pairs (same-modality negatives)",
              (("loss.infonce", "ntxent"),)),
      Variant("single_positive", "decisions", "listings of one product are negatives",
              (("loss.multi_positive", False),)),
  ]


QUICK_VARIANTS = ("base", "text", "uniform", "complete_only", "corrupted", "authors")


# ------------------------------------------------------------------ data ----

def prepare_data(root: str, config, *, products: int, corrupt_modality: str | None,
                 corrupt_fraction: float, log) -> str:
  """Generates (once) and converts (once) a synthetic set; returns its data dir."""
  from m5p.data import convert, synthetic  # pylint: disable=import-outside-toplevel
  raw, data = os.path.join(root, "raw"), os.path.join(root, "data")
  if os.path.exists(os.path.join(data, "manifest.json")):
    return data
  t0 = time.perf_counter()
  kwargs = dict(corrupt_modality=corrupt_modality, corrupt_fraction=corrupt_fraction) \
      if corrupt_modality else {}
  synthetic.generate(raw, products, seed=0, overwrite=True, **kwargs)
  d = config.data
  convert.convert(raw, data, image_size=d.image_size, max_frames=d.max_frames, n_mels=d.n_mels,
                  max_audio_seconds=d.max_audio_seconds, num_shards=2, vocab_size=d.vocab_size,
                  overwrite=True, log=lambda *a, **k: None)
  log(f"data {os.path.basename(root)}: {products} products generated and converted in "
      f"{time.perf_counter() - t0:.0f} s")
  return data


# ------------------------------------------------------------------ runs ----

def run_config(variant: Variant, seed: int, settings: dict):
  """The demo config at the ablation's budget, the variant's overrides applied."""
  from m5p.config_loader import apply_overrides, load_config  # pylint: disable=import-outside-toplevel
  c = load_config("demo:tiny" if settings["quick"] else "demo")
  c.seed = seed
  c.total_steps = settings["steps"]
  c.batch_size = settings["batch_size"]
  c.optim.lr = settings["lr"]
  c.log_every = max(1, settings["steps"] // 16)
  c.ckpt_every = settings["steps"]
  c.async_checkpointing = False
  c.eval.probe_train_split = ""  # The probe splits the test set: no second embedding pass.
  c.eval.report = False  # Only the numbers are compared.
  return apply_overrides(c, dict(variant.overrides))


def final_weights(metrics_path: str, last: int = 3) -> dict[str, float]:
  """Mean over the last `last` logged steps of every `w/...` metric."""
  rows = []
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      rows.append(json.loads(line))
  rows = [r for r in rows if any(k.startswith("w/") for k in r)][-last:]
  keys = sorted({k for r in rows for k in r if k.startswith("w/")})
  return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def run_one(variant: Variant, seed: int, settings: dict, data_dirs: dict, out: str, log) -> dict:
  """Trains and evaluates one (variant, seed), or reads its finished result."""
  from m5p import train  # pylint: disable=import-outside-toplevel
  workdir = os.path.join(out, "runs", variant.name, f"seed{seed}")
  result_path = os.path.join(workdir, "result.json")
  key = {"variant": dataclasses.asdict(variant), "seed": seed, "settings": settings}
  key = json.loads(json.dumps(key))  # Tuples -> lists, as read back.
  if os.path.exists(result_path):
    with open(result_path, encoding="utf-8") as f:
      done = json.load(f)
    if done.get("key") == key:
      return done
  if os.path.exists(workdir):
    shutil.rmtree(workdir)  # An unfinished run, or one with other settings.
  os.makedirs(workdir)
  config = run_config(variant, seed, settings)
  handler = logging.FileHandler(os.path.join(workdir, "train.log"), encoding="utf-8")
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
  logger = logging.getLogger("m5p")
  logger.addHandler(handler)
  t0 = time.perf_counter()
  try:
    results = train.train_and_evaluate(config, workdir, data_dirs[variant.data])
  finally:
    logger.removeHandler(handler)
    handler.close()
  seconds = time.perf_counter() - t0
  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)  # Only numbers are kept.
  pick = lambda task, metric: float(results.get(task, {}).get(metric, float("nan")))
  done = {
      "key": key, "seconds": seconds,
      "coarse_mAP@1": pick("coarse_retrieval", "mAP@1"),
      "coarse_mAP@5": pick("coarse_retrieval", "mAP@5"),
      "fine_mAP@1": pick("fine_retrieval", "mAP@1"),
      "random_coarse_mAP@1": pick("coarse_retrieval_random", "mAP@1"),
      "random_coarse_mAP@5": pick("coarse_retrieval_random", "mAP@5"),
      "random_fine_mAP@1": pick("fine_retrieval_random", "mAP@1"),
      "weights": final_weights(os.path.join(workdir, "metrics.jsonl")),
  }
  with open(result_path, "w", encoding="utf-8") as f:
    json.dump(done, f, indent=1)
  log(f"  {variant.name:18s} seed {seed}: coarse mAP@1 {done['coarse_mAP@1']:6.2f}  "
      f"mAP@5 {done['coarse_mAP@5']:6.2f}  fine mAP@1 {done['fine_mAP@1']:6.2f}  ({seconds:.0f} s)")
  return done


# ---------------------------------------------------------------- report ----

def _stats(values: list[float]) -> tuple[float, float]:
  import numpy as np  # pylint: disable=import-outside-toplevel
  v = np.asarray(values, float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def modality_weight(weights: dict[str, float], modality: str) -> float:
  """A modality's learned weight: the mean of the pair weights w/<i>-<j> of its 4 pairs."""
  pairs = [v for k, v in weights.items() if k.count("-") == 1 and modality in k[2:].split("-")]
  return sum(pairs) / len(pairs) if pairs else float("nan")


def summarize(results: dict[str, list[dict]], chosen: list[Variant]) -> dict:
  table = {}
  for v in chosen:
    runs = results.get(v.name, [])
    if not runs:
      continue
    table[v.name] = {m: _stats([r[m] for r in runs])
                     for m in ("coarse_mAP@1", "coarse_mAP@5", "fine_mAP@1")}
    table[v.name]["seeds"] = len(runs)
  return table


def _fmt(ms: tuple[float, float]) -> str:
  return f"{ms[0]:.2f} ± {ms[1]:.2f}"


def _delta(table: dict, a: str, b: str, metric: str = "coarse_mAP@1") -> str | None:
  """'a - b = d (held / did not hold; noise sigma s)' or None if either is missing."""
  if a not in table or b not in table:
    return None
  (ma, sa), (mb, sb) = table[a][metric], table[b][metric]
  d, noise = ma - mb, (sa ** 2 + sb ** 2) ** 0.5
  verdict = ("held" if d > noise else "held, within the seed noise" if d > 0 else
             "did not hold" if d < -noise else "did not hold, within the seed noise")
  return f"{a} {ma:.2f} vs {b} {mb:.2f}: {d:+.2f} ({verdict}; seed noise ±{noise:.2f})"


def claims(table: dict, results: dict[str, list[dict]], corrupt_modality: str) -> list[str]:
  lines = ["## Claims", ""]
  lines.append("(a) Each added modality helps (coarse mAP@1):")
  seq = ["text", "+image", "+table", "+video", "base"]
  for a, b in zip(seq[1:], seq[:-1]):
    d = _delta(table, a, b)
    if d:
      lines.append(f"- {d.replace('base', '+audio (base)', 1)}")
  lines += ["", "(b) Learned harmonization beats uniform weights (coarse mAP@1):"]
  for mode in ("base", "pair_loss_weights"):
    d = _delta(table, mode, "uniform")
    if d:
      lines.append(f"- {d.replace('base', 'per_sample_logits (base)', 1)}")
  lines += ["", "(c) Training with incomplete-modality items beats dropping them (coarse mAP@1):"]
  d = _delta(table, "base", "complete_only")
  if d:
    lines.append(f"- {d}")
  lines += ["", f"(d) A noisy modality gets a lower learned weight ({corrupt_modality} corrupted; "
            "weight = mean of its 4 pair weights, batch mean of G_b[i, j], last logged steps):"]
  if results.get("base") and results.get("corrupted"):
    clean = _stats([modality_weight(r["weights"], corrupt_modality) for r in results["base"]])
    noisy = _stats([modality_weight(r["weights"], corrupt_modality) for r in results["corrupted"]])
    d, noise = noisy[0] - clean[0], (clean[1] ** 2 + noisy[1] ** 2) ** 0.5
    verdict = "held" if -d > noise else "held, within the seed noise" if d < 0 else "did not hold"
    lines.append(f"- clean {_fmt(clean)} vs corrupted {_fmt(noisy)}: {d:+.4f} ({verdict}; seed "
                 f"noise ±{noise:.4f})")
    others = [m for m in ALL if m != corrupt_modality]
    rel = [_stats([modality_weight(r["weights"], corrupt_modality) -
                   sum(modality_weight(r["weights"], o) for o in others) / len(others)
                   for r in results[name]]) for name in ("base", "corrupted")]
    lines.append(f"- its weight minus the other modalities' mean: clean {_fmt(rel[0])}, "
                 f"corrupted {_fmt(rel[1])}")
  lines += ["", "m5p's decisions against the authors' (coarse mAP@1; fine mAP@1 in the table):"]
  for other in ("authors", "zeros", "ntxent", "single_positive"):
    for metric in ("coarse_mAP@1", "fine_mAP@1"):
      d = _delta(table, "base", other, metric)
      if d:
        lines.append(f"- {metric}: {d}")
  return lines


def write_report(out: str, results: dict[str, list[dict]], chosen: list[Variant],
                 settings: dict) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  table = summarize(results, chosen)
  any_run = next(r for runs in results.values() for r in runs)
  random = {m: any_run[f"random_{m}"] for m in ("coarse_mAP@1", "coarse_mAP@5", "fine_mAP@1")}
  lines = ["# m5p ablation: SCALE's claims and m5p's decisions", "",
           f"Synthetic M5Product, {settings['products']} products; demo model"
           f"{' (tiny: --quick)' if settings['quick'] else ''}, {settings['steps']} steps at batch "
           f"{settings['batch_size']}, lr {settings['lr']}; mean ± std over seeds. "
           "Metrics from m5p's evaluator (the authors' mAP@K definition).", "",
           "| variant | group | what | seeds | coarse mAP@1 | coarse mAP@5 | fine mAP@1 |",
           "|---|---|---|---|---|---|---|"]
  for v in chosen:
    if v.name in table:
      t = table[v.name]
      lines.append(f"| {v.name} | {v.group} | {v.description} | {t['seeds']} | "
                   f"{_fmt(t['coarse_mAP@1'])} | {_fmt(t['coarse_mAP@5'])} | {_fmt(t['fine_mAP@1'])} |")
  lines.append(f"| random embeddings | floor | | | {random['coarse_mAP@1']:.2f} | "
               f"{random['coarse_mAP@5']:.2f} | {random['fine_mAP@1']:.2f} |")
  lines += [""] + claims(table, results, settings["corrupt_modality"])
  minutes = sum(r["seconds"] for runs in results.values() for r in runs) / 60
  lines += ["", f"Training and evaluation time, all runs: {minutes:.1f} min.", ""]
  text = "\n".join(lines)
  with open(os.path.join(out, "ablation.md"), "w", encoding="utf-8") as f:
    f.write(text)
  with open(os.path.join(out, "ablation.json"), "w", encoding="utf-8") as f:
    json.dump({"settings": settings, "table": table, "runs": results}, f, indent=1)

  # ablation.png: coarse mAP@1 per variant, error bars over seeds.
  names = [v.name for v in chosen if v.name in table]
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
  means = [table[n]["coarse_mAP@1"][0] for n in names]
  stds = [table[n]["coarse_mAP@1"][1] for n in names]
  ax.barh(range(len(names)), means, xerr=stds, color="#4C72B0", capsize=3)
  ax.axvline(random["coarse_mAP@1"], color="grey", linestyle="--", label="random embeddings")
  ax.set_yticks(range(len(names)), names)
  ax.invert_yaxis()
  ax.set_xlabel("coarse mAP@1 (mean ± std over seeds)")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "ablation.png"), dpi=110)
  plt.close(fig)

  # modality_weights.png: pair weights over training, clean vs corrupted (seed 0 of each).
  panels = [(n, os.path.join(out, "runs", n, f"seed{settings['first_seed']}", "metrics.jsonl"))
            for n in ("base", "corrupted")]
  panels = [(n, p) for n, p in panels if os.path.exists(p)]
  if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False,
                             sharey=True)
    for ax, (name, path) in zip(axes[0], panels):
      with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
      keys = sorted(k for k in rows[0] if k.startswith("w/") and "-" in k)
      for k in keys:
        style = "-" if settings["corrupt_modality"] in k[2:].split("-") else ":"
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], style, label=k[2:])
      ax.set_title(f"{name}: learned pair weights (batch mean of G_b[i, j])")
      ax.set_xlabel("step")
    axes[0][0].set_ylabel("weight")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "modality_weights.png"), dpi=110)
    plt.close(fig)
  return text


# ------------------------------------------------------------------ main ----

def main(argv: list[str]) -> None:
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)  # Library chatter (TFDS, orbax).
  logger = logging.getLogger("m5p")  # Each run's log goes to its train.log only.
  logger.setLevel(logging.INFO)
  logger.propagate = False
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  from m5p.config_loader import load_config  # pylint: disable=import-outside-toplevel
  out = FLAGS.output_dir
  os.makedirs(out, exist_ok=True)
  quick = FLAGS.quick
  settings = {
      "quick": quick,
      "steps": 3 if quick else FLAGS.steps,
      "batch_size": 16 if quick else FLAGS.batch_size,
      "products": 160 if quick else FLAGS.products,
      "lr": FLAGS.lr,
      "corrupt_modality": FLAGS.corrupt_modality,
      "corrupt_fraction": FLAGS.corrupt_fraction,
      "first_seed": 0,
  }
  seeds = list(range(1 if quick else FLAGS.seeds))
  chosen = variants(FLAGS.corrupt_modality)
  wanted = FLAGS.only or (list(QUICK_VARIANTS) if quick else [v.name for v in chosen])
  unknown = sorted(set(wanted) - {v.name for v in chosen})
  if unknown:
    raise app.UsageError(f"--only: unknown variants {unknown}; known: {[v.name for v in chosen]}")
  chosen = [v for v in chosen if v.name in wanted]

  def log(msg: str) -> None:
    print(msg, flush=True)

  base_config = load_config("demo:tiny" if quick else "demo")
  data_dirs = {"clean": prepare_data(os.path.join(out, "data", "clean"), base_config,
                                     products=settings["products"], corrupt_modality=None,
                                     corrupt_fraction=0.0, log=log)}
  if any(v.data == "corrupt" for v in chosen):
    data_dirs["corrupt"] = prepare_data(
        os.path.join(out, "data", f"corrupt_{FLAGS.corrupt_modality}"), base_config,
        products=settings["products"], corrupt_modality=FLAGS.corrupt_modality,
        corrupt_fraction=FLAGS.corrupt_fraction, log=log)
  log(f"{len(chosen)} variants x {len(seeds)} seeds, {settings['steps']} steps at batch "
      f"{settings['batch_size']} each; results in {out}")
  t0 = time.perf_counter()
  results: dict[str, list[dict]] = {}
  for seed in seeds:  # Seed-major: a stopped run still has every variant at seed 0.
    for v in chosen:
      results.setdefault(v.name, []).append(
          run_one(v, seed, settings, data_dirs, out, log))
  report = write_report(out, results, chosen, settings)
  print(report)
  log(f"ablation done in {(time.perf_counter() - t0) / 60:.1f} min: {out}/ablation.md, "
      "ablation.png, modality_weights.png")


if __name__ == "__main__":
  app.run(main)
