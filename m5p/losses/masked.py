"""The five masked-modelling losses (SCALE.md section 4), on the JCT token outputs.

  mlm  text   cross-entropy at text_loss_mask positions against text_targets
  mem  table  cross-entropy at table_loss_mask positions against table_targets
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

MLM and MEM read the model's `mlm_nll` / `mem_nll` (the cross-entropy it
computes at the picked positions only, m5p.models.scale), or the full
`mlm_logits` / `mem_logits` when those are absent: the same values.

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


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, picked: jax.Array,
                       weight: jax.Array) -> jax.Array:
  """logits [B, L, V], targets [B, L] int, picked [B, L] bool, weight [B]."""
  logits = logits.astype(jnp.float32)
  targets = jnp.clip(targets, 0, logits.shape[-1] - 1)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return _token_mean(lse - tgt, picked, weight)


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

  def lm_loss(task, m, targets, loss_mask):
    # The model's per-position cross-entropy at the picked positions (the LM
    # head run on those only); from the full logits when it is absent.
    if f"{task}_nll" in outputs:
      return _token_mean(outputs[f"{task}_nll"], picked(loss_mask, m), w[:, m])
    return cross_entropy_loss(outputs[f"{task}_logits"], batch[targets], picked(loss_mask, m), w[:, m])

  m = config.model

  def target(modality, media_target):
    if batch_spec.stem(config, modality) == "features":
      return jnp.asarray(batch[modality], jnp.float32)
    return media_target(batch[modality])

  return {
      "mlm": lm_loss("mlm", 0, "text_targets", "text_loss_mask"),
      "mem": lm_loss("mem", 1, "table_targets", "table_loss_mask"),
      "mrm": mse_loss(outputs["mrm_pred"], target("image", lambda x: image_targets(x, m.patch_size)),
                      picked("image_loss_mask", 2, batch["image_mask"]), w[:, 2]),
      "mfm": mse_loss(outputs["mfm_pred"],
                      target("video", lambda x: video_targets(x, video_target_grid(config))),
                      picked("video_loss_mask", 3, batch["video_mask"]), w[:, 3]),
      "mam": mse_loss(outputs["mam_pred"], target("audio", lambda x: audio_targets(x, m.audio_patch)),
                      picked("audio_loss_mask", 4, batch["audio_mask"]), w[:, 4]),
      "weights": w,
  }
