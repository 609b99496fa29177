"""The train state, created directly sharded on the mesh from logical axis names."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import Mesh

from m5p import host_memory, sharding
from m5p.models.scale import init_batch


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_state_fn(model: nn.Module, tx: optax.GradientTransformation,
                  config: ml_collections.ConfigDict, unbox: bool = True):
  """rng -> a fresh TrainState (step 0, initialised params, optimizer state):
  what the trainer jits sharded, and tests and tools trace or compile.
  `unbox=False` keeps the params' logical-axis boxes (for sharding them)."""

  def init(rng):
    variables = model.init({"params": rng, "dropout": rng}, init_batch(config, 1), train=False)
    params = nn.meta.unbox(variables["params"]) if unbox else variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def create_sharded_state(model: nn.Module, tx: optax.GradientTransformation,
                         config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[TrainState, Any]:
  """Initialises parameters and optimizer state already sharded (no host copy).

  The abstract state (from `jax.eval_shape`) carries the logical names of
  every parameter; `sharding.rules(config)` turns them into `NamedSharding`s, and the
  init function is jitted with those as `out_shardings`.
  """

  init = init_state_fn(model, tx, config, unbox=False)
  rng = jax.random.key(config.seed)
  table = sharding.rules(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(table):
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.logical_sharding(abstract, mesh, table)
    state = jax.jit(init, out_shardings=shardings)(rng)
  jax.block_until_ready(state)
  host_memory.release()  # The init's freed temporaries (see m5p.host_memory).
  return nn.meta.unbox(state), nn.meta.unbox(shardings)


def abstract_state(state_shardings: Any, model: nn.Module, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what orbax restores onto."""

  shapes = jax.eval_shape(init_state_fn(model, tx, config), jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, state_shardings)


def num_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------
# Starting from an export (config.init_from).

# Data fields that set parameter shapes (vocabulary, positions, patches).
_SHAPE_DATA_FIELDS = ("vocab_size", "text_len", "table_len", "max_fields", "image_size",
                      "max_frames", "audio_frames", "n_mels")


def _plain(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _config_differences(export_config: Any, config: ml_collections.ConfigDict) -> list[str]:
  """'model.width: 64 (export) vs 32 (config)' for each shape-relevant field that differs."""
  out = []
  for section, keys in (("model", None), ("data", _SHAPE_DATA_FIELDS)):
    theirs, ours = _plain(export_config.get(section, {})), _plain(config.get(section, {}))
    for k in keys or sorted(set(theirs) | set(ours)):
      a, b = theirs.get(k, "<absent>"), ours.get(k, "<absent>")
      if a != b:
        out.append(f"{section}.{k}: {a} (export) vs {b} (config)")
  return out


def _shapes(tree: Any) -> dict[str, tuple]:
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def load_export_params(export_dir: str, target_params: Any, target_shardings: Any,
                       config: ml_collections.ConfigDict) -> Any:
  """An export's params (`python -m m5p.export`) restored straight onto
  `target_shardings`, i.e. this run's mesh, whatever mesh the export was
  trained or exported on. Raises one ValueError naming the differing config
  fields when the export's params differ in shape from `target_params`
  (checked against the checkpoint's metadata, before any array is read)."""
  import os  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from m5p import export  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(os.path.join(export_dir, export.PARAMS_DIR))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init_from={export_dir!r}: no export there ({path} is "
                            "missing; make one with `python -m m5p.export --workdir=W --output_dir=E`).")
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
  saved, wanted = _shapes(getattr(meta, "item_metadata", meta)), _shapes(target_params)
  if saved != wanted:
    bad = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    fields = _config_differences(export.load_config(export_dir), config)
    raise ValueError(
        f"config.init_from={export_dir!r}: the export's model differs in shape from this "
        f"config's model ({len(bad)} of {len(set(saved) | set(wanted))} params differ, e.g. "
        f"{bad[0]}: {saved.get(bad[0], 'absent')} in the export vs "
        f"{wanted.get(bad[0], 'absent')} here). Differing fields: "
        f"{'; '.join(fields) or 'none in model.* / data shape fields (another m5p version?)'}. "
        "Set this config's model (and data shape) fields to the export's (E/config.json).")
  target = jax.tree.map(lambda p, sh: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sh),
                        target_params, target_shardings)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)
