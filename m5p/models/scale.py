"""SCALE: five unimodal towers, then a joint co-transformer (JCT) over all tokens.

    outputs = ScaleModel(config).apply(params, batch, train=False)

Outputs (B batch, D = config.model.width, P = config.model.proj_dim):
  present      [B, 5] bool    presence mask used (batch['present'])
  unimodal     [B, 5, D]      each tower's CLS output
  z            [B, 5, P]      contrastive embeddings z_m = ReLU(W_m h_m) (not normalised)
  pooled       [B, 5, D]      JCT output at each modality segment's first token
  fused        [B, D]         sum of `pooled` over present modalities (retrieval feature)
  mlm_logits   [B, Lt, V]     LM head on the JCT text tokens
  mem_logits   [B, Lp, V]     same head on the JCT table tokens
  mlm_nll      [B, Lt]        the head's cross-entropy against text_targets at the
                              positions picked for MLM (text_loss_mask, text
                              present), 0 elsewhere: what the MLM loss reads
  mem_nll      [B, Lp]        same for MEM (table_targets, table_loss_mask)
  mrm_pred     [B, Ni, p*p*3] image patches (JCT image tokens after the CLS)
  mfm_pred     [B, T, F_v]    per-frame coarse targets, F_v = towers.mfm_target_dim(config)
  mam_pred     [B, Na, pt*pf] log-mel patches
               (with a 'features' stem each predicts its input feature: width D_m,
               `masked_target_dim`)
  temperature  []             the learned contrastive temperature (only with
                              config.loss.learn_temperature)
All float32. Every output row or slice of an absent modality is exactly zero.

Missing modalities (config.model.missing):
  'mask'  (m5p): an absent modality's tokens are masked out of the JCT's keys
          and all its outputs are zeroed, so whatever its inputs hold has no
          effect on any output or loss.
  'zeros' (authors): its whole segment is attended in its tower and the
          JCT. Its own outputs are still zeroed.
In both modes an absent modality's inputs are first replaced by zeros (token
ids -> PAD 0, normalised pixels / log-mel -> 0, its masks -> False), so even
non-finite values there reach nothing, forward or backward.

Stems (config.model.stem): 'media' reads pixels / frames / log-mel;
'features' reads the precomputed features the converter stores (image
regions, per-second video and audio features), one token per row, through a
dense stem. With model.video_uses_image_stack, 'media' frames go through the
whole image tower (in the same call as the image) before the video's own
temporal blocks; a 'features' video's frame tokens (with the video [CLS] and
positions) go through the image tower's blocks instead of temporal blocks of
their own, as the authors run their S3D features.

model.scan_layers: every stack runs as one scan over stacked parameters
(layers.Encoder): faster compiles, and with model.remat a backward pass that
holds one block's activations at a time.

The JCT adds a learned modality-type embedding to each segment; the towers
already carry positions, so the JCT adds no positions of its own.

`mlm_nll` / `mem_nll` run the LM head on the picked positions only (a few
percent of them): each row's picked text and table positions are gathered
into `lm_pick_capacity(config)` slots, and a batch with a row holding more
falls back (`nn.cond`) to running the slots in chunks of that capacity, one
after another, so the values never depend on the capacity and neither branch
holds logits for every position. In a train step the full `mlm_logits` / `mem_logits`
are then unused and compiled out; they stay outputs for inspection and tests.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from m5p.data import batch_spec
from m5p.modalities import MODALITIES, NUM_MODALITIES
from m5p.models import layers, towers


class ScaleModel(nn.Module):
  config: ml_collections.ConfigDict

  def setup(self):
    c, m = self.config, self.config.model
    if m.missing not in ("mask", "zeros"):
      raise ValueError(f"config.model.missing={m.missing!r}: expected 'mask' or 'zeros'")
    self.dtype = layers.compute_dtype(m.dtype)
    d, heads, r, drop = m.width, m.heads, m.mlp_ratio, m.dropout
    remat = bool(m.get("remat", False))  # Every tower's and the JCT's blocks.
    rows = int(m.get("remat_rows", 0))
    scan = bool(m.get("scan_layers", False))

    def encoder(n):
      return towers.encoder(n, heads, r, self.dtype, drop, remat, scan, remat_rows=rows)

    self.word_embed = nn.Embed(
        c.data.vocab_size, d, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")))
    # Shared modules are attributes here, passed to the towers; an unshared
    # table stack is created unbound and adopted by the table tower.
    self.text_stack = encoder(m.text_layers)
    table_stack = self.text_stack if m.share_text_table else encoder(m.text_layers)
    self.text = towers.TextTower(self.word_embed, self.text_stack, c.data.text_len, d, self.dtype, drop)
    self.table = towers.TableTower(self.word_embed, table_stack, c.data.table_len,
                                   c.data.max_fields, d, self.dtype, drop)
    self.stems = {k: batch_spec.stem(c, k) for k in ("image", "video", "audio")}
    self.image = towers.ImageTower(m.patch_size, m.image_layers, d, heads, r, self.dtype, drop,
                                   remat, stem=self.stems["image"], scan=scan,
                                   remat_rows=rows)
    if self.stems["video"] == "features":
      self.video_frames = towers.FeatureFrames(d, self.dtype)
    elif not self._frames_share_image_tower():
      self.video_frames = towers.ImageTower(m.patch_size, m.image_layers, d, heads, r, self.dtype,
                                            drop, remat, scan=scan, remat_rows=rows)
    self.video = towers.VideoTower(c.data.max_frames, m.video_layers, d, heads, r, self.dtype, drop,
                                   remat, scan, own_stack=not self._video_runs_image_stack(),
                                   remat_rows=rows)
    self.audio = towers.AudioTower(tuple(m.audio_patch), m.audio_layers, d, heads, r, self.dtype,
                                   drop, remat, stem=self.stems["audio"], scan=scan,
                                   remat_rows=rows)
    if c.loss.get("learn_temperature", False):
      # log(1 / tau), clamped at use to tau >= loss.min_temperature (CLIP's logit scale).
      self.log_inv_temperature = self.param(
          "log_inv_temperature",
          nn.with_logical_partitioning(nn.initializers.constant(-math.log(c.loss.temperature)), ()),
          (), jnp.float32)

    # One projection per modality, in MODALITIES order (params proj_0 .. proj_4).
    self.proj = [layers.dense(m.proj_dim, "embed", "proj", jnp.float32) for _ in MODALITIES]
    self.type_embed = layers.LearnedEmbedding(NUM_MODALITIES, d)
    self.jct = encoder(m.fusion_layers)

    # Masked-task heads on the JCT tokens. The LM head (MLM and MEM) is a
    # BERT-style transform then logits tied to the word embedding + a bias.
    self.lm_dense = layers.dense(d, "embed", None, self.dtype)
    self.lm_norm = layers.layer_norm(self.dtype)
    self.lm_bias = self.param("lm_bias", layers.zeros_init(("vocab",)), (c.data.vocab_size,),
                              jnp.float32)
    self.mrm_head = layers.dense(masked_target_dim(c, "image"), "embed", "patch", self.dtype)
    self.mfm_head = layers.dense(masked_target_dim(c, "video"), "embed", "patch", self.dtype)
    self.mam_head = layers.dense(masked_target_dim(c, "audio"), "embed", "patch", self.dtype)

  def _frames_share_image_tower(self) -> bool:
    """Video frames go through the image tower: config.model.video_uses_image_stack
    with pixel stems for both (a 'features' image tower cannot read frames)."""
    return (bool(self.config.model.video_uses_image_stack)
            and self.stems["image"] == self.stems["video"] == "media")

  def _video_runs_image_stack(self) -> bool:
    """A 'features' video with config.model.video_uses_image_stack: its frame
    tokens run through the image tower's blocks instead of temporal blocks of
    their own (the authors run the video features through the image stack;
    model.video_layers is then unused)."""
    return bool(self.config.model.video_uses_image_stack) and self.stems["video"] == "features"

  # ---------------------------------------------------------------------------
  def _lm_logits(self, x: jax.Array) -> jax.Array:
    h = self.lm_norm(layers.gelu(self.lm_dense(x)))
    logits = self.word_embed.attend(h).astype(jnp.float32) + self.lm_bias
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def _lm_nll(self, x: jax.Array, targets: jax.Array, picked: jax.Array) -> jax.Array:
    """The LM head's cross-entropy [B, L] at the `picked` positions of x
    [B, L, D] against `targets` [B, L] (clipped into the vocabulary), 0
    elsewhere. Heads only the picked positions (see the module docstring)."""
    capacity = lm_pick_capacity(self.config)
    targets = jnp.clip(targets, 0, self.config.data.vocab_size - 1)
    if capacity >= x.shape[1]:
      return _dense_lm_nll(self, x, targets, picked)
    fits = jnp.max(jnp.sum(picked, axis=1)) <= capacity
    return nn.cond(fits, functools.partial(_picked_lm_nll, capacity=capacity),
                   functools.partial(_chunked_lm_nll, capacity=capacity), self, x, targets, picked)

  def __call__(self, batch: dict, *, train: bool) -> dict:
    m = self.config.model
    zeros_mode = m.missing == "zeros"
    present = jnp.asarray(batch["present"], bool)
    pres = [present[:, i] for i in range(NUM_MODALITIES)]

    def fill(x, i):
      """An absent modality's input replaced by zeros (both modes). In 'mask'
      mode this changes no output (those tokens are masked and their outputs
      zeroed); it guarantees that even non-finite garbage in an absent
      modality's fields cannot reach any value or gradient (0 * NaN)."""
      x = jnp.asarray(x)
      return jnp.where(pres[i].reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))

    def tower_mask(mask, i):
      """Absent: all False ('mask'), all True ('zeros': the authors attend it)."""
      return jnp.where(pres[i][:, None], jnp.asarray(mask, bool), zeros_mode)

    # Text and table (one shared stack by default, called on each: running both
    # in one call would pad the text to the table's length, which costs more
    # step time than the second compiled copy of the stack costs compile time).
    text_args = (fill(batch["text_ids"], 0), tower_mask(batch["text_mask"], 0))
    table_args = (fill(batch["table_ids"], 1), tower_mask(batch["table_mask"], 1),
                  fill(batch["table_segment"], 1), fill(batch["table_field"], 1))
    text_tokens, text_km = self.text(*text_args, train=train)
    table_tokens, table_km = self.table(*table_args, train=train)

    # Image and video frames: each frame through the image tower (shared by
    # default, then in the same call as the image: [B, 1 + T] images).
    image_zero = fill(jnp.asarray(batch["image_zero"], bool), 2)  # [B, Ni]
    video_zero = fill(jnp.asarray(batch["video_zero"], bool), 3)  # [B, T]
    if self.stems["image"] == "features":
      image = fill(jnp.asarray(batch["image"], jnp.float32), 2)  # [B, Ni, Di]
    else:
      image = fill(towers.normalize_pixels(batch["image"]), 2)  # [B, H, W, 3]
    if self.stems["video"] == "features":
      frame_tokens = self.video_frames(fill(jnp.asarray(batch["video"], jnp.float32), 3), video_zero)
    else:
      frames = towers.video_frames_pixels(fill(towers.normalize_pixels(batch["video"]), 3), video_zero)
      b, t = frames.shape[:2]
    # Of a frame, only the [CLS] output is used: the stack's last block
    # computes only that query for the frames (`split`).
    if self.stems["video"] == "media" and self._frames_share_image_tower():
      pixels = jnp.concatenate([image[:, None], frames], axis=1)  # [B, 1 + T, H, W, 3]
      zero = jnp.concatenate(
          [image_zero[:, None], jnp.zeros((b, t, image_zero.shape[1]), bool)], axis=1)
      (image_tokens, frame_tokens), _ = self.image(
          pixels.reshape(b * (1 + t), *pixels.shape[2:]), zero.reshape(b * (1 + t), -1),
          train=train, split=(1 + t, 1))
      image_tokens = image_tokens[:, 0]
      image_km = jnp.ones(image_tokens.shape[:2], bool)
    else:
      if self.stems["image"] == "features":
        image_tokens, image_km = self.image(image, image_zero, train=train,
                                            token_mask=tower_mask(batch["image_mask"], 2))
      else:
        image_tokens, _ = self.image(image, image_zero, train=train)
        image_km = jnp.ones(image_tokens.shape[:2], bool)
      if self.stems["video"] == "media":
        (_, frame_tokens), _ = self.video_frames(frames.reshape(b * t, *frames.shape[2:]), None,
                                                 train=train, split=(t, 0))
    video_tokens, video_km = self.video(frame_tokens, tower_mask(batch["video_mask"], 3),
                                        train=train)
    if self._video_runs_image_stack():
      video_tokens, _ = self.image(video_tokens, None, train=train, token_mask=video_km,
                                   embedded=True)
    audio = fill(jnp.asarray(batch["audio"], jnp.float32), 4)
    audio_tokens, audio_km = self.audio(
        audio, tower_mask(batch["audio_mask"], 4), fill(jnp.asarray(batch["audio_zero"], bool), 4),
        train=train)

    tokens = [text_tokens, table_tokens, image_tokens, video_tokens, audio_tokens]
    key_masks = [text_km, table_km, image_km, video_km, audio_km]
    lengths = [tok.shape[1] for tok in tokens]
    starts = [sum(lengths[:i]) for i in range(NUM_MODALITIES)]

    def keep(y, i):
      """y (per-sample, batch-leading) where modality i is present, else exactly 0."""
      return jnp.where(pres[i].reshape((-1,) + (1,) * (y.ndim - 1)), y.astype(jnp.float32), 0.0)

    unimodal = jnp.stack([keep(tok[:, 0], i) for i, tok in enumerate(tokens)], axis=1)
    z = jnp.stack([keep(nn.relu(self.proj[i](unimodal[:, i])), i) for i in range(NUM_MODALITIES)],
                  axis=1)

    # Joint co-transformer over text | table | image | video | audio.
    type_emb = self.type_embed().astype(self.dtype)
    x = jnp.concatenate([tok.astype(self.dtype) + type_emb[i] for i, tok in enumerate(tokens)],
                        axis=1)
    if zeros_mode:
      jct_mask = jnp.concatenate(key_masks, axis=1)
    else:
      jct_mask = jnp.concatenate([km & pres[i][:, None] for i, km in enumerate(key_masks)], axis=1)
    x = self.jct(layers.constrain(x), jct_mask, train=train)
    segs = [x[:, s:s + n] for s, n in zip(starts, lengths)]

    pooled = jnp.stack([keep(seg[:, 0], i) for i, seg in enumerate(segs)], axis=1)
    lm_x = x[:, :lengths[0] + lengths[1]]  # Text and table segments.
    lm_logits = self._lm_logits(lm_x)
    lm_picked = jnp.concatenate(
        [jnp.asarray(batch["text_loss_mask"], bool) & pres[0][:, None],
         jnp.asarray(batch["table_loss_mask"], bool) & pres[1][:, None]], axis=1)
    lm_targets = jnp.concatenate([jnp.asarray(batch["text_targets"], jnp.int32),
                                  jnp.asarray(batch["table_targets"], jnp.int32)], axis=1)
    lm_nll = self._lm_nll(lm_x, lm_targets, lm_picked)

    extra = {}
    if self.config.loss.get("learn_temperature", False):
      floor = float(self.config.loss.get("min_temperature", 0.01))
      extra["temperature"] = jnp.exp(-jnp.minimum(self.log_inv_temperature, -math.log(floor)))
    return {
        **extra,
        "present": present,
        "unimodal": unimodal,
        "z": z,
        "pooled": pooled,
        "fused": pooled.sum(axis=1),
        "mlm_logits": keep(lm_logits[:, :lengths[0]], 0),
        "mem_logits": keep(lm_logits[:, lengths[0]:], 1),
        "mlm_nll": lm_nll[:, :lengths[0]],
        "mem_nll": lm_nll[:, lengths[0]:],
        "mrm_pred": keep(self.mrm_head(segs[2][:, 1:]), 2),
        "mfm_pred": keep(self.mfm_head(segs[3][:, 1:]), 3),
        "mam_pred": keep(self.mam_head(segs[4][:, 1:]), 4),
    }


def masked_target_dim(config: ml_collections.ConfigDict, modality: str) -> int:
  """Width of the MRM / MFM / MAM prediction: a 'features' stem regresses its
  input features; media stems their pixel patch, pooled frame grid, log-mel patch."""
  if batch_spec.stem(config, modality) == "features":
    return batch_spec.feature_shape(config, modality)[1]
  m = config.model
  if modality == "image":
    return m.patch_size * m.patch_size * 3
  if modality == "video":
    return towers.mfm_target_dim(config)
  pt, pf = m.audio_patch
  return pt * pf


def lm_pick_capacity(config: ml_collections.ConfigDict) -> int:
  """Slots per row for the picked text + table positions the LM head runs on:
  1.5x the expected picks of a full-length row plus 4, at most every position.
  Only speed depends on it (rows holding more fall back to every position)."""
  length = config.data.text_len + config.data.table_len
  return min(length, math.ceil(1.5 * config.loss.mask_prob * length) + 4)


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logsumexp(logits) - logits[target]: logits [..., V] float32, targets [...] in range."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _dense_lm_nll(model: ScaleModel, x, targets, picked):
  """The LM head on every position."""
  return jnp.where(picked, _token_nll(model._lm_logits(x), targets), 0.0)


def _picked_lm_nll(model: ScaleModel, x, targets, picked, *, capacity: int, offset=0):
  """The LM head on each row's picked positions number `offset` to `offset +
  capacity - 1` (counting from 0 in position order; all of them when the
  caller has checked the counts), 0 elsewhere. Slot c of row b holds the
  row's (offset + c)-th picked position; gathering and scattering are one-hot
  products (exact, and batch-parallel under any batch sharding)."""
  slot = jnp.cumsum(picked, axis=1) - 1 - offset  # [B, L]: the slot of each picked position.
  onehot = picked[:, None, :] & (slot[:, None, :] == jnp.arange(capacity)[None, :, None])  # [B, C, L]
  x_slots = jnp.einsum("bcl,bld->bcd", onehot.astype(x.dtype), x)
  t_slots = jnp.sum(jnp.where(onehot, targets[:, None, :], 0), axis=-1)
  nll = _token_nll(model._lm_logits(x_slots), t_slots)  # [B, C]; unused slots are masked below.
  return jnp.sum(jnp.where(onehot, nll[:, :, None], 0.0), axis=1)


def _chunked_lm_nll(model: ScaleModel, x, targets, picked, *, capacity: int):
  """`_picked_lm_nll` for rows with any number of picks: the slots in
  ceil(L / capacity) chunks of `capacity`, one at a time (a scan of
  rematerialised chunks), so the fallback holds one chunk's [B, capacity, V]
  logits, not the [B, L, V] of the head on every position (at
  configs/scale_authors.py's batch 64 those were 0.5 GiB apiece, and set the
  compiled step's peak memory). Under autodiff the cond around it then
  carries only this branch's inputs as residuals."""
  def chunk(mdl, total, offset, x, targets, picked):
    return total + _picked_lm_nll(mdl, x, targets, picked, capacity=capacity, offset=offset), None

  scan = nn.scan(nn.remat(chunk), variable_broadcast="params", split_rngs={"params": False},
                 in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast))
  offsets = jnp.arange(0, picked.shape[1], capacity, dtype=jnp.int32)
  total, _ = scan(model, jnp.zeros(picked.shape, jnp.float32), offsets, x, targets, picked)
  return total


def init_batch(config: ml_collections.ConfigDict, batch_size: int = 2) -> dict:
  """Zero arrays with the batch layout, for `model.init` / `jax.eval_shape`."""
  return {k: jnp.zeros(shape, dtype) for k, (shape, dtype)
          in batch_spec.batch_shapes(config, batch_size).items()}
