"""node.analysis.allocator: freed image-sized blocks are reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# In a worker thread (as the pipeline's preparation threads), fills and frees a 54 MB float
# image three times and prints how many MiB of resident memory each free gave back to the
# kernel: all of it when every image is a fresh mmap (and its pages fault in again next time),
# none when the block is kept for the next image.
PROBE = r"""
import os, sys, threading
import numpy as np
if sys.argv[1] == "on":
    from node.analysis.allocator import keep_freed_images
    assert keep_freed_images() and keep_freed_images()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
out = []
def work():
    for _ in range(3):
        a = np.empty((4096, 3328), np.float32)
        a.fill(1.0)
        held = rss()
        del a
        out.append(held - rss())
t = threading.Thread(target=work)
t.start()
t.join()
print(" ".join(map(str, out)))
"""


def _returned_mib(mode: str) -> list[int]:
    import os

    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="Linux (glibc) only")
def test_a_freed_image_is_kept_for_the_next_one() -> None:
    assert all(mib >= 40 for mib in _returned_mib("off"))  # glibc's default: munmap each time
    assert all(mib <= 4 for mib in _returned_mib("on"))


def test_a_sites_own_malloc_tuning_is_left_alone() -> None:
    code = ("from node.analysis.allocator import keep_freed_images; "
            "print(keep_freed_images())")
    import os

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, MALLOC_ARENA_MAX="4"))
    assert out.stdout.strip() == "False", out.stderr
    tuned = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                           text=True, timeout=60,
                           env=dict(os.environ, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=4096"))
    assert tuned.stdout.strip() == "False", tuned.stderr
