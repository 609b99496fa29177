"""Exports a trained run for fine-tuning and serving.

python -m m5p.export --workdir=W --output_dir=E [--step=N] [--splits=test,train]

restores a checkpoint of the run in W (params only: the optimizer state is
never read) and writes

  E/params/               orbax checkpoint of the params alone: `load_params`
                          restores it onto any mesh
  E/config.json           the run's config (JSON; `load_config` rebuilds it)
  E/embeddings/<split>.npz  item_id, label, fine_group, index, present [N, 5],
                          fused [N, D], pooled [N, 5, D], z [N, 5, P], step;
                          plain arrays (np.load(..., allow_pickle=False))
  E/tokenizer.model       the dataset's SentencePiece model
  E/manifest.json         the dataset's conversion settings (what `Encoder`
                          decodes raw media with) and provenance
  E/serving/model.jax     `jax.export` (StableHLO) of batch -> {fused, pooled,
                          z, present}, params baked in as constants: loadable
                          with jax alone (`jax.export.deserialize`)
  E/serving/spec.json     its inputs (names, shapes, dtypes), outputs, notes
  E/export.json           what was exported, from where, sizes

A fine-tuned run (task='classify') exports its fine-tuned backbone the same way,
with a pretraining config (task='pretrain', no init_from): E embeds, serves and
seeds further fine-tuning like any export; the classification head stays in
W's checkpoints (`python -m m5p.evaluate --workdir=W` scores it).

`m5p.Encoder.from_export(E)` embeds raw products with it (m5p/encoder.py).
Nothing here or on any load path unpickles: configs and specs are JSON,
arrays are .npz of plain dtypes, checkpoints are orbax.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Mapping, Sequence

from absl import app, flags

from m5p.config_loader import apply_overrides
from m5p.data import batch_spec

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Only when run as a program: m5p.evaluate imports this module and has its own."""
  flags.DEFINE_string("workdir", None, "Run directory (holds checkpoints/ and config.json).")
  flags.DEFINE_string("output_dir", None, "Where to write the export (must be empty or absent).")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_list("splits", None, "Splits to embed (default: the eval and train splits); "
                    "'--splits=' embeds none.")
  flags.DEFINE_string("data_dir", "", "Converted dataset (default: the run's data.dir or W/data).")
  flags.DEFINE_string("mesh", "", "Mesh data,fsdp,model to run on (default: the run's config.mesh), "
                      "e.g. 1,8,1 or -1,1,1.")
  flags.DEFINE_integer("serving_batch", 8, "Batch size of the serving function when it is not "
                       "polymorphic (and of the example batch in spec.json).")
  flags.DEFINE_bool("serving_polymorphic", True, "Export the serving function for any batch size "
                    "(jax.export symbolic dimension 'b'); else for --serving_batch only.")
  flags.DEFINE_list("serving_platforms", list(SERVING_PLATFORMS), "Platforms to lower the "
                    "serving function for; it runs on these only.")
  flags.DEFINE_bool("serving", True, "Write serving/ (needs the `flatbuffers` package).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing export in --output_dir.")


PARAMS_DIR = "params"
EMBEDDINGS_DIR = "embeddings"
SERVING_DIR = "serving"
SERVING_FILE = "model.jax"
SERVING_SPEC = "spec.json"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
EXPORT_FILE = "export.json"

# What the serving function takes: the batch fields the model reads to embed
# (no training field: picks, targets and input masking are training's only).
SERVING_INPUTS = batch_spec.MODEL_INPUTS
SERVING_OUTPUTS = ("fused", "pooled", "z", "present")
# One file for all three: lowering for the others needs no such device and
# adds about 1% (the params are shared constants).
SERVING_PLATFORMS = ("cpu", "cuda", "tpu")


# ---------------------------------------------------------------------------
# Configs as JSON.


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (configs hold tuples, e.g. eval.ks, model.audio_patch)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def config_from_json(text: str):
  """The ConfigDict that `config.to_json_best_effort()` wrote (lists -> tuples)."""
  import ml_collections
  return ml_collections.ConfigDict(_tuples(json.loads(text)))


def load_run_config(workdir: str, step: int | None = None):
  """The run's config: W/config.json (m5p.main writes it), else the one saved in
  the checkpoint's metadata (runs started from Python, as tests do)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return config_from_json(f.read())
  mngr = _manager(workdir)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}: no config.json and no checkpoint.")
  import orbax.checkpoint as ocp
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  return config_from_json(meta["config"])


def run_data_dir(workdir: str, config) -> str:
  """Where the run's converted dataset is, as m5p.prepare decides it."""
  return config.data.dir or os.path.join(workdir, "data")


def mesh_from_flag(config, value: str):
  """`config` with config.mesh set from 'data,fsdp,model' (or unchanged for '')."""
  if not value:
    return config
  sizes = [int(v) for v in value.split(",")]
  if len(sizes) != 3:
    raise ValueError(f"--mesh={value!r}: expected data,fsdp,model, e.g. 1,8,1")
  return apply_overrides(config, {"mesh": dict(zip(("data", "fsdp", "model"), sizes))})


# ---------------------------------------------------------------------------
# Params: abstract tree with shardings, restore from a run, save/load alone.


def abstract_params(config, mesh, data_dir: str | None = None) -> Any:
  """ShapeDtypeStructs of the task's model's params (m5p.train.make_model: the
  Classifier's for task='classify', whose class count may come from `data_dir`)
  carrying their shardings on `mesh` (the same logical-axis rules as training,
  so any mesh works)."""
  import jax
  from flax import linen as nn
  from m5p import sharding
  from m5p.models.scale import init_batch
  from m5p.train import make_model

  model = make_model(config, data_dir)

  def init(rng):
    return model.init({"params": rng, "dropout": rng}, init_batch(config, 1), train=False)["params"]

  table = sharding.rules(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(table):
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = nn.meta.unbox(sharding.logical_sharding(boxed, mesh, table))
  shapes = nn.meta.unbox(boxed)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def _manager(workdir: str):
  import orbax.checkpoint as ocp
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no checkpoints (train first with m5p.main).")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))


def restore_params(workdir: str, config, mesh, step: int | None = None,
                   data_dir: str | None = None) -> tuple[Any, int]:
  """(params sharded on `mesh`, step) from the run's checkpoint `step` (default latest):
  the Classifier's params for a task='classify' run (see `abstract_params`).

  Only the params are read (orbax partial restore of the `state` item): the
  optimizer state, twice the params' size, never leaves the disk.
  """
  import orbax.checkpoint as ocp
  mngr = _manager(workdir)
  steps = mngr.all_steps()
  if step is None:
    step = mngr.latest_step()
  if step is None or step not in steps:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint for step {step} "
                            f"(have {sorted(steps)}).")
  target = {"params": abstract_params(config, mesh, data_dir)}
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  finally:
    mngr.close()
  return restored["state"]["params"], int(step)


def backbone_of_classifier(params: Any, config) -> tuple[Any, Any]:
  """(the backbone's params, a pretraining config for them) of a fine-tuned
  classifier: what an export holds, so that m5p.Encoder, `python -m m5p.evaluate`
  on a run started from it, and further fine-tuning (`init_from`) read it like
  any other export."""
  from m5p.models import classifier
  backbone = apply_overrides(config, {"task": "pretrain", "init_from": ""})
  return classifier.backbone_params(params), backbone


def save_params(path: str, params: Any) -> None:
  """A params-only orbax checkpoint at `path` (absent before)."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), params)
    ckptr.wait_until_finished()


def load_config(export_dir: str, config_overrides: Mapping[str, Any] | None = None):
  with open(os.path.join(export_dir, CONFIG_FILE), encoding="utf-8") as f:
    return apply_overrides(config_from_json(f.read()), config_overrides)


def load_params(export_dir: str, mesh=None,
                config_overrides: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
  """(params, config) of an export, params sharded per `mesh`.

  `mesh` defaults to `sharding.make_mesh(config.mesh)` after
  `config_overrides` (dotted keys or nested dicts: {'mesh': {'data': 1,
  'fsdp': 1, 'model': 1, 'num_devices': 1}} for one device, {'mesh.data': 1,
  'mesh.fsdp': 8, 'mesh.model': 1} for FSDP over 8), so an export restores
  onto any mesh shape, whatever it was trained on.
  """
  import orbax.checkpoint as ocp
  from m5p import sharding
  config = load_config(export_dir, config_overrides)
  if mesh is None:
    mesh = sharding.make_mesh(config.mesh)
  target = abstract_params(config, mesh)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.abspath(os.path.join(export_dir, PARAMS_DIR)), target)
  return params, config


# ---------------------------------------------------------------------------
# Embeddings.


def embeddings_arrays(emb: dict, step: int) -> dict:
  """embed_split's output as plain arrays: item ids become fixed-width unicode."""
  import numpy as np
  ids = [bytes(i).decode("utf-8") for i in emb["item_id"]]
  out = {"item_id": np.array(ids, dtype=f"<U{max([len(i) for i in ids] + [1])}")}
  for k in ("label", "fine_group", "index", "present", "fused", "pooled", "z"):
    out[k] = np.asarray(emb[k])
  out["step"] = np.asarray(step, np.int64)
  return out


def save_npz(path: str, arrays: dict) -> None:
  import numpy as np
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_embeddings(path: str) -> dict:
  """An exported embeddings file as {name: array} (no pickle)."""
  import numpy as np
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


# ---------------------------------------------------------------------------
# Serving function.


def serving_function(config, params: Any):
  """batch (SERVING_INPUTS) -> {fused, pooled, z, present}, params closed over
  (they become constants of the exported module).

  The model runs with its config's kernels ('auto' by default: the CPU
  kernels in the module's cpu branch, the standard ones for cuda and tpu,
  picked when the module is compiled for its platform); cuDNN attention
  (attention_impl='cudnn') is left to the GPU's runtime choice here, since
  one module serves every platform."""
  from m5p.models.scale import ScaleModel
  serving_config = apply_overrides(config, {"model.attention_impl": None})
  model = ScaleModel(serving_config)

  def serve(batch: dict) -> dict:
    out = model.apply({"params": params}, {k: batch[k] for k in SERVING_INPUTS}, train=False)
    return {k: out[k] for k in SERVING_OUTPUTS}

  return serve


def serving_input_specs(config, batch: int | str) -> dict[str, tuple[tuple, Any]]:
  """{name: (shape, dtype)} of the serving inputs; `batch` an int or 'b' (symbolic)."""
  shapes = batch_spec.batch_shapes(config, 1)
  return {k: ((batch,) + shapes[k][0][1:], shapes[k][1]) for k in SERVING_INPUTS}


def _check_serialization() -> None:
  """Fails before any work: jax.export's serialization needs `flatbuffers`."""
  try:
    import flatbuffers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise ImportError("the serving export needs the `flatbuffers` package (jax.export "
                      "serialization): pip install flatbuffers, or pass --noserving") from None


def export_serving(config, params: Any, out_dir: str, *, batch_size: int = 8,
                   polymorphic: bool = True, platforms: Sequence[str] = SERVING_PLATFORMS) -> dict:
  """Writes out_dir/model.jax (serialized jax.export) and out_dir/spec.json; returns the spec."""
  import jax
  import numpy as np
  host_params = jax.tree.map(np.asarray, jax.device_get(params))
  fn = jax.jit(serving_function(config, host_params))
  batch_dim: Any = batch_size
  exported = None
  error = ""
  if polymorphic:
    try:
      batch_dim, = jax.export.symbolic_shape("b")
      specs = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in serving_input_specs(config, batch_dim).items()}
      exported = jax.export.export(fn, platforms=tuple(platforms))(specs)
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {e}"[:500]  # Fall back to a fixed batch below.
      batch_dim, exported = batch_size, None
  if exported is None:
    specs = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in serving_input_specs(config, batch_size).items()}
    exported = jax.export.export(fn, platforms=tuple(platforms))(specs)
  blob = exported.serialize()
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, SERVING_FILE), "wb") as f:
    f.write(blob)
  param_bytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(host_params))
  outputs = {k: {"shape": [str(d) if not isinstance(d, int) else d for d in a.shape],
                 "dtype": str(a.dtype)} for k, a in zip(SERVING_OUTPUTS, exported.out_avals)}
  spec = {
      "file": SERVING_FILE,
      "format": "jax.export serialized Exported (StableHLO); load with "
                "jax.export.deserialize(open(file, 'rb').read()).call(batch)",
      "batch": "b (any size >= 1)" if not isinstance(batch_dim, int) else batch_dim,
      "polymorphic_batch": not isinstance(batch_dim, int),
      **({"polymorphic_error": error} if error else {}),
      "platforms": list(exported.platforms),
      "params": "baked in as constants (no argument); the file needs only jax to run",
      "param_bytes": param_bytes,
      "file_bytes": len(blob),
      "inputs": {k: {"shape": [d if isinstance(d, int) else "b" for d in s], "dtype": np.dtype(d).name}
                 for k, (s, d) in serving_input_specs(config, batch_dim).items()},
      "input_notes": {
          "present": "[B, 5] modality order text, table, image, video, audio",
          "image": "uint8 RGB, unnormalised; video likewise, frames at 1 fps ('features' stems: "
                   "float32 [B, tokens, dim] precomputed features)",
          "image_mask": "[B, Ni] real image tokens: every patch True when the image is present",
          "audio": "per-clip standardised log-mel, as m5p's Preprocessor makes it",
          "padding": "pad a batch with rows whose `present` is all False (their outputs are 0)",
          "how": "m5p.Encoder(...).preprocess(products) makes these fields from raw products",
      },
      "outputs": outputs,
      "jax_version": jax.__version__,
      "calling_convention_version": exported.calling_convention_version,
  }
  with open(os.path.join(out_dir, SERVING_SPEC), "w", encoding="utf-8") as f:
    json.dump(spec, f, indent=2)
  return spec


# ---------------------------------------------------------------------------
# The export.


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def export(workdir: str, output_dir: str, *, step: int | None = None,
           splits: Sequence[str] | None = None, data_dir: str = "", mesh: str = "",
           serving: bool = True, serving_batch: int = 8, serving_polymorphic: bool = True,
           serving_platforms: Sequence[str] = SERVING_PLATFORMS, overwrite: bool = False,
           log=print) -> dict:
  """Writes the export of `workdir`'s checkpoint `step` (default latest) to `output_dir`.

  `splits`: None = the config's eval and train splits (those the dataset has);
  `mesh`: 'data,fsdp,model' to run on instead of the run's config.mesh.
  Returns the summary also written to export.json.
  """
  import jax
  from m5p import sharding
  from m5p.data import convert
  from m5p.evaluation import embed as embed_lib
  from m5p.models.scale import ScaleModel
  from m5p.state import num_params
  from m5p.train import task

  t0 = time.perf_counter()
  if serving:
    _check_serialization()
  if os.path.exists(output_dir) and os.listdir(output_dir):
    if not overwrite:
      raise FileExistsError(f"{output_dir} is not empty; pass overwrite=True (--overwrite).")
    if jax.process_index() == 0:
      shutil.rmtree(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  config = mesh_from_flag(load_run_config(workdir, step), mesh)
  data_dir = data_dir or run_data_dir(workdir, config)
  manifest = convert.load_manifest(data_dir)
  device_mesh = sharding.make_mesh(config.mesh)
  params, step = restore_params(workdir, config, device_mesh, step, data_dir)
  log(f"restored step {step} of {workdir} onto mesh {dict(device_mesh.shape)} "
      f"({num_params(params) / 1e6:.2f}M params)")
  if task(config) == "classify":
    params, config = backbone_of_classifier(params, config)
    log(f"task='classify': exporting the fine-tuned backbone ({num_params(params) / 1e6:.2f}M "
        "params); the classification head stays in the run's checkpoints")

  # Params, config, tokenizer, conversion settings.
  save_params(os.path.join(output_dir, PARAMS_DIR), params)
  main = jax.process_index() == 0
  if main:
    with open(os.path.join(output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
    shutil.copyfile(os.path.join(data_dir, manifest["tokenizer"]),
                    os.path.join(output_dir, TOKENIZER_FILE))
    summary_manifest = {
        "record_version": manifest["record_version"], "tokenizer": TOKENIZER_FILE,
        "conversion": manifest["conversion"], "splits": manifest["splits"],
        "num_categories": manifest.get("num_categories"), "source_data_dir": os.path.abspath(data_dir),
    }
    with open(os.path.join(output_dir, MANIFEST_FILE), "w", encoding="utf-8") as f:
      json.dump(summary_manifest, f, ensure_ascii=False, indent=1)

  # Embeddings of the splits.
  if splits is None:
    splits = [s for s in dict.fromkeys((config.data.eval_split, config.data.train_split))
              if s in manifest["splits"]]
  counts = {}
  if splits:
    model = ScaleModel(config)
    shardings = jax.tree.map(lambda a: a.sharding, params)  # As restored: no second init trace.
    embed_fn = embed_lib.make_embed_fn(model, device_mesh, shardings)
    os.makedirs(os.path.join(output_dir, EMBEDDINGS_DIR), exist_ok=True)
    for split in splits:
      t = time.perf_counter()
      emb = embed_lib.embed_split(embed_fn, params, config, device_mesh, data_dir, split)
      counts[split] = int(len(emb["index"]))
      if main:
        save_npz(os.path.join(output_dir, EMBEDDINGS_DIR, f"{split}.npz"), embeddings_arrays(emb, step))
      log(f"embedded {split}: {counts[split]} items in {time.perf_counter() - t:.1f} s")

  # The serving function.
  spec = {}
  if main and serving:
    spec = export_serving(config, params, os.path.join(output_dir, SERVING_DIR),
                          batch_size=serving_batch, polymorphic=serving_polymorphic,
                          platforms=serving_platforms)
    if spec.get("polymorphic_error"):
      log(f"serving: batch-polymorphic export failed ({spec['polymorphic_error']}); "
          f"exported for batch {serving_batch}")

  summary = {
      "step": step, "workdir": os.path.abspath(workdir), "data_dir": os.path.abspath(data_dir),
      "mesh": dict(device_mesh.shape), "num_params": num_params(params),
      "embeddings": counts, "seconds": round(time.perf_counter() - t0, 1),
      "serving": {k: spec.get(k) for k in ("batch", "platforms", "params", "file_bytes")},
      "bytes": {}, "jax_version": jax.__version__,
  }
  if main:
    for name in (PARAMS_DIR, EMBEDDINGS_DIR, SERVING_DIR):
      if os.path.exists(os.path.join(output_dir, name)):
        summary["bytes"][name] = _dir_bytes(os.path.join(output_dir, name))
    with open(os.path.join(output_dir, EXPORT_FILE), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
  return summary


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax chatter.
  from m5p import distributed
  distributed.initialize()
  summary = export(FLAGS.workdir, FLAGS.output_dir, step=FLAGS.step, splits=FLAGS.splits,
                   data_dir=FLAGS.data_dir, mesh=FLAGS.mesh, serving=FLAGS.serving,
                   serving_batch=FLAGS.serving_batch,
                   serving_polymorphic=FLAGS.serving_polymorphic,
                   serving_platforms=FLAGS.serving_platforms, overwrite=FLAGS.overwrite)
  import jax
  if jax.process_index() == 0:
    sizes = ", ".join(f"{k}/ {v / 1e6:.1f} MB" for k, v in summary["bytes"].items())
    print(f"exported step {summary['step']} of {summary['workdir']} to "
          f"{os.path.abspath(FLAGS.output_dir)} in {summary['seconds']:.0f} s: {sizes}", flush=True)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir", "output_dir"])
  app.run(main)
