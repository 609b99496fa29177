"""One converted record -> one fixed-shape training example (see batch_spec.py).

Decoding of the stored JPEGs happens in the TFDS data source; here strings
are tokenized, media are stacked and padded, and the masked-task masks drawn.
Modalities outside `data.modalities` are always absent. A modality with a
'features' stem (config.model.stem) reads the record's precomputed
`<modality>_feature` array instead of its media. Training
examples then lose each present modality with its `data.modality_dropout`
rate (never the last one), drawn from the example's own rng.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from m5p.data import batch_spec, masking, schema
from m5p.data.tokenizer import CLS_ID, Tokenizer
from m5p.modalities import INDEX, MODALITIES


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)


class Preprocessor:
  """Callable `(record, rng) -> example`; picklable (the tokenizer loads lazily)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer_path: str, *, train: bool):
    self.d = config.data
    self.patch = config.model.patch_size
    self.audio_patch = tuple(config.model.audio_patch)
    self.audio_grid = batch_spec.audio_grid(config)
    self.num_image_patches = batch_spec.num_image_patches(config)
    self.stems = {m: batch_spec.stem(config, m) for m in ("image", "video", "audio")}
    self.feature_shapes = {m: batch_spec.feature_shape(config, m) for m in self.stems
                           if self.stems[m] == "features"}
    self.mask_prob = float(config.loss.mask_prob) if train else 0.0
    self.lm_slots = {s: batch_spec.max_predictions(config, s) for s in batch_spec.LM_SEQUENCES}
    used = tuple(config.data.get("modalities", MODALITIES))
    unknown = sorted(set(used) - set(MODALITIES))
    if unknown or not used:
      raise ValueError(f"config.data.modalities={used}: expected a non-empty subset of {MODALITIES}")
    self.used = np.array([m in used for m in MODALITIES])
    rates = config.data.get("modality_dropout", None)
    self.dropout_rates = np.array([float(rates.get(m, 0.0)) if rates is not None and train else 0.0
                                   for m in MODALITIES])
    if np.any((self.dropout_rates < 0) | (self.dropout_rates >= 1)):
      raise ValueError(f"config.data.modality_dropout={rates}: rates must be in [0, 1)")
    self.tokenizer_path = tokenizer_path
    self._tokenizer: Tokenizer | None = None

  @property
  def tokenizer(self) -> Tokenizer:
    if self._tokenizer is None:
      self._tokenizer = Tokenizer(self.tokenizer_path)
    return self._tokenizer

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tokenizer"] = None
    return state

  def __call__(self, indexed_record: tuple[int, dict], rng: np.random.Generator) -> dict:
    index, record = indexed_record
    ex: dict[str, np.ndarray] = {}
    present = np.zeros(5, bool)
    present[INDEX["text"]] = self._text(record, rng, ex)
    present[INDEX["table"]] = self._table(record, rng, ex)
    for m in ("image", "video", "audio"):
      if self.stems[m] == "features":
        present[INDEX[m]] = self._features(m, record, rng, ex)
      else:
        present[INDEX[m]] = getattr(self, f"_{m}")(record, rng, ex)
    present &= self.used  # config.data.modalities: the others are never read.
    if self.dropout_rates.any():
      present = self._drop_modalities(present, rng)
    ex["present"] = present
    ex["label"] = np.int32(record["label"])
    ex["fine_group"] = np.int32(record["fine_group_id"])
    ex["index"] = np.int32(index)
    return ex

  def _drop_modalities(self, present: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Modality dropout: each present modality made absent with its rate, the
    last one kept (one picked at random among those present). Only `present`
    changes: the model zeroes an absent modality's inputs and the losses
    skip it, so nothing else needs clearing."""
    drop = present & (rng.random(len(present)) < self.dropout_rates)
    kept = present & ~drop
    if present.any() and not kept.any():
      kept[rng.choice(np.flatnonzero(present))] = True
    return kept

  # --- text and table ---------------------------------------------------
  def _text(self, record: dict, rng: np.random.Generator, ex: dict) -> bool:
    length = self.d.text_len
    tokens = self.tokenizer.encode(_text(record["title"]).strip())[: length - 1]
    ids = np.zeros(length, np.int32)
    ids[0] = CLS_ID
    ids[1: 1 + len(tokens)] = tokens
    valid = np.arange(length) < 1 + len(tokens)
    masked, picked = masking.mlm(ids, valid, rng, self.mask_prob, self.d.vocab_size)
    present = bool(tokens)
    ex["text_ids"] = self._lm_fields("text", masked, ids, picked & present, rng, ex)
    ex["text_mask"] = valid & present
    return present

  def _lm_fields(self, sequence: str, masked: np.ndarray, ids: np.ndarray, picked: np.ndarray,
                 rng: np.random.Generator, ex: dict) -> np.ndarray:
    """Caps the picks at the sequence's slots, writes its `<sequence>_lm_*`
    fields into `ex` and returns the masked input ids."""
    slots = self.lm_slots[sequence]
    masked, picked, dropped = masking.cap_picks(masked, ids, picked, slots, rng)
    positions, lm_ids, weights, _ = batch_spec.lm_slots(picked, ids, slots)
    ex[f"{sequence}_lm_positions"] = positions
    ex[f"{sequence}_lm_ids"] = lm_ids
    ex[f"{sequence}_lm_weights"] = weights
    ex[f"{sequence}_lm_dropped"] = np.int32(dropped)
    return masked

  def _table(self, record: dict, rng: np.random.Generator, ex: dict) -> bool:
    length, max_fields = self.d.table_len, self.d.max_fields
    ids, segment, field = [CLS_ID], [0], [0]
    num_fields = 0
    for f, (key, value) in enumerate(zip(record["table_keys"], record["table_values"])):
      if len(ids) >= length:
        break
      f = min(f, max_fields - 1)
      for seg, text in ((1, key), (2, value)):
        toks = self.tokenizer.encode(_text(text).strip())
        ids += toks
        segment += [seg] * len(toks)
        field += [f] * len(toks)
      num_fields = f + 1
    ids, segment, field = (np.asarray(x[:length], np.int32) for x in (ids, segment, field))
    pad = length - len(ids)
    ids, segment, field = (np.pad(x, (0, pad)) for x in (ids, segment, field))
    valid = np.arange(length) < length - pad
    masked, picked = masking.mem(ids, segment, field, num_fields, rng, self.mask_prob)
    present = num_fields > 0 and bool((segment > 0).any())
    ex["table_ids"] = self._lm_fields("table", masked, ids, picked & present, rng, ex)
    ex["table_mask"] = valid & present
    ex["table_segment"] = segment
    ex["table_field"] = field
    return present

  # --- media ------------------------------------------------------------
  def _resized(self, image: np.ndarray) -> np.ndarray:
    s = self.d.image_size
    if image.shape[:2] == (s, s):
      return image
    return np.asarray(Image.fromarray(image).resize((s, s), Image.BILINEAR))

  def _image(self, record: dict, rng: np.random.Generator, ex: dict) -> bool:
    s = self.d.image_size
    images = record["image"]
    present = len(images) > 0
    ex["image"] = self._resized(np.asarray(images[0])) if present else np.zeros((s, s, 3), np.uint8)
    valid = np.full(self.num_image_patches, present)
    ex["image_mask"] = valid
    ex["image_zero"], ex["image_loss_mask"] = masking.zero_tokens(valid, rng, self.mask_prob)
    return present

  def _video(self, record: dict, rng: np.random.Generator, ex: dict) -> bool:
    s, t = self.d.image_size, self.d.max_frames
    frames = [self._resized(np.asarray(f)) for f in list(record["video"])[:t]]
    video = np.zeros((t, s, s, 3), np.uint8)
    if frames:
      video[: len(frames)] = np.stack(frames)
    valid = np.arange(t) < len(frames)
    ex["video"] = video
    ex["video_mask"] = valid
    ex["video_zero"], ex["video_loss_mask"] = masking.zero_tokens(valid, rng, self.mask_prob)
    return bool(frames)

  def _audio(self, record: dict, rng: np.random.Generator, ex: dict) -> bool:
    frames, n_mels = self.d.audio_frames, self.d.n_mels
    mel = np.asarray(record["audio"], np.float32)[:frames]
    audio = np.zeros((frames, n_mels), np.float32)
    present = mel.shape[0] > 0 and mel.shape[1] == n_mels
    if present:
      mean, std = mel.mean(), mel.std() + 1e-5  # Per-clip standardisation.
      audio[: mel.shape[0]] = (mel - mean) / std
    gt, gf = self.audio_grid
    t_valid = np.arange(gt) * self.audio_patch[0] < (mel.shape[0] if present else 0)
    valid = np.repeat(t_valid, gf)  # Patches ordered time-major, then mel.
    ex["audio"] = audio
    ex["audio_mask"] = valid
    ex["audio_zero"], ex["audio_loss_mask"] = masking.zero_tokens(valid, rng, self.mask_prob)
    return present

  def _features(self, modality: str, record: dict, rng: np.random.Generator, ex: dict) -> bool:
    """A 'features' stem's input: the record's [N, D] feature cut or zero-padded
    to `config.data.features[modality]` rows; present when it has any row."""
    tokens, dim = self.feature_shapes[modality]
    name = f"{modality}_feature"
    feat = schema.feature_array(record, name) if name in record else np.zeros((0, 0), np.float16)
    n = min(feat.shape[0], tokens)
    if n and feat.shape[1] != dim:
      raise ValueError(f"item {_text(record.get('item_id', '?'))}: {name} has dimension "
                       f"{feat.shape[1]}, but config.data.features.{modality} expects {dim}; set "
                       f"--config.data.features.{modality}='({tokens}, {feat.shape[1]})'")
    out = np.zeros((tokens, dim), np.float32)
    if n:
      out[:n] = feat[:n]
    valid = np.arange(tokens) < n
    ex[modality] = out
    ex[f"{modality}_mask"] = valid
    ex[f"{modality}_zero"], ex[f"{modality}_loss_mask"] = masking.zero_tokens(
        valid, rng, self.mask_prob)
    return n > 0
