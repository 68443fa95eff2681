"""Keep freed image-sized blocks in the process instead of giving them back to the kernel.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB as
blocks are freed) with a fresh ``mmap`` and gives it back with ``munmap`` when it is freed. The
per-image work allocates and frees some 250 MB of image-sized arrays (the decoded frame, the
float image, masks, the 0.1 mm grid, the band buffers): each comes back from the kernel as new
zeroed pages, and the page faults cost ~15-25 ms of system CPU per 3328 x 4096 image
(``bench.perimage`` reports it as ``sys_ms``). Raising the mmap threshold above the largest
array and the trim threshold above a few images' worth lets the next image reuse the freed
blocks: the same arrays, the same values, fewer faults. The peak (VmHWM) stays that of the
arrays alive at once; what changes is that freed memory is held for the next image.

The images are prepared in threads, and glibc gives a thread its own arena, whose heaps hold at
most 64 MiB: a float image and its neighbours do not fit, go to ``mmap`` again whatever the
threshold, and fault as before (measured: ``sys_ms`` unchanged with two threads). One arena for
the process (``M_ARENA_MAX`` 1) keeps every thread's large blocks in the main heap; the threads
then share its lock, which large numpy arrays take a few hundred times per image (Python's
small objects have their own allocator).

Linux with glibc only; elsewhere (or when ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``
or ``MALLOC_ARENA_MAX`` are set in the environment, or ``GLIBC_TUNABLES`` names a
``glibc.malloc.*`` tunable, which glibc reads itself: a site's own tuning wins) nothing is
changed. ``mammo-node serve`` calls it first, with :func:`node.memory.limit_arenas`, before any
stage thread exists (a thread that allocated before keeps its own arena); the pipeline calls it
too, for a process that builds one without serving (benches, tools): once per process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("node.analysis.allocator")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 << 20  # above the largest per-image array (a 54 MB float image)
TRIM_THRESHOLD = 512 << 20  # a few images' worth of freed blocks kept for the next one

_done = False


def keep_freed_images() -> bool:
    """Set glibc's thresholds and one arena, once per process; True when they are (now or
    before) set."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or \
            {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"} \
            & set(os.environ) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mallopt(_M_ARENA_MAX, 1) == 1
    if ok:
        log.debug("malloc keeps freed blocks up to %d MiB (mmap threshold %d MiB)",
                  TRIM_THRESHOLD >> 20, MMAP_THRESHOLD >> 20)
    _done = ok
    return ok
