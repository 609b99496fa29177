"""The record schema: what one converted product looks like on disk.

Records are written by `m5p.data.shards` as ArrayRecord in TFDS's layout;
TFDS's `features.json` makes them self-describing and no record is ever
pickled. Media are stored decoded-and-resized-then-re-encoded (JPEG
images and frames at the training resolution) or as arrays (log-mel), so the
input pipeline only decodes small JPEGs. A modality is absent when its field
is empty; `faults` says why for damaged inputs.

Precomputed features (`image_feature/<id>.npy` ... in the raw layout) are
stored flat as float16 with their [N, D] shape beside them (TFDS's numpy
decoder handles one dynamic dimension only); `flat_feature` and
`feature_array` convert.

Bump `RECORD_VERSION` for any change here.
"""
import functools

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

RECORD_VERSION = "1.1.0"  # 1.1.0: precomputed features, id-list membership.

# Audio front end (authors' code: 16 kHz mono, n_fft 1024, hop 256, 80 mels, 12 s).
AUDIO_SAMPLE_RATE = 16000
AUDIO_N_FFT = 1024
AUDIO_HOP = 256

FEATURES = ("image_feature", "video_feature", "audio_feature")  # Precomputed, as released.


def features(n_mels: int = 80) -> tfds.features.FeaturesDict:
  """TFDS features of one product record."""
  jpeg = tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
  return tfds.features.FeaturesDict({
      "item_id": tfds.features.Text(),
      "label": tfds.features.Scalar(dtype=np.int32),  # -1: unknown.
      "fine_group": tfds.features.Text(),  # '' when the item has no group.
      "fine_group_id": tfds.features.Scalar(dtype=np.int32),  # -1: none.
      "title": tfds.features.Text(),
      "table_keys": tfds.features.Sequence(tfds.features.Text()),
      "table_values": tfds.features.Sequence(tfds.features.Text()),
      "image": tfds.features.Sequence(jpeg),  # 0 or 1 image.
      "video": tfds.features.Sequence(jpeg),  # Frames at 1 fps, 0..max_frames.
      "audio": tfds.features.Tensor(shape=(None, n_mels), dtype=np.float16,
                                     encoding=tfds.features.Encoding.BYTES),  # log-mel, 0 rows if absent.
      # BYTES: raw float16 (a tf.Example float list is 2x bigger and ~15x slower to write).
      "faults": tfds.features.Sequence(tfds.features.Text()),  # e.g. 'video:undecodable'.
      "lists": tfds.features.Sequence(tfds.features.Text()),  # splits/<name>_ids.txt holding it.
      **{f"{name}{suffix}": feature for name in FEATURES for suffix, feature in (
          ("", tfds.features.Tensor(shape=(None,), dtype=np.float16,
                                    encoding=tfds.features.Encoding.BYTES)),
          ("_shape", tfds.features.Tensor(shape=(2,), dtype=np.int32)))},
  })


@functools.lru_cache(maxsize=8)
def _serializer(n_mels: int) -> tuple[tfds.features.FeaturesDict, example_serializer.ExampleSerializer]:
  feats = features(n_mels)
  return feats, example_serializer.ExampleSerializer(feats.get_serialized_info())


def serialize(example: dict, n_mels: int = 80) -> bytes:
  """The record bytes of `example` (an `example()` dict): TFDS's tf.train.Example with
  its feature map in sorted key order. TFDS's own `serialize_example` writes the map in
  the order of the protobuf runtime's hash table, which varies per process, so the
  same records would give different shard bytes on two machines."""
  feats, serializer = _serializer(n_mels)
  proto = serializer.get_tf_example(feats.encode_example(example))
  return proto.SerializeToString(deterministic=True)


def flat_feature(array: np.ndarray | None) -> dict[str, np.ndarray]:
  """[N, D] (or None: absent) -> the record's (flat float16, shape) pair."""
  if array is None:
    return {"": np.zeros((0,), np.float16), "_shape": np.zeros((2,), np.int32)}
  return {"": np.ascontiguousarray(array, np.float16).reshape(-1),
          "_shape": np.asarray(array.shape, np.int32)}


def feature_array(record: dict, name: str) -> np.ndarray:
  """The record's `name` feature as float16 [N, D] ([0, 0] when absent)."""
  n, d = (int(v) for v in record[f"{name}_shape"])
  return np.asarray(record[name], np.float16).reshape(n, d)


def example(item, item_media, *, faults: list[str], group: str = "", group_id: int = -1,
            lists: tuple[str, ...] | list[str] = ()) -> dict:
  """The record dict of one product (`features().serialize_example` input), from
  its parsed text (`raw_layout.RawItem`) and decoded media (`media.ItemMedia`):
  the one place the converter and `m5p.Encoder` build it."""
  out = {
      "item_id": item.item_id, "label": np.int32(item.label), "fine_group": group,
      "fine_group_id": np.int32(group_id), "title": item.title,
      "table_keys": item.table_keys, "table_values": item.table_values,
      "image": item_media.image, "video": item_media.video, "audio": item_media.audio,
      "faults": faults, "lists": list(lists),
  }
  for name in FEATURES:
    for suffix, value in flat_feature(item_media.features.get(name)).items():
      out[name + suffix] = value
  return out