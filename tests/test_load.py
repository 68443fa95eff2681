"""Load and disk space.

Load: eight dcmtk storescu processes at once, each sending its own studies to the node while it
analyses and delivers: every instance stored, every study delivered, no "database is locked",
and the node's peak RSS (VmHWM from /proc) stays bounded.

Disk full: with ``node.min_free_mb`` just below the free space, a ballast file (fallocate) in
data_dir makes the node answer 0xA700 without keeping anything; deleting it, the same node
accepts again by itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.netutil import NodeProcess, storescu, wait_until
from tests.reliability import RecordingSCP, delivered_studies, peak_rss_mb, stored_sop_uids
from tests.smallstudies import small_study, sop_uids

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

SENDERS = 8
STUDIES_PER_SENDER = 3
PEAK_RSS_LIMIT_MB = 3072


def test_eight_concurrent_associations_lose_nothing(tmp_path: Path) -> None:
    dest = RecordingSCP(tmp_path / "dest").start()
    # All eight come from 127.0.0.1: room above them for the start-up's port probe, whose slot
    # may still be held when they connect (the per-address limit is not what this tests).
    node = NodeProcess(tmp_path / "node", [dest.destination()],
                       node={"max_associations_per_ip": SENDERS + 2},
                       study={"stable_seconds": 600, "complete_on_four_views": True}).start()
    batches = [[f for k in range(STUDIES_PER_SENDER)
                for f in small_study(tmp_path / "in" / f"sender{s}", s * 100 + k, tag="load")]
               for s in range(SENDERS)]
    all_files = [f for b in batches for f in b]
    study_uids = {f.name.split("_")[0] for f in all_files}
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(SENDERS) as pool:
            results = list(pool.map(
                lambda b: storescu(node.port, b[1], calling=f"MOD{b[0]}"), enumerate(batches)))
        store_s = time.monotonic() - t0
        for res in results:
            assert res.returncode == 0, res.stdout + res.stderr
        wait_until(lambda: len(delivered_studies(node.data_dir)) == len(study_uids), 600, 1.0,
                   "every study delivered")
        total_s = time.monotonic() - t0
        rss = peak_rss_mb(node.proc.pid)
    finally:
        node.stop()
        dest.stop()
    log = node.log()
    stored = stored_sop_uids(node.data_dir)
    print(f"\nload: {SENDERS} concurrent associations, {len(all_files)} instances "
          f"({len(study_uids)} studies) stored in {store_s:.1f} s, all analysed and delivered "
          f"in {total_s:.1f} s; node peak RSS {rss:.0f} MiB")
    assert sop_uids(all_files) == stored
    assert log.count("instance.stored") == len(all_files)
    assert "database is locked" not in log.lower()
    assert "instance.refused" not in log
    assert log.count("delivery.sent") == len(study_uids)
    assert rss < PEAK_RSS_LIMIT_MB


def test_disk_full_refuses_with_a700_and_recovers(tmp_path: Path) -> None:
    def free_mb() -> float:
        return shutil.disk_usage(tmp_path).free / 2**20

    # The filesystem is shared with whatever else runs: a wide margin on both sides.
    margin_mb = int(min(2048, free_mb() / 8))
    if margin_mb < 100:
        pytest.fail(f"need at least 800 MiB free under {tmp_path}, have {free_mb():.0f}")
    threshold = int(free_mb() - margin_mb)
    node = NodeProcess(tmp_path / "node", node={"min_free_mb": threshold},
                       study={"stable_seconds": 600, "complete_on_four_views": False}).start()
    first, second = small_study(tmp_path / "a", 1, tag="disk"), small_study(tmp_path / "b", 2,
                                                                             tag="disk")
    ballast = node.data_dir / "ballast.bin"
    try:
        subprocess.run(["fallocate", "-l", f"{2 * margin_mb}M", str(ballast)], check=True)
        assert free_mb() < threshold
        res = storescu(node.port, first, extra=["-d"])
        out = (res.stdout + res.stderr).lower()
        assert res.returncode != 0 or "0xa700" in out
        assert "0xa700" in out
        assert stored_sop_uids(node.data_dir) == set()
        assert list((node.data_dir / "instances").rglob("*")) == []
        assert [p for p in (node.data_dir / "incoming").iterdir()] == []
        os.unlink(ballast)  # space is back: no restart, no command
        wait_until(lambda: free_mb() > threshold + 50, 60, 0.5, "free space back")
        res = storescu(node.port, second)
        assert res.returncode == 0, res.stdout + res.stderr
        assert sop_uids(second) == stored_sop_uids(node.data_dir)
    finally:
        ballast.unlink(missing_ok=True)
        node.stop()
    log = node.log()
    assert "status=0xA700" in log and "MiB free in data_dir" in log
    # The refused datasets were counted but never written, not even to incoming/.
    not_written = [int(m) for m in re.findall(r"bytes_not_written=(\d+)", log)]
    assert not_written and all(n > 0 for n in not_written), not_written
    assert log.count("instance.stored") == 4
