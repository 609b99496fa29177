"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters and activations are annotated with logical names ('embed', 'mlp',
'batch', ...); `RULES` alone decides how they are laid out on the mesh axes
`data`, `fsdp` and `model`. Data parallel = data; FSDP = fsdp (parameters and
optimizer state sharded along 'embed'); tensor parallel = model.
"""
from __future__ import annotations

import math
from typing import Any

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
)


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


def logical_sharding(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract values, from RULES."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; replicated over model."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
