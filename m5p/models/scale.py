"""SCALE: five unimodal towers, then a joint co-transformer (JCT) over all tokens.

    outputs = ScaleModel(config).apply(params, batch, train=False)

Outputs (B batch, D = config.model.width, P = config.model.proj_dim):
  present      [B, 5] bool    presence mask used (batch['present'])
  unimodal     [B, 5, D]      each tower's CLS output
  z            [B, 5, P]      contrastive embeddings z_m = ReLU(W_m h_m) (not normalised)
  pooled       [B, 5, D]      JCT output at each modality segment's first token
  fused        [B, D]         sum of `pooled` over present modalities (retrieval feature)
  text_hidden  [B, Lt, D]     the JCT's text tokens (hidden states)
  table_hidden [B, Lp, D]     the JCT's table tokens
  lm_logits    [B, Pt + Pp, V]  the LM head at the batch's MLM picks
                              (`text_lm_positions`), then at its MEM picks
                              (`table_lm_positions`); only when the batch has them
  mrm_pred     [B, Ni, p*p*3] image patches (JCT image tokens after the CLS)
  mfm_pred     [B, T, F_v]    per-frame coarse targets, F_v = towers.mfm_target_dim(config)
  mam_pred     [B, Na, pt*pf] log-mel patches
               (with a 'features' stem each predicts its input feature: width D_m,
               `masked_target_dim`)
  temperature  []             the learned contrastive temperature (only with
                              config.loss.learn_temperature)
All float32. Every output row or slice of an absent modality is exactly zero
(its LM slots read zero tokens: their logits are the head's constant, and the
loss weighs them 0).

The model computes no loss: m5p.losses reads these outputs and the batch's
targets (`*_lm_ids`, `*_lm_weights`, the MRM/MFM/MAM targets). The training
fields (`*_lm_*` picks, `*_zero` input masking) are optional: without them
(evaluation, serving) nothing is masked and no LM logits are computed.

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

The LM head (MLM and MEM) runs only at the picked positions, gathered from
the JCT's text and table tokens: BERT's masked_lm_positions. The pipeline
gives each sequence a fixed number of pick slots (config.loss.max_predictions),
so every shape is static.
"""
from __future__ import annotations

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
    cfg = layers.StackConfig.from_config(c)  # Every tower's and the JCT's blocks.
    self.dtype = cfg.dtype
    d = m.width

    self.word_embed = nn.Embed(
        c.data.vocab_size, d, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")))
    # Shared modules are attributes here, passed to the towers; an unshared
    # table stack is created unbound and adopted by the table tower.
    self.text_stack = layers.Encoder(m.text_layers, cfg)
    table_stack = self.text_stack if m.share_text_table else layers.Encoder(m.text_layers, cfg)
    self.text = towers.TextTower(self.word_embed, self.text_stack, c.data.text_len, d, cfg)
    self.table = towers.TableTower(self.word_embed, table_stack, c.data.table_len,
                                   c.data.max_fields, d, cfg)
    self.stems = {k: batch_spec.stem(c, k) for k in ("image", "video", "audio")}
    self.image = towers.ImageTower(m.patch_size, m.image_layers, d, cfg, stem=self.stems["image"])
    if self.stems["video"] == "features":
      self.video_frames = towers.FeatureFrames(d, self.dtype)
    elif not self._frames_share_image_tower():
      self.video_frames = towers.ImageTower(m.patch_size, m.image_layers, d, cfg)
    self.video = towers.VideoTower(c.data.max_frames, m.video_layers, d, cfg,
                                   own_stack=not self._video_runs_image_stack())
    self.audio = towers.AudioTower(tuple(m.audio_patch), m.audio_layers, d, cfg,
                                   stem=self.stems["audio"])
    if c.loss.get("learn_temperature", False):
      # log(1 / tau), clamped at use to tau >= loss.min_temperature (CLIP's logit scale).
      self.log_inv_temperature = self.param(
          "log_inv_temperature",
          nn.with_logical_partitioning(nn.initializers.constant(-math.log(c.loss.temperature)), ()),
          (), jnp.float32)

    # One projection per modality, in MODALITIES order (params proj_0 .. proj_4).
    self.proj = [layers.dense(m.proj_dim, "embed", "proj", jnp.float32) for _ in MODALITIES]
    self.type_embed = layers.LearnedEmbedding(NUM_MODALITIES, d)
    self.jct = layers.Encoder(m.fusion_layers, cfg)

    # Masked-task heads on the JCT tokens. The LM head (MLM and MEM) is a
    # BERT-style transform then logits tied to the word embedding + a bias.
    self.cfg = cfg
    self.lm_dense = layers.dense(d, "embed", None, self.dtype, kernels_name=cfg.kernels)
    self.lm_norm = layers.layer_norm(cfg)
    self.lm_bias = self.param("lm_bias", layers.zeros_init(("vocab",)), (c.data.vocab_size,),
                              jnp.float32)
    self.mrm_head = layers.dense(masked_target_dim(c, "image"), "embed", "patch", self.dtype,
                                 kernels_name=cfg.kernels)
    self.mfm_head = layers.dense(masked_target_dim(c, "video"), "embed", "patch", self.dtype,
                                 kernels_name=cfg.kernels)
    self.mam_head = layers.dense(masked_target_dim(c, "audio"), "embed", "patch", self.dtype,
                                 kernels_name=cfg.kernels)

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
    """The LM head's logits [B, P, V] of the picked tokens x [B, P, D]."""
    h = self.lm_norm(layers.gelu(self.cfg, self.lm_dense(x)))
    logits = self.word_embed.attend(h).astype(jnp.float32) + self.lm_bias
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

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

    def zeroed(name, i):
      """A training-only input mask (MRM/MFM/MAM tokens zeroed), None when absent."""
      return fill(jnp.asarray(batch[name], bool), i) if name in batch else None

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
    image_zero, video_zero = zeroed("image_zero", 2), zeroed("video_zero", 3)  # [B, Ni], [B, T]
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
      zero = None
      if image_zero is not None:
        zero = jnp.concatenate(
            [image_zero[:, None], jnp.zeros((b, t, image_zero.shape[1]), bool)], axis=1)
        zero = zero.reshape(b * (1 + t), -1)
      (image_tokens, frame_tokens), _ = self.image(
          pixels.reshape(b * (1 + t), *pixels.shape[2:]), zero, train=train, split=(1 + t, 1))
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
    audio_tokens, audio_km = self.audio(audio, tower_mask(batch["audio_mask"], 4),
                                        zeroed("audio_zero", 4), train=train)

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
    extra = {}
    if "text_lm_positions" in batch:  # Training: the LM head at the MLM and MEM picks, one call.
      picks = [keep(jnp.take_along_axis(segs[i], jnp.asarray(
          batch[f"{name}_lm_positions"], jnp.int32)[..., None], axis=1), i).astype(self.dtype)
               for i, name in enumerate(batch_spec.LM_SEQUENCES)]
      extra["lm_logits"] = self._lm_logits(jnp.concatenate(picks, axis=1))
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
        "text_hidden": keep(segs[0], 0),
        "table_hidden": keep(segs[1], 1),
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


def init_batch(config: ml_collections.ConfigDict, batch_size: int = 2) -> dict:
  """Zero arrays with the batch layout, for `model.init` / `jax.eval_shape`."""
  return {k: jnp.zeros(shape, dtype) for k, (shape, dtype)
          in batch_spec.batch_shapes(config, batch_size).items()}
