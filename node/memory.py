"""Keep the node's resident memory down (glibc only; elsewhere these do nothing).

- :func:`limit_arenas`, once at process start (``mammo-node serve``), before the stage threads
  exist: glibc gives each thread that allocates under contention its own heap ("arena"), up to
  8 per core. The node's dozen threads (receive, pre-analysis pool, study prepare threads,
  worker, delivery) each free image arrays of tens of MB into their own arena, where the free
  pages stay mapped until a trim, and a new array of another thread cannot reuse them: the
  peak resident size is the sum of every arena's high-water mark. With two arenas the idle
  node holds 1 thread heap instead of 14; the sustained peak fell by 35-56 MiB against the
  baseline in the same runs (180-250 MiB in single runs), with no slowdown the machine's noise
  showed (bench/results/2026-12-01-issue18d-H-cpu.md).
- :func:`release_free_memory` after each job (node.worker): ``malloc_trim(0)`` returns the free
  pages of every arena, so the resident size stays flat study after study.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from typing import Any

# mallopt(3) parameters (glibc's malloc.h)
M_ARENA_MAX = -8

#: Arenas when nothing else is asked: one, the main heap, for every thread. Two (the main heap
#: and one for all the other threads) already cut the idle node's 14 heaps to 1; one also lets
#: node.analysis.allocator's thresholds work in the preparation threads (a thread arena's
#: heaps hold at most 64 MiB, less than a float image).
DEFAULT_ARENA_MAX = 1


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


_LIBC = _libc()


def release_free_memory() -> bool:
    """Return free heap pages to the OS; False where the C library cannot."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


def arena_max_from_environment(environ: Mapping[str, str]) -> int | None:
    """The arena limit the administrator set for glibc (``MALLOC_ARENA_MAX`` or
    ``GLIBC_TUNABLES=glibc.malloc.arena_max=N``), which glibc has already applied; None if
    neither is set."""
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name.strip() == "glibc.malloc.arena_max" and value.strip().isdigit():
            return int(value)
    value = environ.get("MALLOC_ARENA_MAX", "").strip()
    return int(value) if value.isdigit() else None


def limit_arenas(arena_max: int = DEFAULT_ARENA_MAX,
                 environ: Mapping[str, str] | None = None) -> int | None:
    """Limit glibc to ``arena_max`` heaps unless the environment already chose a limit (the
    administrator's setting wins). Call it before the threads start: arenas that exist stay.
    Returns the limit in force, or None where the C library is not glibc."""
    if arena_max < 1:
        raise ValueError(f"arena_max must be at least 1, got {arena_max}")
    chosen = arena_max_from_environment(os.environ if environ is None else environ)
    if chosen is not None:
        return chosen
    if _LIBC is None or _LIBC.mallopt(M_ARENA_MAX, arena_max) != 1:
        return None
    return arena_max
