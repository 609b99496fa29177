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

from m5p import sharding
from m5p.models.scale import init_batch


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def create_sharded_state(model: nn.Module, tx: optax.GradientTransformation,
                         config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[TrainState, Any]:
  """Initialises parameters and optimizer state already sharded (no host copy).

  The abstract state (from `jax.eval_shape`) carries the logical names of
  every parameter; `sharding.RULES` turns them into `NamedSharding`s, and the
  init function is jitted with those as `out_shardings`.
  """

  def init(rng):
    variables = model.init({"params": rng, "dropout": rng}, init_batch(config, 1), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  rng = jax.random.key(config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.logical_sharding(abstract, mesh)
    state = jax.jit(init, out_shardings=shardings)(rng)
  return nn.meta.unbox(state), nn.meta.unbox(shardings)


def abstract_state(state_shardings: Any, model: nn.Module, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what orbax restores onto."""

  def init(rng):
    variables = model.init({"params": rng, "dropout": rng}, init_batch(config, 1), train=False)
    params = nn.meta.unbox(variables["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  shapes = jax.eval_shape(init, jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, state_shardings)


def num_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
