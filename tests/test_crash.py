"""Crash safety: SIGKILL the node at every fault point over 24 studies, restart it each time.

The node runs as a real process with ``MAMMO_NODE_FAULTS`` (node/faults.py) set to a different
point on each start; the test plays a modality that re-sends whatever was not answered 0x0000,
and a dcmtk storescp destination keeps every copy it receives (+uf). At the end:

* every instance that was answered 0x0000 is in the database and on disk, with its pixels;
* every study has exactly one current result (1 SR + 4 SC) and it was delivered;
* the destination saw exactly one SR UID and four SC UIDs per study: copies re-sent after a
  crash carry the same SOP Instance UIDs (deterministic per analysis), never new ones;
* result files left behind by a killed analysis carry the UIDs of the recorded result.
"""

from __future__ import annotations

import random
import re
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.faults import POINTS
from tests.netutil import NodeProcess, wait_until
from tests.reliability import (
    SC_CLASS,
    SR_CLASS,
    RawSender,
    RecordingSCP,
    delivered_studies,
    node_db,
)
from tests.smallstudies import small_study

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

STUDIES = 24
KILLS_PLANNED = 18  # three per fault point


def _plan(rng: random.Random) -> list[str]:
    plan = []
    for i in range(KILLS_PLANNED):
        point = POINTS[i % len(POINTS)]
        n = rng.randint(1, 4) if point.startswith("store.") else 1
        plan.append(f"{point}:{n}")
    return plan


def test_sigkill_at_every_fault_point_loses_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    plan = _plan(rng)
    dest = RecordingSCP(tmp_path / "dest").start()
    node = NodeProcess(tmp_path / "node", [dest.destination()],
                       study={"stable_seconds": 600, "complete_on_four_views": True},
                       delivery={"max_attempts": 50, "backoff_initial_seconds": 1,
                                 "backoff_max_seconds": 2})
    studies = {i: small_study(tmp_path / "in" / f"s{i:02d}", i, tag="crash")
               for i in range(STUDIES)}
    study_uids = {i: str(pydicom.dcmread(p[0], stop_before_pixels=True).StudyInstanceUID)
                  for i, p in studies.items()}
    acked: dict[str, Path] = {}  # SOP Instance UID -> the file that was answered 0x0000
    kills: Counter[str] = Counter()
    state = {"spec": "", "starts": 0}
    result_files_seen: set[str] = set()

    def ensure_running() -> None:
        if node.proc is not None and node.proc.poll() is None:
            return
        if node.proc is not None:
            rc = node.proc.poll()
            node.stop()
            assert rc == -signal.SIGKILL, f"node exited with {rc}, not by a fault kill"
            kills[state["spec"].split(":")[0]] += 1
            # Result files as the killed node left them (the restart sweeps unrecorded ones).
            for p in (node.data_dir / "results").rglob("*.dcm"):
                result_files_seen.add(str(pydicom.dcmread(p, stop_before_pixels=True)
                                          .SOPInstanceUID))
        state["spec"] = plan.pop(0) if plan else ""
        monkeypatch.setenv("MAMMO_NODE_FAULTS", state["spec"])
        state["starts"] += 1
        node.start()

    def send_study(files: list[Path]) -> None:
        """Like a modality: re-send the unanswered instances until every one is 0x0000."""
        for _ in range(20):
            ensure_running()
            todo = [f for f in files
                    if str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                    not in acked]
            if not todo:
                return
            sender = RawSender(node.port, calling="MODALITY")
            try:
                for f in todo:
                    status = sender.send(f)
                    if status != 0x0000:
                        break
                    acked[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = f
                sender.close()
            except (ConnectionError, OSError):
                pass
            time.sleep(0.2)  # let a killed node's exit be seen
        raise AssertionError("study could not be stored after 20 tries")

    t0 = time.monotonic()
    try:
        for i in range(STUDIES):
            send_study(studies[i])

            def delivered_or_dead(uid: str = study_uids[i]) -> bool:
                if node.proc is None or node.proc.poll() is not None:
                    ensure_running()
                return uid in delivered_studies(node.data_dir)

            wait_until(delivered_or_dead, 300, 0.3, f"study {i} delivered")
        # Anything still open (a study re-sent after a kill) finishes too.
        wait_until(lambda: (ensure_running() or True) and
                   set(study_uids.values()) <= delivered_studies(node.data_dir),
                   300, 0.5, "every study delivered")
        time.sleep(2)  # storescp finishes writing
    finally:
        node.stop()
        dest.stop()
    duration = time.monotonic() - t0

    # 1. Every acknowledged instance is there, intact.
    with node_db(node.data_dir) as con:
        rows = dict(con.execute("SELECT sop_uid, relpath FROM instances").fetchall())
        results = con.execute(
            "SELECT s.study_uid, r.id, r.current FROM results r JOIN studies s "
            "ON s.id = r.study_id").fetchall()
        objects = con.execute("SELECT result_id, sop_class_uid, sop_uid FROM result_objects"
                              ).fetchall()
        deliveries = Counter(dict(con.execute(
            "SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()))
    assert len(acked) == STUDIES * 4
    for sop, src in acked.items():
        assert sop in rows, f"acknowledged instance {sop} lost"
        stored = pydicom.dcmread(node.data_dir / rows[sop])
        assert stored.SOPInstanceUID == sop
        assert np.array_equal(stored.pixel_array, pydicom.dcmread(src).pixel_array)
    # 2. One current result per study, 1 SR + 4 SC, delivered.
    current = defaultdict(list)
    for study_uid, result_id, is_current in results:
        if is_current:
            current[study_uid].append(result_id)
    assert set(current) == set(study_uids.values())
    assert all(len(ids) == 1 for ids in current.values()), current
    by_result = defaultdict(list)
    for result_id, sop_class, sop in objects:
        by_result[result_id].append((sop_class, sop))
    expected: dict[str, set[str]] = {}
    for study_uid, (result_id,) in current.items():
        objs = by_result[result_id]
        assert Counter(c for c, _ in objs) == {SR_CLASS: 1, SC_CLASS: 4}
        expected[study_uid] = {sop for _, sop in objs}
    assert set(deliveries) == {"done"}, deliveries
    # 3. The destination: the same UIDs only, whatever was re-sent.
    received = [pydicom.dcmread(f, stop_before_pixels=True) for f in dest.files()]
    seen: dict[str, set[str]] = defaultdict(set)
    copies: Counter[str] = Counter()
    for ds in received:
        seen[str(ds.StudyInstanceUID)].add(str(ds.SOPInstanceUID))
        copies[str(ds.SOPInstanceUID)] += 1
    assert dict(seen) == expected
    # 4. Result files written by killed analyses carry the UIDs of the recorded result
    #    (deterministic per analysis); the restarts swept them, and unrecorded instances.
    recorded = {sop for _, _, sop in objects}
    assert result_files_seen <= recorded
    on_disk = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
               for p in (node.data_dir / "results").rglob("*.dcm")]
    assert sorted(on_disk) == sorted(recorded)
    assert len(list((node.data_dir / "instances").rglob("*.dcm"))) == len(rows)
    log = node.log()
    orphans = sum(int(n) for n in re.findall(r"spool\.orphans_removed files=(\d+)", log))
    # each kind is recorded as soon as it is written: a kill there leaves that kind's files
    # (1 SR or 4 SCs) unrecorded
    assert orphans >= kills["analysis.before_record"]
    resent = sum(n - 1 for n in copies.values())
    print(f"\ncrash: {STUDIES} studies, {sum(kills.values())} SIGKILLs {dict(kills)}, "
          f"{state['starts']} starts, {len(acked)} instances acked / "
          f"{len(set(acked) & set(rows))} present, {len(received)} result copies received for "
          f"{len(copies)} result UIDs ({resent} identical-UID re-sends), "
          f"{orphans} unrecorded files swept at restarts, {duration:.0f} s")
    assert sum(kills.values()) >= 14
    assert set(kills) >= set(POINTS), kills


def test_fault_plan_parsing() -> None:
    from node.faults import _parse

    assert _parse("store.after_write:3, deliver.mid_send") == {"store.after_write": 3,
                                                              "deliver.mid_send": 1}
    with pytest.raises(ValueError, match="unknown fault point"):
        _parse("store.nowhere:1")
