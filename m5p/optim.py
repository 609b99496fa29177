"""AdamW with warmup + decay, gradient clipping, and weight decay on kernels and embeddings only."""
from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  o = config.optim
  total = max(int(config.total_steps), 1)
  warmup = int(round(o.warmup_frac * total))
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(o.lr, max(total - warmup, 1))
  elif o.schedule == "linear":
    decay = optax.linear_schedule(o.lr, 0.0, max(total - warmup, 1))
  else:
    raise ValueError(f"config.optim.schedule: unknown '{o.schedule}' (cosine | linear)")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), decay], [warmup])


# The leaf names weight decay applies to: flax's Dense / Projection kernels and
# nn.Embed / LearnedEmbedding tables.
DECAYED_LEAVES = ("kernel", "embedding")


def _leaf_name(path: tuple) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params) -> object:
  """True for the leaves AdamW decays: kernels and embedding tables, by name.

  Never biases, LayerNorm scales and biases, the LM bias or the temperature,
  whatever their rank: the q/k/v biases are (heads, head_dim), and under
  model.scan_layers every bias and LayerNorm parameter is stacked to
  [layers, ...], so a rank test would decay them."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in DECAYED_LEAVES,
                                          params)


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = config.optim
  schedule = learning_rate_schedule(config)
  parts = []
  if o.grad_clip and o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
