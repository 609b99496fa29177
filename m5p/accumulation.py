"""Gradient accumulation that keeps the contrastive negatives global (GradCache).

Why not sum micro-batch gradients: the contrastive loss of a micro-batch sees
only its own rows as negatives, and the masked losses are token means over the
whole batch, so k micro-batch losses do not add up to the global one. Here
(Gao et al. 2021, GradCache; open_clip's accum_freq), for k = accum_steps:

  pass 1  every micro-batch through the model without gradients (lax.scan),
          keeping only the outputs the loss reads (`LOSS_OUTPUTS`: z, pooled,
          the masked-task predictions; input-sized, small next to the
          activations); concatenated back into the global batch's order.
  loss    `compute_loss` on those cached outputs, unchanged: the global-batch
          loss and metrics, and (jax.vjp) its gradient w.r.t. each cached
          output. Everything that spans the batch lives here: the 10 pairs'
          InfoNCE over all B rows, the harmonization G, the masked losses'
          token means over the global count of picked tokens, and their
          weights w_b = stop_gradient(G_b[m, m]) (per sample, from `pooled`).
  pass 2  every micro-batch through the model again, with gradients: the vjp
          of its outputs pulls back its slice of those output gradients into
          parameter gradients, summed over micro-batches (lax.scan: one
          micro-batch's activations live at a time).

By the chain rule the loss, metrics and gradients equal one pass over the
global batch (to float rounding). The cost is one extra forward per
micro-batch (pass 1), as with remat.

Micro-batch j holds the rows j, j + k, j + 2k, ...: with the batch sharded
contiguously over the (data, fsdp) devices, every device holds B / (k * n)
rows of every micro-batch, so the split and the merge move no data. This needs
batch_size % (accum_steps * data * fsdp) == 0.

Dropout: micro-batch j uses fold_in(dropout_rng, j), the same key in both
passes, so pass 2 recomputes exactly the outputs cached in pass 1 and the
gradients are exact for the masks drawn. The masks are not those a one-pass
step draws (those are drawn for [B, ...] shapes and cannot be sliced per
micro-batch): with dropout > 0 the step is an equally valid sample, not the
same numbers. With dropout 0 (the test) it is the same step.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from m5p.losses import masked
from m5p.losses.total import compute_loss

# The model outputs `compute_loss` reads, per example (batch-leading). The
# others (hidden states, unimodal, fused) are not kept: a key
# missing here fails loudly (KeyError in compute_loss) rather than silently.
LOSS_OUTPUTS = ("present", "z", "pooled", "mrm_pred", "mfm_pred", "mam_pred")
# The LM logits at the pick slots, [B, P, V], are cached as their per-slot
# cross-entropy `lm_nll` [B, P] instead (m5p.losses.masked.lm_slot_nll reads either).

ValueAndGrad = Callable[[Any, dict, jax.Array], tuple[tuple[jax.Array, dict], Any]]


def split_micro_batches(tree: Any, k: int) -> Any:
  """[B, ...] -> [k, B / k, ...]; micro-batch j holds rows j, j + k, ... (see module doc)."""

  def split(x):
    b = x.shape[0]
    x = x.reshape(b // k, k, *x.shape[1:])
    x = nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, tree)


def merge_micro_batches(tree: Any) -> Any:
  """[k, B / k, ...] -> [B, ...], the inverse of `split_micro_batches`."""

  def merge(x):
    x = jnp.swapaxes(x, 0, 1)
    x = nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])

  return jax.tree.map(merge, tree)


def _differentiable(outputs: dict) -> tuple[dict, dict]:
  """(float outputs, the rest: e.g. the bool `present`, which has no gradient)."""
  floats = {k: v for k, v in outputs.items() if jnp.issubdtype(v.dtype, jnp.floating)}
  return floats, {k: v for k, v in outputs.items() if k not in floats}


def _check_divisible(batch_size: int, k: int) -> None:
  if batch_size % k:
    raise ValueError(f"batch_size {batch_size} is not divisible by accum_steps {k}.")
  mesh = jax.sharding.get_abstract_mesh()
  shards = 1
  if not mesh.empty:
    shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  if (batch_size // k) % shards:
    raise ValueError(f"micro-batch {batch_size // k} (batch_size {batch_size} / accum_steps {k}) "
                     f"is not divisible by the data x fsdp size {shards}.")


def make_value_and_grad(model: nn.Module, config: ml_collections.ConfigDict,
                        accum_steps: int) -> ValueAndGrad:
  """(params, batch, dropout_rng) -> ((loss, metrics), grads) of the global
  batch, in `accum_steps` micro-batches (two passes, see the module doc):
  the same values as jax.value_and_grad of compute_loss over the whole batch."""
  k = int(accum_steps)

  def forward(params, micro_batch, dropout_rng, j):
    out = model.apply({"params": params}, micro_batch, train=True,
                      rngs={"dropout": jax.random.fold_in(dropout_rng, j)})
    kept = {name: out[name] for name in LOSS_OUTPUTS}
    kept["lm_nll"] = masked.lm_token_nll(out["lm_logits"], masked.lm_targets(micro_batch))
    return kept

  def value_and_grad(params, batch, dropout_rng):
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    _check_divisible(batch_size, k)
    micro = split_micro_batches(batch, k)
    index = jnp.arange(k)

    # Pass 1: outputs of every micro-batch, no gradients.
    def embed(carry, xs):
      micro_batch, j = xs
      return carry, forward(params, micro_batch, dropout_rng, j)

    _, cached = jax.lax.scan(embed, None, (micro, index))
    floats, rest = _differentiable(merge_micro_batches(cached))

    # The global-batch loss and its gradient w.r.t. the cached outputs.
    def loss_of(outputs):
      return compute_loss({**rest, **outputs}, batch, config)

    loss, pull, metrics = jax.vjp(loss_of, floats, has_aux=True)
    (d_outputs,) = pull(jnp.ones_like(loss))
    d_micro = split_micro_batches(d_outputs, k)

    # Pass 2: each micro-batch's output gradients pulled back to the params.
    def backprop(acc, xs):
      micro_batch, d_out, j = xs
      _, pull_params = jax.vjp(lambda p: _differentiable(forward(p, micro_batch, dropout_rng, j))[0],
                               params)
      (g,) = pull_params(d_out)
      return jax.tree.map(jnp.add, acc, g), None

    grads, _ = jax.lax.scan(backprop, jax.tree.map(jnp.zeros_like, params),
                            (micro, d_micro, index))
    return (loss, metrics), grads

  return value_and_grad
