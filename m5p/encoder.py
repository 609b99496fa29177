"""Embeds raw products with an exported model, preprocessed exactly as in training.

    enc = m5p.Encoder.from_export("/path/to/export")
    out = enc.embed([{"title": "...", "pv": "color#:#red#;#size#:#M", "image": "item.jpg"},
                     {"image": open("other.png", "rb").read()}])
    out["fused"]  # [2, D]; out["z"] [2, 5, P]; out["present"] [2, 5]

A product is a dict with any subset of `title` (str), `pv` (the raw table
string 'k#:#v#;#...', or a {key: value} dict), `image`, `video`, `audio`
(a file path or the file's bytes) and, for an export whose stem of that
modality is 'features' (config.model.stem, e.g. configs/scale_authors.py),
`image_feature`, `video_feature`, `audio_feature` (a .npy path, its bytes, or
a numeric [N, D] array, as the release's precomputed features) instead of the
media. A missing or undecodable modality is absent (`faults` says why for a
file that failed); an input the export's stem would not read (media for a
'features' stem, features for a 'media' stem) is refused with a ValueError.

Why the detour through records: training reads records the converter wrote
(media decoded, cropped, resized and re-encoded to JPEG at the manifest's
settings, log-mel as float16, TFDS-serialized), then `Preprocessor`. The
encoder makes the same record with the same functions (raw_layout.parse_item,
media.decode_item_media, the schema's TFDS features) and decodes it the way
the data source does, so a product gives the embedding its converted record
gives, pixel for pixel.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Mapping

import numpy as np

MEDIA_KEYS = ("image", "video", "audio")
FEATURE_KEYS = ("image_feature", "video_feature", "audio_feature")  # Precomputed, as released.
PRODUCT_KEYS = ("title", "pv") + MEDIA_KEYS + FEATURE_KEYS


class Encoder:
  """Raw products -> {fused, pooled, z, present} with an export's params.

  Batches are padded to `batch_size` rows so one compiled function serves
  every call. Runs on `mesh` (default: one device).
  """

  def __init__(self, config, params: Any, export_dir: str, *, mesh=None, batch_size: int = 8):
    import jax
    from m5p import sharding
    from m5p.data.preprocess import Preprocessor
    from m5p.evaluation import embed as embed_lib
    from m5p.export import MANIFEST_FILE, TOKENIZER_FILE, abstract_params
    from m5p.models.scale import ScaleModel

    self.config = config
    with open(os.path.join(export_dir, MANIFEST_FILE), encoding="utf-8") as f:
      self.conversion = json.load(f)["conversion"]
    self.mesh = mesh if mesh is not None else _one_device_mesh()
    shards = sharding.num_batch_shards(self.mesh)
    self.batch_size = -(-batch_size // shards) * shards
    self.params = params
    shardings = jax.tree.map(lambda s: s.sharding, abstract_params(config, self.mesh))
    self._embed_fn = embed_lib.make_embed_fn(ScaleModel(config), self.mesh, shardings)
    self.preprocessor = Preprocessor(config, os.path.join(export_dir, TOKENIZER_FILE), train=False)
    self._features = None

  @classmethod
  def from_export(cls, export_dir: str, *, mesh=None, batch_size: int = 8) -> "Encoder":
    """Loads `export_dir` (written by `python -m m5p.export`) onto `mesh` (default one device)."""
    from m5p.export import load_params
    mesh = mesh if mesh is not None else _one_device_mesh()
    params, config = load_params(export_dir, mesh)
    return cls(config, params, export_dir, mesh=mesh, batch_size=batch_size)

  # --- raw product -> record -> example ---------------------------------------
  @property
  def features(self):
    if self._features is None:
      from m5p.data import schema
      self._features = schema.features(int(self.conversion["n_mels"]))
    return self._features

  def record(self, product: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """(the record the converter would store for `product`, as the data source
    reads it back; faults like 'image:undecodable')."""
    from m5p.data import media, raw_layout, schema
    unknown = set(product) - set(PRODUCT_KEYS)
    if unknown:
      raise ValueError(f"unknown product fields {sorted(unknown)}; expected {PRODUCT_KEYS}")
    self._check_inputs_match_stems(product)
    entry = {"title": product.get("title"), "pv": product.get("pv")}
    item = raw_layout.parse_item("product", entry)  # The id only names faults; never a path.
    c = self.conversion
    with tempfile.TemporaryDirectory(prefix="m5p_encoder_") as tmp:
      paths = {}
      for key in MEDIA_KEYS + FEATURE_KEYS:
        value = product.get(key)
        if value is None:
          continue
        if isinstance(value, (bytes, bytearray, memoryview)):
          paths[key] = os.path.join(tmp, key)
          with open(paths[key], "wb") as f:
            f.write(bytes(value))
        elif key in FEATURE_KEYS and not isinstance(value, (str, os.PathLike)):  # An array.
          paths[key] = os.path.join(tmp, key + ".npy")
          np.save(paths[key], _feature_array(key, value), allow_pickle=False)
        else:
          paths[key] = os.fspath(value)
      m = media.decode_item_media(paths, int(c["image_size"]), int(c["max_frames"]),
                                  int(c["n_mels"]), float(c["max_audio_seconds"]))
    faults = item.faults + m.faults
    example = schema.example(item, m, faults=faults)
    record = self.features.deserialize_example_np(self.features.serialize_example(example))
    return record, faults

  def _check_inputs_match_stems(self, product: Mapping[str, Any]) -> None:
    """Refuses a modality given in the form its stem does not read (it would
    silently be absent)."""
    for media_key, feature_key in zip(MEDIA_KEYS, FEATURE_KEYS):
      features = self.config.model.stem[media_key] == "features"
      given, wanted = (media_key, feature_key) if features else (feature_key, media_key)
      if product.get(given) is not None:
        raise ValueError(
            f"product field {given!r}: this export's {media_key} stem reads "
            f"{'precomputed features' if features else 'media files'} "
            f"(config.model.stem.{media_key}={self.config.model.stem[media_key]!r}); give {wanted!r}")

  def preprocess(self, products: Iterable[Mapping[str, Any]]) -> tuple[dict, list[list[str]]]:
    """(a host batch of the products, unpadded; each product's faults)."""
    from m5p.data import batch_spec
    examples, faults = [], []
    for i, product in enumerate(products):
      record, f = self.record(product)
      examples.append(self.preprocessor((i, record), np.random.default_rng(0)))
      faults.append(f)
    if not examples:
      shapes = batch_spec.batch_shapes(self.config, 0)
      return {k: np.zeros(s, d) for k, (s, d) in shapes.items()}, []
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}, faults

  # --- embedding ------------------------------------------------------------------
  def embed_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Embeds a preprocessed host batch of any size (padded to `batch_size` chunks)."""
    import jax
    from flax import linen as nn
    from m5p import sharding
    n = len(batch["present"])
    chunks: dict[str, list] = {}
    batch_shard = sharding.batch_sharding(self.mesh)
    for start in range(0, n, self.batch_size):
      part = {k: np.asarray(v)[start:start + self.batch_size] for k, v in batch.items()}
      pad = self.batch_size - len(part["present"])
      part = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in part.items()}
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.rules(self.config)):
        device = {k: jax.device_put(v, batch_shard) for k, v in part.items()}
        out = self._embed_fn(self.params, device)
      for k, v in jax.device_get(out).items():
        chunks.setdefault(k, []).append(np.asarray(v)[:self.batch_size - pad])
    if not chunks:
      return {"fused": np.zeros((0, self.config.model.width), np.float32),
              "pooled": np.zeros((0, 5, self.config.model.width), np.float32),
              "z": np.zeros((0, 5, self.config.model.proj_dim), np.float32),
              "present": np.zeros((0, 5), bool)}
    return {k: np.concatenate(v) for k, v in chunks.items()}

  def embed(self, products: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """{'fused' [N, D], 'pooled' [N, 5, D], 'z' [N, 5, P], 'present' [N, 5] (numpy),
    'faults': per product, the media that failed to decode ('image:truncated', ...)}."""
    batch, faults = self.preprocess(list(products))
    out = self.embed_batch(batch)
    out["faults"] = faults
    return out


def _feature_array(key: str, value: Any) -> np.ndarray:
  """A precomputed feature given as an array: numeric, 1-D (one row) or 2-D."""
  array = np.asarray(value)
  if array.dtype.kind not in "fiu" or array.ndim not in (1, 2) or array.size == 0:
    raise ValueError(f"product field {key!r}: expected a non-empty numeric [N, D] array, got "
                     f"{array.dtype} {list(array.shape)}")
  return array


def _one_device_mesh():
  import ml_collections
  from m5p import sharding
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1, num_devices=1)))
