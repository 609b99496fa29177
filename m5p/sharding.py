"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters and activations are annotated with logical names ('embed', 'mlp',
'batch', ...); the rules table alone decides how they are laid out on the mesh
axes `data`, `fsdp` and `model`. Data parallel = data; FSDP = fsdp (parameters
and optimizer state sharded along 'embed'); tensor parallel = model.

`RULES` is the default table; `rules(config)` is the table a run uses: RULES
with `config.sharding_rules` merged in (an override replaces the rule of its
logical axis), so any layout is a config change, e.g.
`--config.sharding_rules="(('mlp', None), ('embed', 'model'))"`.
"""
from __future__ import annotations

import ast
import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("proj", "model"),
    ("kv", None),
    ("length", None),
    ("patch", None),
    ("norm", None),
    ("modality", None),
    ("layers", None),  # The stacked blocks of config.model.scan_layers.
)


Rules = tuple[tuple[str, Any], ...]


def _mesh_axes(logical: str, target: Any) -> Any:
  """A rule's right-hand side checked against MESH_AXES: None, an axis name, or
  a tuple of distinct axis names (a list, as JSON round trips give, is one)."""
  names = (target,) if target is None or isinstance(target, str) else tuple(target)
  bad = [n for n in names if n is not None and n not in MESH_AXES]
  if bad or (len(names) > 1 and (None in names or len(set(names)) < len(names))):
    raise ValueError(
        f"config.sharding_rules: logical axis {logical!r} -> {target!r}: expected None, one of "
        f"the mesh axes {MESH_AXES} or a tuple of distinct ones"
        + (f"; {bad[0]!r} is not a mesh axis." if bad else "."))
  return names[0] if len(names) == 1 else names


def rules(config: ml_collections.ConfigDict | None = None) -> Rules:
  """The logical-axis rules of a run: RULES with `config.sharding_rules` merged in.

  The override is a sequence of (logical axis, mesh axes) pairs, or its Python
  literal as a string (the command line's form); each pair replaces the rule of
  its logical axis, the other rules stay. Checked here, so that a typo fails
  with one clear message instead of deep inside flax or GSPMD.
  """
  overrides = config.get("sharding_rules", ()) if config is not None else ()
  if isinstance(overrides, str):
    try:
      overrides = ast.literal_eval(overrides) if overrides.strip() else ()
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"config.sharding_rules={overrides!r} is not a Python literal: {e}") from None
  if (isinstance(overrides, Sequence) and len(overrides) == 2 and isinstance(overrides[0], str)
      and not isinstance(overrides[1], (list, tuple)) and overrides[1] in MESH_AXES + (None,)):
    overrides = (overrides,)  # A single pair given bare.
  known = dict(RULES)
  table = dict(RULES)
  for pair in overrides or ():
    if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
      raise ValueError(f"config.sharding_rules: {pair!r} is not a (logical axis, mesh axes) pair, "
                       "e.g. (('mlp', 'model'), ('embed', None)).")
    logical, target = pair
    if logical not in known:
      raise ValueError(f"config.sharding_rules: unknown logical axis {logical!r}; the logical "
                       f"axes are {tuple(known)}.")
    if logical == "batch":  # batch_sharding and the ring loss split the batch this way.
      raise ValueError("config.sharding_rules: 'batch' is always split over ('data', 'fsdp'); "
                       "size those axes with config.mesh instead.")
    table[logical] = _mesh_axes(logical, target)
  return tuple(table.items())


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves the config's axis sizes (-1 = the remaining devices) against `num_devices`."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices.")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                     f"but {num_devices} are available; set one axis to -1 or match the count.")
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  """A ('data', 'fsdp', 'model') mesh with Auto axes (GSPMD, as linen needs)."""
  if devices is None:
    devices = jax.devices()
    n = int(mesh_config.get("num_devices", -1))
    if n > 0:
      if n > len(devices):
        raise ValueError(f"config.mesh.num_devices={n} but only {len(devices)} devices are visible.")
      devices = devices[:n]
  shape = mesh_shape(mesh_config, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # Non-physical shapes on emulated/odd topologies.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_sharding(tree: Any, mesh: Mesh, table: Rules = RULES) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract values, from a
  rules table (a run's: `rules(config)`)."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, table)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; replicated over model."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
