"""The pretraining objective: harmonized contrastive + the five masked tasks.

  loss = contrastive_weight * contrastive + masked_weight * (mlm + mem + mrm + mfm + mam)

(authors: both weights 1, SCALE.md section 4).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from m5p.losses.contrastive import harmonized_contrastive
from m5p.losses.masked import masked_losses
from m5p.losses.ring import ring_harmonized_contrastive
from m5p.modalities import MODALITIES, PAIR_NAMES, PAIRS

MASKED_TASKS = ("mlm", "mem", "mrm", "mfm", "mam")  # One per modality, MODALITIES order.


def compute_loss(outputs: dict, batch: dict, config: ml_collections.ConfigDict
                 ) -> tuple[jax.Array, dict]:
  """(loss, metrics). Metrics (scalars):
    loss, contrastive, mlm, mem, mrm, mfm, mam
    temperature    the contrastive temperature (learned or config.loss.temperature)
    w/<i>-<j>      batch mean of G_b[i, j] (contrastive harmonization), PAIR_NAMES
    w/<m>          batch mean of G_b[m, m] (the contrastive self-weight)
    pair/<i>-<j>   that pair's InfoNCE
    mw/<m>         mean masked-task weight (stop-gradient G_b[m, m] from the JCT)
                   over samples holding m
    lm_dropped/<s> share of the MLM ('text') / MEM ('table') picks the pipeline
                   dropped beyond config.loss.max_predictions (0 when none)
  """
  lc = config.loss
  # 'ring': same loss and grads, b_local x b_local logits per device (m5p.losses.ring).
  impl = lc.get("implementation", "global")
  if impl not in ("global", "ring"):
    raise ValueError(f"config.loss.implementation={impl!r}: expected 'global' or 'ring'")
  # A learned temperature (config.loss.learn_temperature) comes from the model.
  temperature = outputs.get("temperature", lc.temperature)
  kwargs = dict(mode=lc.harmonization, infonce=lc.infonce, temperature=temperature)
  if lc.get("multi_positive", False):  # Listings of one product are positives of each other.
    kwargs["positive_groups"] = batch["fine_group"]
  if impl == "ring":
    contrastive_fn = functools.partial(ring_harmonized_contrastive,
                                       block_size=int(lc.get("ring_block_size", 0)) or None)
  else:
    contrastive_fn = harmonized_contrastive
  contrastive, aux = contrastive_fn(outputs["z"], outputs["present"], **kwargs)
  masked = masked_losses(outputs, batch, config)
  masked_sum = sum(masked[k] for k in MASKED_TASKS)
  loss = lc.contrastive_weight * contrastive + lc.masked_weight * masked_sum

  metrics = {"loss": loss, "contrastive": contrastive,
             "temperature": jnp.asarray(temperature, jnp.float32)}
  metrics.update({k: masked[k] for k in MASKED_TASKS})
  for p, (i, j) in enumerate(PAIRS):
    metrics[f"w/{PAIR_NAMES[p]}"] = aux["weights"][i, j]
    metrics[f"pair/{PAIR_NAMES[p]}"] = aux["pair_losses"][p]
  presf = jnp.asarray(outputs["present"], jnp.float32)
  mw = jnp.sum(masked["weights"] * presf, axis=0) / jnp.maximum(jnp.sum(presf, axis=0), 1.0)
  for m, name in enumerate(MODALITIES):
    metrics[f"w/{name}"] = aux["weights"][m, m]
    metrics[f"mw/{name}"] = mw[m]
  for sequence in ("text", "table"):
    dropped = jnp.sum(jnp.asarray(batch[f"{sequence}_lm_dropped"], jnp.float32))
    kept = jnp.sum(jnp.asarray(batch[f"{sequence}_lm_weights"], jnp.float32))
    metrics[f"lm_dropped/{sequence}"] = dropped / jnp.maximum(dropped + kept, 1.0)
  return loss, metrics
