"""Parameters between the unrolled and the scanned layout of an Encoder's blocks.

config.model.scan_layers=False keeps each block under its own key
(`.../stack/block0`, `block1`, ...); True stacks them on a leading 'layers'
axis under `.../stack/blocks/block`. These convert a parameter (or gradient,
or optimizer-moment) tree from one layout to the other, e.g. to start a
scanned run from an unrolled checkpoint, or to compare the two.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

_BLOCK = re.compile(r"^block(\d+)$")


def _block_keys(tree: Mapping) -> list[str]:
  keys = sorted((k for k in tree if _BLOCK.match(str(k))), key=lambda k: int(_BLOCK.match(k)[1]))
  if keys and [int(_BLOCK.match(k)[1]) for k in keys] != list(range(len(keys))):
    raise ValueError(f"blocks {keys} are not numbered 0..{len(keys) - 1}")
  return keys


def stack_blocks(tree: Any) -> Any:
  """Unrolled -> scanned: every mapping holding block0..block{n-1} gets
  `blocks: {block: <their leaves stacked on axis 0>}` in their place."""
  if not isinstance(tree, Mapping):
    return tree
  keys = _block_keys(tree)
  out = {k: stack_blocks(v) for k, v in tree.items() if k not in keys}
  if keys:
    out["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[k] for k in keys])}
  return out


def unstack_blocks(tree: Any) -> Any:
  """Scanned -> unrolled: the inverse of `stack_blocks`."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: unstack_blocks(v) for k, v in tree.items() if k != "blocks"}
  if "blocks" in tree:
    stacked = tree["blocks"]["block"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
      out[f"block{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out
