"""Exact, mesh-independent checksums of a train state, computed on device.

Every checkpoint records one 32-bit checksum per array of the state (and
whether all of it is finite); a restore recomputes them and refuses a state
that differs. Each element contributes f(bits, position) =
((bits ^ position * GOLDEN) * MIX) mod 2**32 and the contributions are summed
mod 2**32. Integer sums are exact and do not depend on the order of the
reduction, so the same checksum comes out on any mesh or number of processes
(a checkpoint saved on (4, 2) devices verifies when restored onto (8, 1));
and f is one-to-one in the bits for a given position, so any single changed
element always changes the checksum (more changes escape it with odds 2**-32).
Only the checksums (a few bytes per array) come back to the host.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

ALGORITHM = "m5p-sum32-v1"
_GOLDEN = np.uint32(0x9E3779B1)
_MIX = np.uint32(0x85EBCA6B)
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _bits(x: jax.Array) -> jax.Array:
  """The array's raw bits as uint32, one row per element (8-byte types: two words)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).reshape(-1)
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  return jax.lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32).reshape(-1)


def _leaf_summary(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  bits = _bits(x)
  position = jnp.arange(bits.shape[0], dtype=jnp.uint32)
  checksum = jnp.sum((bits ^ (position * _GOLDEN)) * _MIX, dtype=jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    nonfinite = jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
  else:
    nonfinite = jnp.zeros((), jnp.int32)
  return checksum, nonfinite


def _summaries(tree: Any) -> tuple[jax.Array, jax.Array]:
  parts = [_leaf_summary(x) for x in jax.tree.leaves(tree)]
  if not parts:
    return jnp.zeros((0,), jnp.uint32), jnp.zeros((0,), jnp.int32)
  return jnp.stack([c for c, _ in parts]), jnp.stack([n for _, n in parts])


_compiled: dict[Any, Any] = {}


def summarize(tree: Any, mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """{'algorithm', 'leaves': {path: 'hex checksum'}, 'nonfinite': {path: count (only > 0)}}.

  `mesh`: replicate the (tiny) result over it, so every process can read it;
  default: the mesh of the tree's first array.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  paths = [jax.tree_util.keystr(p) for p, _ in leaves]
  if not leaves:
    return {"algorithm": ALGORITHM, "leaves": {}, "nonfinite": {}}
  if mesh is None:
    sharding = getattr(leaves[0][1], "sharding", None)
    mesh = getattr(sharding, "mesh", None)
  key = (jax.tree.structure(tree), tuple((x.shape, str(x.dtype)) for _, x in leaves), mesh)
  fn = _compiled.get(key)
  if fn is None:
    out = NamedSharding(mesh, PartitionSpec()) if isinstance(mesh, jax.sharding.Mesh) else None
    fn = _compiled[key] = jax.jit(_summaries, out_shardings=out)
  checksums, nonfinite = fn(tree)
  checksums = np.asarray(checksums.addressable_shards[0].data)
  nonfinite = np.asarray(nonfinite.addressable_shards[0].data)
  return {"algorithm": ALGORITHM,
          "leaves": {p: f"{int(c):08x}" for p, c in zip(paths, checksums)},
          "nonfinite": {p: int(n) for p, n in zip(paths, nonfinite) if n}}


def differences(saved: dict[str, Any], restored: dict[str, Any]) -> list[str]:
  """Paths whose checksums differ (or that one side lacks); [] when they agree."""
  if saved.get("algorithm") != restored.get("algorithm"):
    return [f"checksum algorithm {saved.get('algorithm')!r} vs {restored.get('algorithm')!r}"]
  a, b = saved.get("leaves", {}), restored.get("leaves", {})
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
