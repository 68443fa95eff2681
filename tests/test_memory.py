"""node.memory: the allocator limit is applied when the node starts, and it holds.

glibc keeps one heap ("arena") per allocating thread, up to 8 per core; each non-main arena is
a 64 MiB-aligned mapping of up to 64 MiB (its unused part mapped PROT_NONE). These tests count
those mappings in /proc/<pid>/maps of real processes: the node's own (`mammo-node serve`) and a
child that starts many allocating threads."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.memory import arena_max_from_environment, limit_arenas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or
                                os.confstr("CS_GNU_LIBC_VERSION") is None,
                                reason="glibc arenas (Linux with glibc only)")

HEAP = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit


def thread_heaps(pid: int) -> int:
    """Non-main glibc heaps of ``pid``: anonymous rw mappings starting on a 64 MiB boundary
    that, with the PROT_NONE mapping after them, span exactly 64 MiB."""
    rows = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        rows.append((lo, hi, parts[1], len(parts) > 5))
    heaps = 0
    for i, (lo, hi, perms, named) in enumerate(rows):
        if named or not perms.startswith("rw") or lo % HEAP:
            continue
        end = hi
        if hi - lo < HEAP and i + 1 < len(rows) and rows[i + 1][0] == hi \
                and rows[i + 1][2].startswith("---") and not rows[i + 1][3]:
            end = rows[i + 1][1]
        heaps += end - lo == HEAP
    return heaps


CHILD = r"""
import ctypes, sys, threading
from node.memory import limit_arenas
if sys.argv[1] == "limit":
    limit_arenas()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
go = threading.Barrier(9)
def work():
    libc.malloc(200_000 // 2)  # each new thread's first malloc takes an arena
    go.wait()
    go.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
go.wait()
print("ready", flush=True)
sys.stdin.readline()
go.wait()
"""


def _child_heaps(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return thread_heaps(proc.pid)
    finally:
        proc.communicate("\n", timeout=30)


def test_limit_arenas_keeps_eight_allocating_threads_in_one_extra_heap():
    assert _child_heaps("default") >= 4  # glibc's own choice: a heap per thread (the control)
    assert _child_heaps("limit") <= 1  # at most one heap besides the main one


def test_the_administrators_setting_wins():
    assert arena_max_from_environment({"MALLOC_ARENA_MAX": "4"}) == 4
    assert arena_max_from_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=3"}) == 3
    assert arena_max_from_environment({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}) \
        is None
    assert arena_max_from_environment({}) is None
    assert limit_arenas(environ={"MALLOC_ARENA_MAX": "6"}) == 6
    with pytest.raises(ValueError):
        limit_arenas(0)


def test_serve_starts_with_the_arena_limit(node_process):
    """The running node, once its stage threads run, has at most
    one heap besides the main one; the log says so."""
    node = node_process("mem")
    # the node's stage threads (receive, pre-analysis, worker, delivery, scheduler, http)
    # have all started and allocated by now
    time.sleep(2)
    assert node.proc is not None
    assert thread_heaps(node.proc.pid) <= 1
    log = node.log_path.read_text()
    assert "process.allocator arena_max=1 mmap_threshold_mib=256" in log
