"""Hands freed host heap back to the operating system (glibc `malloc_trim`).

XLA:CPU allocates a step's buffers with malloc. Buffers of a few MB to 32 MB
(a layer's weights, their optimizer moments) come from the heap once glibc's
dynamic mmap threshold has grown, and when freed they stay in the process: the
parameter init's temporaries alone leave ~0.8 GiB resident for
configs/scale_authors.py (197M parameters), and compiling leaves more. On CPU
that is memory the train step then cannot use. `release()` after building the
state, restoring and compiling returns it. A no-op where there is no glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc.malloc_trim
  except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to trim.
    return None


def release() -> bool:
  """Returns the free heap pages to the OS; True if glibc did any."""
  trim = _malloc_trim()
  return bool(trim(0)) if trim is not None else False
