"""The fine-tuning objective of task='classify': softmax cross-entropy on the category.

Same signature as `m5p.losses.total.compute_loss`, so the one training loop
takes either. Rows without a usable label (label < 0, unknown, or >= the
number of classes) are left out of the mean rather than clipped into a class.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def classification_loss(outputs: dict, batch: dict, config: ml_collections.ConfigDict
                        ) -> tuple[jax.Array, dict]:
  """(loss, metrics): mean cross-entropy over labelled rows (with
  `config.classify.label_smoothing`); metrics loss, accuracy (top-1 of the
  batch, dropout on), labelled (fraction of rows with a usable label)."""
  logits = jnp.asarray(outputs["logits"], jnp.float32)  # [B, C]
  num_classes = logits.shape[-1]
  labels = jnp.asarray(batch["label"], jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  safe = jnp.where(valid, labels, 0)
  smoothing = float(config.classify.get("label_smoothing", 0.0))
  targets = optax.smooth_labels(jax.nn.one_hot(safe, num_classes), smoothing) if smoothing else \
      jax.nn.one_hot(safe, num_classes)
  nll = optax.softmax_cross_entropy(logits, targets)
  validf = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(validf), 1.0)
  loss = jnp.sum(nll * validf) / count
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  metrics = {"loss": loss, "accuracy": jnp.sum(correct.astype(jnp.float32)) / count,
             "labelled": jnp.mean(validf)}
  return loss, metrics
