"""Decoding raw media into what records store: small JPEGs and log-mel arrays.

Images and video frames are centre-cropped to a square and resized to the
training resolution, then re-encoded as JPEG; audio becomes a log-mel
spectrogram at 16 kHz. Pillow decodes images, PyAV (FFmpeg) decodes video
and audio, so any format either library reads is accepted. Every failure is
a `MediaError` with a short `reason`, which the converter counts and records
as that modality being absent; nothing here imports TensorFlow or TFDS, so
worker processes start fast.
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings

import av
import numpy as np
from PIL import Image, ImageOps

from m5p.data.schema import AUDIO_HOP, AUDIO_N_FFT, AUDIO_SAMPLE_RATE

JPEG_QUALITY = 90
MIN_AUDIO_SAMPLES = AUDIO_N_FFT  # Below 64 ms of sound the audio is 'too_short'.
LOG_EPS = 1e-6

# Decompression bombs: an image (or video frame) of more than MAX_IMAGE_PIXELS
# pixels is refused ('too_large') from its header, before any pixel is
# decoded, so one file can cost at most ~3 x MAX_IMAGE_PIXELS bytes of
# memory. Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS, 179M) stays on
# behind it. A JPEG whose file is too small to hold the pixels its header
# claims (under one bit per 8x8 block: every block codes at least its DC
# term) is 'truncated', not decoded into a grey canvas. Truncated files
# raise unless ImageFile.LOAD_TRUNCATED_IMAGES is set (we never set it).
MAX_IMAGE_PIXELS = 36_000_000  # 6000 x 6000.


class MediaError(Exception):
  """A media file that cannot be used; `reason` is a short slug for reports.

  Reasons: 'missing', 'empty', 'unsafe_path', 'truncated', 'undecodable',
  'too_large', 'no_stream', 'no_frames', 'too_short'; for .npy features also
  'bad_dtype', 'bad_shape', 'not_finite'.
  """

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


def safe_join(root: str, *parts: str) -> str | None:
  """`root/parts...` if it exists and resolves inside `root`, else None.

  `parts` are a media folder and a file name built from an item id that the
  raw reader has already checked (no separators, no '..'). Symlinks are
  followed only where they stay inside the real `root` (which may itself be
  a link): a file or a media folder pointing elsewhere is refused
  ('unsafe_path'), so a hostile layout cannot make the converter read
  outside the folder it was given.
  """
  path = os.path.join(root, *parts)
  if not os.path.lexists(path):
    return None
  real = os.path.realpath(path)
  base = os.path.realpath(root)
  if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
    return path
  raise MediaError("unsafe_path", f"{path} resolves outside {root}")


def _check_file(path: str) -> None:
  try:
    size = os.stat(path).st_size
  except FileNotFoundError:
    raise MediaError("missing", path) from None  # Includes broken symlinks.
  except OSError as e:
    raise MediaError("unreadable", f"{path}: {e}") from None
  if not os.path.isfile(path):
    raise MediaError("undecodable", f"{path}: not a regular file")
  if size == 0:
    raise MediaError("empty", path)


# ---------------------------------------------------------------------------
# Images.


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any Pillow mode -> RGB; transparency is composited onto white."""
  if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    arr = np.asarray(img, dtype=np.float32)
    top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    if img.mode == "F":
      lo, hi = float(arr.min()), float(arr.max())
      arr, top = arr - lo, max(hi - lo, 1e-6)
    img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
  has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      img.mode == "P" and "transparency" in img.info)
  if has_alpha:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")  # L, P, CMYK, YCbCr, LAB, 1, RGB.


def _square_resize(img: Image.Image, size: int) -> Image.Image:
  """Centre-crops the largest square and resizes it to `size` x `size`."""
  w, h = img.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  return img.resize((size, size), Image.Resampling.BICUBIC,
                    box=(left, top, left + side, top + side), reducing_gap=3.0)


def _jpeg(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=JPEG_QUALITY)
  return buf.getvalue()


def _check_pixels(path: str, size: tuple[int, int], fmt: str | None = None) -> None:
  """MediaError unless the declared size is within MAX_IMAGE_PIXELS (and, for a JPEG,
  the file is big enough to hold that many blocks)."""
  w, h = size
  if w * h > MAX_IMAGE_PIXELS:
    raise MediaError("too_large", f"{path}: {w}x{h} pixels is over the cap of "
                     f"{MAX_IMAGE_PIXELS} (m5p.data.media.MAX_IMAGE_PIXELS)")
  if fmt == "JPEG":
    blocks = -(-w // 8) * -(-h // 8)
    if os.path.getsize(path) * 8 < blocks:
      raise MediaError("truncated", f"{path}: {os.path.getsize(path)} bytes cannot hold the "
                       f"{w}x{h} pixels its header declares")


def load_image_jpeg(path: str, size: int) -> bytes:
  """Decodes an image file to a `size` x `size` RGB JPEG (bytes).

  Any format Pillow reads (JPEG, PNG, WebP, GIF's first frame, ...) and any
  mode (CMYK, greyscale, palette, 16-bit, RGBA: transparency goes onto
  white); the EXIF orientation is applied. The image is centre-cropped to
  its largest square, then resized (bicubic, antialiased) to `size`, then
  re-encoded as JPEG at quality 90. The whole file is decoded, so truncated
  files raise MediaError('truncated').
  """
  _check_file(path)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(path) as img:
        _check_pixels(path, img.size, img.format)
        if img.format == "JPEG":
          img.draft("RGB", (size, size))  # DCT-domain downscale: keeps >= size.
        img.load()
        try:
          img = ImageOps.exif_transpose(img)
        except Exception:  # pylint: disable=broad-except
          pass  # Broken EXIF: keep the stored orientation rather than lose the image.
        if min(img.size) < 1:
          raise MediaError("undecodable", f"{path}: zero-sized image")
        return _jpeg(_square_resize(_to_rgb(img), size))
  except MediaError:
    raise
  except Image.DecompressionBombError as e:
    raise MediaError("too_large", f"{path}: {e}") from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    msg = str(e).lower()
    if "truncated" in msg or "premature end" in msg or isinstance(e, EOFError):
      raise MediaError("truncated", f"{path}: {e}") from None
    raise MediaError("undecodable", f"{path}: {type(e).__name__}: {e}") from None


def jpeg_from_pil(img: Image.Image, size: int) -> bytes:
  """The image/frame transform of `load_image_jpeg` on a decoded PIL image."""
  return _jpeg(_square_resize(_to_rgb(img), size))


# ---------------------------------------------------------------------------
# Video.


def _open_container(path: str):
  _check_file(path)
  try:
    return av.open(path, metadata_errors="ignore")
  except av.error.FFmpegError as e:
    raise MediaError("undecodable", f"{path}: {e}") from None


def _frame_seconds(frame, index: int, rate: float) -> float:
  if frame.pts is not None and frame.time_base is not None:
    return float(frame.pts * frame.time_base)
  return index / rate


def _rotated(frame) -> Image.Image:
  img = frame.to_image()
  angle = getattr(frame, "rotation", 0) or 0  # Display matrix (phone videos).
  if angle % 360:
    img = img.rotate(angle, expand=True)
  return img


def load_video_frames(path: str, size: int, max_frames: int, fps: float = 1.0) -> list[bytes]:
  """Samples up to `max_frames` frames at `fps` as `size`-pixel square JPEGs.

  The k-th sample is the decoded frame nearest to t = k / fps seconds after
  the first frame, for every t not beyond the last frame, so a clip shorter
  than 1 / fps gives just its first frame. Frames are cropped and resized
  like images (`load_image_jpeg`) and the display rotation is applied.
  Decoding stops as soon as `max_frames` samples are taken.
  """
  if max_frames <= 0:
    return []
  try:
    picked = _sample_frames(path, max_frames, fps, skip_nonref=True)
  except MediaError as e:
    if e.reason != "no_frames":
      raise
    picked = _sample_frames(path, max_frames, fps, skip_nonref=False)
  return [jpeg_from_pil(img, size) for img in picked]


def _sample_frames(path: str, max_frames: int, fps: float, skip_nonref: bool) -> list[Image.Image]:
  container = _open_container(path)
  try:
    if not container.streams.video:
      raise MediaError("no_stream", f"{path}: no video stream")
    stream = container.streams.video[0]
    _check_pixels(path, (stream.codec_context.width or 0, stream.codec_context.height or 0))
    stream.thread_type = "SLICE"  # Frame threading would only add latency per item.
    if skip_nonref:
      # Skipping non-reference (mostly B-) frames decodes ~1.6x faster; the
      # frame nearest each second is then off by at most a frame or two.
      stream.codec_context.skip_frame = "NONREF"
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    picked: list[Image.Image] = []
    prev = None  # (seconds, frame) of the previous decoded frame.
    t0 = None
    k = 0
    index = 0
    try:
      for frame in container.decode(stream):
        t = _frame_seconds(frame, index, rate)
        index += 1
        if t0 is None:
          t0 = t
        t -= t0
        while k < max_frames and t >= k / fps - 1e-9:
          target = k / fps
          use_prev = prev is not None and (target - prev[0]) <= (t - target)
          picked.append(_rotated(prev[1] if use_prev else frame))
          k += 1
        if k >= max_frames:
          break
        prev = (t, frame)
    except av.error.FFmpegError as e:
      if not picked and prev is None:
        raise MediaError("undecodable", f"{path}: {e}") from None
      # A stream broken part-way keeps the frames decoded before the damage.
    if not picked and prev is not None:
      picked.append(_rotated(prev[1]))
    if not picked:
      raise MediaError("no_frames", f"{path}: no frame decoded")
    return picked
  finally:
    container.close()


# ---------------------------------------------------------------------------
# Audio.


def hz_to_mel(f):
  """HTK mel scale."""
  return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_center_frequencies(n_mels: int, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
  """Centre frequency (Hz) of each mel filter of `mel_filterbank`."""
  mels = np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2)
  return mel_to_hz(mels)[1:-1]


def mel_filterbank(n_mels: int, sample_rate: int = AUDIO_SAMPLE_RATE,
                   n_fft: int = AUDIO_N_FFT) -> np.ndarray:
  """[n_fft // 2 + 1, n_mels] triangular HTK filters, 0 Hz to Nyquist, peak 1.

  The same filters as torchaudio's `MelSpectrogram` defaults (htk scale,
  no area normalisation).
  """
  freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  up = (freqs[:, None] - lower[None]) / (center - lower)[None]
  down = (upper[None] - freqs[:, None]) / (upper - center)[None]
  return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


_FILTERBANKS: dict[int, np.ndarray] = {}
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(AUDIO_N_FFT) / AUDIO_N_FFT)).astype(np.float32)


def logmel(samples: np.ndarray, n_mels: int = 80) -> np.ndarray:
  """Log-mel spectrogram [T, n_mels] (float32) of 16 kHz mono samples.

  Periodic Hann window of n_fft=1024, hop 256, centred frames with reflect
  padding (T = 1 + len // 256: 12 s gives 751 frames, as in the authors'
  code), power spectrum, HTK mel filters, then log(mel + 1e-6).
  """
  x = np.asarray(samples, dtype=np.float32)
  pad = AUDIO_N_FFT // 2
  x = np.pad(x, pad, mode="reflect" if len(x) > pad else "constant")
  n_frames = 1 + (len(x) - AUDIO_N_FFT) // AUDIO_HOP
  frames = np.lib.stride_tricks.as_strided(
      x, shape=(n_frames, AUDIO_N_FFT), strides=(x.strides[0] * AUDIO_HOP, x.strides[0]))
  spec = np.fft.rfft(frames * _WINDOW, axis=-1)
  power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
  if n_mels not in _FILTERBANKS:
    _FILTERBANKS[n_mels] = mel_filterbank(n_mels)
  return np.log(power @ _FILTERBANKS[n_mels] + LOG_EPS)


def _resample(frames: list, resampler) -> np.ndarray:
  out = []
  for f in frames:
    out += [o.to_ndarray().reshape(-1) for o in resampler.resample(f)]
  out += [o.to_ndarray().reshape(-1) for o in resampler.resample(None)]  # Flush.
  return np.concatenate(out) if out else np.zeros(0, np.float32)


def load_audio_samples(path: str, max_seconds: float = 12.0) -> np.ndarray:
  """The first `max_seconds` of the first sound track, 16 kHz mono float32.

  Works on audio files (.mp3 .wav .m4a .flac .ogg ...) and on the sound
  track of a video file. Decoded frames are joined and resampled in one
  call (PyAV's per-call cost is most of the time for short frames), unless
  the format changes mid-stream.
  """
  container = _open_container(path)
  try:
    if not container.streams.audio:
      raise MediaError("no_stream", f"{path}: no audio stream")
    stream = container.streams.audio[0]
    frames, kinds, have, need = [], set(), 0, None
    try:
      for frame in container.decode(stream):
        if not frame.samples:
          continue
        frames.append(frame)
        kinds.add((frame.format.name, frame.layout.name, frame.sample_rate))
        have += frame.samples
        if need is None:  # Native samples to cover max_seconds, plus resampler slack.
          need = int(max_seconds * frame.sample_rate) + frame.sample_rate // 10
        if have >= need:
          break
    except av.error.FFmpegError as e:
      if not frames:
        raise MediaError("undecodable", f"{path}: {e}") from None
      # Keep what decoded before the damage.
  finally:
    container.close()
  if len(kinds) == 1:
    fmt, layout, rate = kinds.pop()
    joined = av.AudioFrame.from_ndarray(
        np.concatenate([f.to_ndarray() for f in frames], axis=1), format=fmt, layout=layout)
    joined.sample_rate = rate
    frames = [joined]
  resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE)
  samples = _resample(frames, resampler)[:int(round(max_seconds * AUDIO_SAMPLE_RATE))]
  if len(samples) < MIN_AUDIO_SAMPLES:
    raise MediaError("too_short", f"{path}: {len(samples)} samples")
  if not np.all(np.isfinite(samples)):
    raise MediaError("undecodable", f"{path}: non-finite samples")
  return samples


def load_audio_logmel(path: str, max_seconds: float = 12.0, n_mels: int = 80) -> np.ndarray:
  """Log-mel [T, n_mels] float16 of the first `max_seconds` of `path`.

  16 kHz mono (PyAV's resampler), see `logmel` for the transform.
  """
  return logmel(load_audio_samples(path, max_seconds), n_mels).astype(np.float16)


# ---------------------------------------------------------------------------
# One item's media, as the converter wants it (runs in worker processes).


MAX_FEATURE_VALUES = 1 << 22  # 4M numbers (16 MiB as float32) per feature file.
FEATURE_MODALITIES = {"image_feature": "image", "video_feature": "video",
                      "audio_feature": "audio"}


def load_feature(path: str) -> np.ndarray:
  """A precomputed feature `.npy` as float16 [N, D], loaded without pickle.

  A 1-D array is one row. Object arrays, .npz archives, non-numeric dtypes,
  empty or >2-D arrays, values beyond float16 range or not finite raise
  MediaError; nothing in the file can execute code (allow_pickle=False).
  """
  _check_file(path)
  with open(path, "rb") as f:
    if f.read(6) != b"\x93NUMPY":  # Also refuses .npz archives and pickles.
      raise MediaError("undecodable", f"{path}: not a .npy array")
  try:  # Memory-mapped: the header is checked before any data is read.
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except ValueError as e:  # Object arrays (need pickle), or data shorter than the header says.
    reason = "bad_dtype" if "object" in str(e).lower() or "pickle" in str(e) else "truncated"
    raise MediaError(reason, f"{path}: {e}") from None
  except (OSError, EOFError, SyntaxError) as e:
    raise MediaError("undecodable", f"{path}: not a .npy array ({e})") from None
  shape, dtype = arr.shape, arr.dtype
  if dtype.hasobject or dtype.kind not in "fiu":
    raise MediaError("bad_dtype", f"{path}: dtype {dtype}")
  if len(shape) not in (1, 2) or 0 in shape:
    raise MediaError("bad_shape", f"{path}: shape {shape}")
  if int(np.prod(shape)) > MAX_FEATURE_VALUES:
    raise MediaError("too_large", f"{path}: shape {shape}")
  arr = np.asarray(arr, np.float32).reshape(-1, shape[-1])
  with np.errstate(over="ignore", invalid="ignore"):
    out = arr.astype(np.float16)
  if not np.isfinite(out).all():
    raise MediaError("not_finite", f"{path}: NaN, inf or beyond float16 range")
  return out


@dataclasses.dataclass
class ItemMedia:
  image: list[bytes]  # 0 or 1 JPEG.
  video: list[bytes]  # 0..max_frames JPEG frames.
  audio: np.ndarray  # [T, n_mels] float16; 0 rows when absent.
  faults: list[str]  # 'modality:reason'.
  audio_from_video: bool = False
  features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # name: [N, D] f16.


def _reason(e: Exception) -> str:
  return e.reason if isinstance(e, MediaError) else "undecodable"


def decode_item_media(paths: dict[str, str], image_size: int, max_frames: int,
                      n_mels: int, max_audio_seconds: float) -> ItemMedia:
  """Decodes whatever of {'image', 'video', 'audio', '*_feature': path} exists.

  A file that fails leaves its modality empty and adds 'modality:reason' to
  `faults` (unexpected exceptions count as 'undecodable'; nothing raises).
  When there is no audio file but the video decoded and has a sound track,
  that track is the audio; a video without sound is not a fault.
  """
  out = ItemMedia([], [], np.zeros((0, n_mels), np.float16), [])
  if "image" in paths:
    try:
      out.image = [load_image_jpeg(paths["image"], image_size)]
    except Exception as e:  # pylint: disable=broad-except
      out.faults.append(f"image:{_reason(e)}")
  video_ok = False
  if "video" in paths:
    try:
      out.video = load_video_frames(paths["video"], image_size, max_frames)
      video_ok = True
    except Exception as e:  # pylint: disable=broad-except
      out.faults.append(f"video:{_reason(e)}")
  if "audio" in paths:
    try:
      out.audio = load_audio_logmel(paths["audio"], max_audio_seconds, n_mels)
    except Exception as e:  # pylint: disable=broad-except
      out.faults.append(f"audio:{_reason(e)}")
  elif video_ok:
    try:
      out.audio = load_audio_logmel(paths["video"], max_audio_seconds, n_mels)
      out.audio_from_video = True
    except MediaError as e:
      if e.reason != "no_stream":
        out.faults.append(f"audio:{e.reason}")
    except Exception:  # pylint: disable=broad-except
      out.faults.append("audio:undecodable")
  for name in FEATURE_MODALITIES:
    if name in paths:
      try:
        out.features[name] = load_feature(paths[name])
      except Exception as e:  # pylint: disable=broad-except
        out.faults.append(f"{name}:{_reason(e)}")
  return out
