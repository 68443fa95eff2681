"""Give freed heap memory back to the operating system between analyses (glibc only).

A study's analysis allocates and frees a few hundred MB of image arrays in several threads; glibc
keeps much of it in per-thread arenas, so the resident size ratchets up study after study.
``malloc_trim(0)`` after each job returns the free pages (measured: see bench/results/).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any


def _load() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load()


def release_free_memory() -> bool:
    """Return free heap pages to the OS; False where the C library cannot."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
