"""The record schema: what one converted product looks like on disk.

Records are written by the TFDS builder (`m5p.data.m5product_builder`) as
ArrayRecord; TFDS's `features.json` makes them self-describing and no record
is ever pickled. Media are stored decoded-and-resized-then-re-encoded (JPEG
images and frames at the training resolution) or as arrays (log-mel), so the
input pipeline only decodes small JPEGs. A modality is absent when its field
is empty; `faults` says why for damaged inputs.

Bump `RECORD_VERSION` (and the builder's VERSION) for any change here.
"""
import numpy as np
import tensorflow_datasets as tfds

RECORD_VERSION = "1.0.0"

# Audio front end (authors' code: 16 kHz mono, n_fft 1024, hop 256, 80 mels, 12 s).
AUDIO_SAMPLE_RATE = 16000
AUDIO_N_FFT = 1024
AUDIO_HOP = 256


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
  })
