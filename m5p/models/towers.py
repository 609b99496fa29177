"""The five unimodal towers (SCALE.md section 2, "m5p decision" column).

Each tower maps its batch fields to `(tokens [B, L_m, D], key_mask [B, L_m])`
with its [CLS] at position 0 and `key_mask[:, 0]` True. The key mask marks
real tokens only; `ScaleModel` combines it with modality presence.

`ScaleModel` wires them: text and table share the word embedding and (by
default) one stack, called on each; the video is each frame
through the image tower (by default the same weights, in the same call as
the image), each frame's CLS as a frame token, then `VideoTower`'s temporal
blocks.

Token orders (the data pipeline's masks follow them):
  image patches  row-major over the (H/p, W/p) grid: index = row * (W/p) + col;
                 each patch flattened as (pixel row, pixel col, channel).
  audio patches  time-major over the (Ta/pt, F/pf) grid: index = t * (F/pf) + f;
                 each patch flattened as (frame, mel bin).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m5p.models import layers

Dtype = Any


# Video frames' MFM target: each frame average-pooled to a g x g RGB grid
# (see m5p.losses.masked); the model's MFM head predicts these g*g*3 values.
VIDEO_TARGET_GRID = 4


def video_target_grid(config) -> int:
  """The largest g <= VIDEO_TARGET_GRID dividing the image size."""
  size = config.data.image_size
  return max(g for g in range(1, VIDEO_TARGET_GRID + 1) if size % g == 0)


def mfm_target_dim(config) -> int:
  """F_v, the width of the per-frame MFM target and prediction."""
  return video_target_grid(config) ** 2 * 3


# ---------------------------------------------------------------- patchify --

def patchify_image(images: jax.Array, patch: int) -> jax.Array:
  """[..., H, W, C] -> [..., (H/p)*(W/p), p*p*C], row-major patches."""
  *lead, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"image {h}x{w} is not divisible by patch_size {patch}")
  gh, gw = h // patch, w // patch
  x = images.reshape(*lead, gh, patch, gw, patch, c)
  n = len(lead)
  x = jnp.moveaxis(x, n + 2, n + 1)  # [..., gh, gw, p, p, c]
  return x.reshape(*lead, gh * gw, patch * patch * c)


def patchify_audio(logmel: jax.Array, patch: tuple[int, int]) -> jax.Array:
  """[B, Ta, F] -> [B, (Ta/pt)*(F/pf), pt*pf], time-major patches."""
  b, t, f = logmel.shape
  pt, pf = patch
  if t % pt or f % pf:
    raise ValueError(f"audio {t}x{f} is not divisible by audio_patch {patch}")
  x = logmel.reshape(b, t // pt, pt, f // pf, pf)
  x = jnp.swapaxes(x, 2, 3)  # [B, gt, gf, pt, pf]
  return x.reshape(b, (t // pt) * (f // pf), pt * pf)


def normalize_pixels(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def _with_cls(cls: jax.Array, tokens: jax.Array) -> jax.Array:
  """Prepends a learned [D] (or [1, D]) CLS to tokens [B, L, D]."""
  b, _, d = tokens.shape
  cls = jnp.broadcast_to(cls.reshape(1, 1, d).astype(tokens.dtype), (b, 1, d))
  return jnp.concatenate([cls, tokens], axis=1)


def _lookup(table: jax.Array, ids: jax.Array, dtype) -> jax.Array:
  """table[ids] for a small table, as a one-hot matmul: no gather, so it
  partitions cleanly whatever the sharding of the table's 'embed' axis.
  Out-of-range ids are clipped."""
  ids = jnp.clip(ids, 0, table.shape[0] - 1)
  return jax.nn.one_hot(ids, table.shape[0], dtype=dtype) @ table.astype(dtype)


def embed_tokens_lookup(word_embed: nn.Module, ids: jax.Array) -> jax.Array:
  """word_embed(ids) with the table gathered whole first (constraint to
  replicated): each device then looks up its own batch rows, and the result
  is batch-sharded. (A lookup into the ('vocab', 'embed')-sharded table
  makes GSPMD replicate the [B, L, D] output instead.) Parameter-wise this
  is the all-gather FSDP does for every weight anyway."""
  table = nn.with_logical_constraint(word_embed.embedding, (None, None))
  ids = jnp.clip(ids, 0, table.shape[0] - 1)  # Out-of-range ids: clipped, never NaN.
  return jnp.take(table, ids, axis=0).astype(word_embed.dtype)


def _own_stack(tower: nn.Module) -> nn.Module:
  """The 'stack' of an image, video or audio tower (its `layers` blocks with
  its StackConfig); called inside the tower's compact __call__, so the tower
  is its parent."""
  return layers.Encoder(tower.layers, tower.cfg, name="stack")


def _true_first(mask: jax.Array) -> jax.Array:
  """[B, L] -> [B, L] with column 0 forced True (the CLS is always attendable)."""
  return mask.at[:, 0].set(True)


# -------------------------------------------------------------------- text --

class TextTower(nn.Module):
  """Token embedding (shared with the table) + learned positions + stack.

  `text_ids[:, 0]` is [CLS] (the pipeline puts it there)."""
  word_embed: nn.Module  # nn.Embed, shared with TableTower and the LM head.
  stack: nn.Module  # layers.Encoder, shared with TableTower by default.
  max_len: int
  width: int
  cfg: layers.StackConfig

  @nn.compact
  def embed_tokens(self, ids: jax.Array, mask: jax.Array, *, train: bool):
    """The input of the stack: (x [B, Lt, D], key_mask [B, Lt])."""
    length = ids.shape[1]
    pos = layers.LearnedEmbedding(self.max_len, self.width, name="pos")()[:length]
    x = embed_tokens_lookup(self.word_embed, ids) + pos.astype(self.cfg.dtype)[None]
    x = layers.dropout(self.cfg)(x, deterministic=not train)
    return layers.constrain(x), _true_first(mask)

  def __call__(self, ids: jax.Array, mask: jax.Array, *, train: bool):
    x, key_mask = self.embed_tokens(ids, mask, train=train)
    return self.stack(x, key_mask, train=train), key_mask


class TableTower(nn.Module):
  """Table tokens: shared word embedding + own positions + key/value segment
  embedding (0 CLS/pad, 1 key, 2 value) + field-index embedding."""
  word_embed: nn.Module
  stack: nn.Module
  max_len: int
  max_fields: int
  width: int
  cfg: layers.StackConfig

  @nn.compact
  def embed_tokens(self, ids, mask, segment, field, *, train: bool):
    length = ids.shape[1]
    pos = layers.LearnedEmbedding(self.max_len, self.width, name="pos")()[:length]
    seg = layers.LearnedEmbedding(3, self.width, name="segment")()
    fld = layers.LearnedEmbedding(self.max_fields, self.width, name="field")()
    dtype = self.cfg.dtype
    x = (embed_tokens_lookup(self.word_embed, ids) + pos.astype(dtype)[None]
         + _lookup(seg, segment, dtype) + _lookup(fld, field, dtype))
    x = layers.dropout(self.cfg)(x, deterministic=not train)
    return layers.constrain(x), _true_first(mask)

  def __call__(self, ids, mask, segment, field, *, train: bool):
    x, key_mask = self.embed_tokens(ids, mask, segment, field, train=train)
    return self.stack(x, key_mask, train=train), key_mask


# ------------------------------------------------------------------- image --

class ImageTower(nn.Module):
  """ViT: patch stem (reshape + dense) on normalised pixels, learned [CLS] and
  positions, `layers` blocks. Patches flagged in `zero` are zeroed before the
  stem (MRM). Also encodes video frames when the video reuses it.

  stem='features': the input is precomputed region features [N, Ni, Di]
  (the released M5Product's), each region a token through the dense stem."""
  patch_size: int
  layers: int
  width: int
  cfg: layers.StackConfig
  stem: str = "media"  # | 'features'

  @nn.compact
  def __call__(self, pixels: jax.Array, zero: jax.Array | None, *, train: bool,
               split: tuple[int, int] | None = None, token_mask: jax.Array | None = None,
               embedded: bool = False):
    """pixels: [N, H, W, 3] float (already normalised), or features [N, Ni, Di]
    (stem='features'); zero: [N, Ni] bool or None; token_mask: [N, Ni] real
    tokens (None: all). Returns (tokens [N, 1 + Ni, D], key_mask); with
    `split` (see layers.Encoder) the tokens are its (full, cls) pair instead.

    embedded=True: `pixels` are a stack input [N, L, D] that another tower
    embedded and `token_mask` its key mask [N, L]; only this tower's blocks
    run on them (a 'features' video on the image stack, as the authors')."""
    stack = _own_stack(self)
    if embedded:
      return stack(layers.constrain(pixels), token_mask, train=train), token_mask
    if self.stem == "features":
      patches = pixels.astype(jnp.float32)
    else:
      patches = patchify_image(pixels, self.patch_size)  # [N, Ni, p*p*3]
    if zero is not None:
      patches = jnp.where(zero[..., None], 0.0, patches)
    dtype = self.cfg.dtype
    x = layers.dense(self.width, "patch", "embed", dtype, "stem", True, self.cfg.kernels)(
        patches.astype(dtype))
    cls = layers.LearnedEmbedding(1, self.width, name="cls")()
    pos = layers.LearnedEmbedding(x.shape[1] + 1, self.width, name="pos")()
    x = _with_cls(cls, x) + pos.astype(dtype)[None]
    x = layers.dropout(self.cfg)(x, deterministic=not train)
    key_mask = jnp.ones(x.shape[:2], bool)
    if token_mask is not None:
      key_mask = key_mask.at[:, 1:].set(token_mask)
    return stack(layers.constrain(x), key_mask, train=train, split=split), key_mask


# ------------------------------------------------------------------- video --

class VideoTower(nn.Module):
  """Temporal part of the video tower. Each frame goes through the image tower
  first (shared weights by default; see `video_frames_pixels` and ScaleModel),
  and each frame's CLS becomes a frame token; this adds a learned video [CLS]
  and frame positions and runs `layers` temporal blocks; the key mask is the
  video_mask (plus the CLS)."""
  max_frames: int
  layers: int
  width: int
  cfg: layers.StackConfig
  own_stack: bool = True  # False: return the blocks' input; the caller runs a shared stack.

  @nn.compact
  def __call__(self, frame_tokens, frame_mask, *, train: bool):
    """frame_tokens: [B, T, D] per-frame CLS; frame_mask: [B, T] bool."""
    b, t = frame_tokens.shape[:2]
    cls = layers.LearnedEmbedding(1, self.width, name="cls")()
    pos = layers.LearnedEmbedding(self.max_frames + 1, self.width, name="pos")()[:t + 1]
    dtype = self.cfg.dtype
    x = _with_cls(cls, frame_tokens.astype(dtype)) + pos.astype(dtype)[None]
    x = layers.dropout(self.cfg)(x, deterministic=not train)
    key_mask = jnp.concatenate([jnp.ones((b, 1), bool), frame_mask], axis=1)
    if not self.own_stack:
      return layers.constrain(x), key_mask
    x = _own_stack(self)(layers.constrain(x), key_mask, train=train)
    return x, key_mask


class FeatureFrames(nn.Module):
  """stem='features' video: precomputed per-second features [B, T, Dv] (e.g.
  S3D) -> frame tokens [B, T, D] by a dense stem; frames flagged in `zero`
  are zeroed first (MFM). VideoTower's temporal blocks run on them."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, zero: jax.Array | None) -> jax.Array:
    x = features.astype(jnp.float32)
    if zero is not None:
      x = jnp.where(zero[..., None], 0.0, x)
    return layers.dense(self.width, "patch", "embed", self.dtype, name="stem")(x.astype(self.dtype))


def video_frames_pixels(video: jax.Array, zero: jax.Array | None) -> jax.Array:
  """Normalised frames [B, T, H, W, 3] with the frames flagged in `zero` [B, T]
  (None: none) set to 0 (MFM: the whole frame is masked at the input)."""
  if zero is None:
    return video
  return jnp.where(zero[:, :, None, None, None], 0.0, video)


# ------------------------------------------------------------------- audio --

class AudioTower(nn.Module):
  """Log-mel [Ta, F] cut into (pt, pf) patches -> dense -> tokens; patches
  flagged in `zero` zeroed (MAM); learned [CLS] and positions; `layers` blocks.
  stem='features': precomputed audio features [B, Na, Da], one token a row."""
  audio_patch: tuple[int, int]
  layers: int
  width: int
  cfg: layers.StackConfig
  stem: str = "media"  # | 'features'

  @nn.compact
  def __call__(self, logmel, patch_mask, zero, *, train: bool):
    """logmel: [B, Ta, F] float (or features [B, Na, Da]); patch_mask, zero: [B, Na] bool."""
    if self.stem == "features":
      patches = logmel.astype(jnp.float32)
    else:
      patches = patchify_audio(logmel.astype(jnp.float32), tuple(self.audio_patch))
    if zero is not None:
      patches = jnp.where(zero[..., None], 0.0, patches)
    dtype = self.cfg.dtype
    x = layers.dense(self.width, "patch", "embed", dtype, "stem", True, self.cfg.kernels)(
        patches.astype(dtype))
    cls = layers.LearnedEmbedding(1, self.width, name="cls")()
    pos = layers.LearnedEmbedding(x.shape[1] + 1, self.width, name="pos")()
    x = _with_cls(cls, x) + pos.astype(dtype)[None]
    x = layers.dropout(self.cfg)(x, deterministic=not train)
    key_mask = jnp.concatenate([jnp.ones((x.shape[0], 1), bool), patch_mask], axis=1)
    x = _own_stack(self)(layers.constrain(x), key_mask, train=train)
    return x, key_mask
