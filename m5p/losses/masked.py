"""The five masked-modelling losses (SCALE.md section 4), on the JCT token outputs.

  mlm  text   cross-entropy of the model's `lm_logits` (the LM head at the
              batch's pick slots: text_lm_positions, then table_lm_positions)
              against text_lm_ids, over the text slots with text_lm_weights > 0
  mem  table  the same over the table slots (table_lm_* fields)
  mrm  image  MSE at image_loss_mask patches against the patch's pixels,
              normalised per patch (mean 0, std 1 over its p*p*3 values; MAE)
  mfm  video  MSE at video_loss_mask frames (and real frames) against a coarse
              per-frame target: the frame average-pooled to a g x g RGB grid
              (g = towers.VIDEO_TARGET_GRID = 4, or the largest divisor of
              the image size below it), normalised per frame like the image
              patches (F_v = g*g*3 = 48). The authors regress 1024-d S3D
              features; a pooled grid is the cheapest pixel target that still
              asks for the frame's layout and colours, not only its mean.
              Masked frames are zeroed whole at the input (pixels -> 0).
  mam  audio  MSE at audio_loss_mask patches (and real patches) against the
              (already standardised) log-mel values of the patch.

With a 'features' stem (config.model.stem) MRM / MFM / MAM regress the
input features themselves at the picked tokens (authors: the original region,
S3D and audio features), unnormalised.

Each loss is a token mean: sum over picked tokens of w_b * loss / number of
picked tokens, where w_b = G_b[m, m], the harmonization weight (same function
as the contrastive loss) recomputed from the JCT's pooled outputs. m5p
decision: stop_gradient on w_b, so the masked losses cannot lower themselves
by moving the pooled vectors to shrink their own weight (the authors multiply
the predictions by the weight, with gradients). Tokens of absent modalities
are never picked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from m5p.data import batch_spec
from m5p.losses.contrastive import harmonization_weights
from m5p.models.towers import (VIDEO_TARGET_GRID, mfm_target_dim, normalize_pixels,  # noqa: F401
                               patchify_audio, patchify_image, video_target_grid)

_EPS = 1e-6


def _standardize(x: jax.Array) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _EPS)


def image_targets(image: jax.Array, patch: int) -> jax.Array:
  """uint8 [B, H, W, 3] -> [B, Ni, p*p*3], per-patch normalised pixels."""
  return _standardize(patchify_image(normalize_pixels(image), patch))


def video_targets(video: jax.Array, grid: int) -> jax.Array:
  """uint8 [B, T, H, W, 3] -> [B, T, grid*grid*3]: average-pooled frames, normalised per frame."""
  b, t, h, w, c = video.shape
  x = normalize_pixels(video).reshape(b, t, grid, h // grid, grid, w // grid, c)
  return _standardize(x.mean(axis=(3, 5)).reshape(b, t, grid * grid * c))


def audio_targets(audio: jax.Array, patch: tuple[int, int]) -> jax.Array:
  """[B, Ta, F] -> [B, Na, pt*pf] log-mel patches."""
  return patchify_audio(jnp.asarray(audio, jnp.float32), tuple(patch))


def masked_task_weights(pooled: jax.Array, present: jax.Array) -> jax.Array:
  """w [B, M] = stop_gradient(diag G_b), G from the JCT pooled vectors; 0 when absent."""
  g = harmonization_weights(pooled, present)
  return jax.lax.stop_gradient(jnp.diagonal(g, axis1=1, axis2=2))


def _token_mean(per_token: jax.Array, picked: jax.Array, weight: jax.Array) -> jax.Array:
  """sum(weight_b * per_token * picked) / number picked (0 when none)."""
  total = jnp.sum(jnp.where(picked, per_token * weight[:, None], 0.0))
  return total / jnp.maximum(jnp.sum(picked.astype(jnp.float32)), 1.0)


def lm_token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy [B, P] of logits [B, P, V] (float32) against target ids [B, P]."""
  logits = logits.astype(jnp.float32)
  targets = jnp.clip(jnp.asarray(targets, jnp.int32), 0, logits.shape[-1] - 1)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def lm_slot_nll(outputs: dict, batch: dict) -> jax.Array:
  """[B, Pt + Pp]: the cross-entropy of `lm_logits` at the text then table
  pick slots, or `lm_nll` when the caller computed it already
  (m5p.accumulation caches that, [B, P], instead of the [B, P, V] logits)."""
  if "lm_nll" in outputs:
    return outputs["lm_nll"]
  return lm_token_nll(outputs["lm_logits"], lm_targets(batch))


def lm_targets(batch: dict) -> jax.Array:
  """The original ids of the pick slots, text then table: [B, Pt + Pp]."""
  return jnp.concatenate([jnp.asarray(batch["text_lm_ids"]), jnp.asarray(batch["table_lm_ids"])],
                         axis=1)


def weighted_token_mean(nll: jax.Array, weights: jax.Array, sample_weight: jax.Array) -> jax.Array:
  """sum over slots of w_b * weight * nll / sum of weights: nll, weights [B, P]
  (weight 0: an empty slot, whose value never reaches the result), w_b [B]."""
  weights = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(jnp.where(weights > 0, nll * weights * sample_weight[:, None], 0.0))
  return total / jnp.maximum(jnp.sum(weights), 1.0)


def mse_loss(pred: jax.Array, target: jax.Array, picked: jax.Array, weight: jax.Array) -> jax.Array:
  """pred, target [B, N, K], picked [B, N] bool, weight [B]: mean over K, token mean over picked."""
  # Unpicked tokens are zeroed first, so that no value there (not even a
  # non-finite target of an absent modality) reaches the loss or its gradient.
  diff = jnp.where(picked[..., None], pred.astype(jnp.float32) - target.astype(jnp.float32), 0.0)
  return _token_mean(jnp.mean(jnp.square(diff), axis=-1), picked, weight)


def masked_losses(outputs: dict, batch: dict, config: ml_collections.ConfigDict) -> dict:
  """{'mlm', 'mem', 'mrm', 'mfm', 'mam'}: scalars, plus 'weights' [B, 5] (the w_b)."""
  present = jnp.asarray(outputs["present"], bool)
  w = masked_task_weights(outputs["pooled"], present)

  def picked(name, m, *extra):
    p = jnp.asarray(batch[name], bool) & present[:, m][:, None]
    for e in extra:
      p = p & jnp.asarray(e, bool)
    return p

  lm_nll = lm_slot_nll(outputs, batch)
  n_text = jnp.asarray(batch["text_lm_weights"]).shape[1]

  def lm_loss(sequence, m, nll):
    # Slots of an absent modality weigh 0 (the pipeline gives it no picks anyway).
    weights = jnp.asarray(batch[f"{sequence}_lm_weights"], jnp.float32) * present[:, m:m + 1]
    return weighted_token_mean(nll, weights, w[:, m])

  m = config.model

  def target(modality, media_target):
    if batch_spec.stem(config, modality) == "features":
      return jnp.asarray(batch[modality], jnp.float32)
    return media_target(batch[modality])

  return {
      "mlm": lm_loss("text", 0, lm_nll[:, :n_text]),
      "mem": lm_loss("table", 1, lm_nll[:, n_text:]),
      "mrm": mse_loss(outputs["mrm_pred"], target("image", lambda x: image_targets(x, m.patch_size)),
                      picked("image_loss_mask", 2, batch["image_mask"]), w[:, 2]),
      "mfm": mse_loss(outputs["mfm_pred"],
                      target("video", lambda x: video_targets(x, video_target_grid(config))),
                      picked("video_loss_mask", 3, batch["video_mask"]), w[:, 3]),
      "mam": mse_loss(outputs["mam_pred"], target("audio", lambda x: audio_targets(x, m.audio_patch)),
                      picked("audio_loss_mask", 4, batch["audio_mask"]), w[:, 4]),
      "weights": w,
  }
