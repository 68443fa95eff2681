"""End to end over real sockets: dcmtk storescu -> the node (a real process) -> dcmtk storescp.

The node runs the real analysis stage with the shipped model; what arrives at the destination is
checked with dciodvfy, dsrdump and dcentvfy.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pydicom
import pydicom.errors
import pytest

from tests.netutil import NodeProcess, StoreSCP, storescu, wait_until
from tests.testdata import mias_four_view, mias_to_mg
from tests.tools import dciodvfy_problems, dsrdump, run_tool

pytestmark = [pytest.mark.dcmtk, pytest.mark.dicom3tools, pytest.mark.slow]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _objects(files: list[Path]) -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    ds = [pydicom.dcmread(f) for f in files]
    return ([d for d in ds if d.SOPClassUID == SR_CLASS], [d for d in ds if d.SOPClassUID ==
                                                              SC_CLASS])


def _received(dest: StoreSCP, n_sr: int, n_sc: int, timeout: float = 300) -> list[Path]:
    def ready():  # type: ignore[no-untyped-def]
        files = dest.files()
        try:
            srs, scs = _objects(files) if files else ([], [])
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError):
            return None  # storescp is still writing a file
        return files if len(srs) >= n_sr and len(scs) >= n_sc else None

    wait_until(ready, timeout, 1.0, f"{n_sr} SR + {n_sc} SC at the destination")
    sizes = None
    while sizes != (sizes := [(f, f.stat().st_size) for f in dest.files()]):
        time.sleep(0.5)  # until storescp has finished writing every file
    return [f for f, _ in sizes]


def _status(node: NodeProcess) -> dict:
    out = node.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def dest(tmp_path: Path):
    scp = StoreSCP(tmp_path / "dest").start()
    yield scp
    scp.stop()


def test_four_view_study_round_trip(tmp_path: Path, dest: StoreSCP) -> None:
    study = mias_four_view(tmp_path / "study")
    # A long quiet timer: only the four-view rule can complete this study quickly.
    node = NodeProcess(tmp_path / "node", [dest.destination()],
                       study={"stable_seconds": 600, "complete_on_four_views": True}).start()
    try:
        t0 = time.monotonic()
        res = storescu(node.port, study)
        assert res.returncode == 0, res.stderr
        files = _received(dest, 1, 4)
        elapsed = time.monotonic() - t0
        status = _status(node)
    finally:
        node.stop()
    assert elapsed < 240
    srs, scs = _objects(files)
    assert len(srs) == 1 and len(scs) == 4
    sr = srs[0]
    sources = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in study}
    # Same study, same patient, new series.
    for obj in [sr, *scs]:
        assert obj.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
        assert obj.PatientID == "MIAS4VIEW"
        assert obj.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources.values()}
    assert sr.SeriesDescription == "AI calcification analysis"
    assert {sc.SeriesDescription for sc in scs} == {"AI Grad-CAM"}
    assert all(sc.BurnedInAnnotation == "YES" for sc in scs)
    # The SR's evidence lists the four images that were analysed.
    evidence = {item.ReferencedSOPInstanceUID
                for study_item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study_item.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert evidence == set(sources)
    # Validators on what arrived.
    for f in files:
        errors, _ = dciodvfy_problems(f)
        assert errors == [], f"{f.name}: {errors}"
    sr_file = next(f for f in files if pydicom.dcmread(f).SOPClassUID == SR_CLASS)
    rc, out = dsrdump(sr_file)
    assert rc == 0 and not re.search(r"^E:", out, re.M), out
    _, out = run_tool("dcentvfy", [*study, *files])
    conflicts = [ln for ln in out.splitlines() if ln.startswith(("Error", "Warning"))
                 and "AccessionNumber" not in ln]
    assert conflicts == [], conflicts
    # The admin's view: one line per step, no patient identity.
    log = node.log()
    for needle in ("association.accepted", "instance.stored", "study.complete",
                   "analysis.done", "delivery.sent"):
        assert needle in log, needle
    assert log.count("instance.stored") == 4
    assert re.search(r"analysis\.done .*rois=\d+ .*ms=", log)
    assert "MIAS4VIEW" not in log and "TEST^" not in log
    assert status["studies"] == {"done": 1}
    assert status["deliveries"] == {"done": 1}
    assert status["queue_depth"] == 0


def test_reopened_study_supersedes_and_identical_resend_sends_nothing(
    tmp_path: Path, dest: StoreSCP
) -> None:
    study = mias_four_view(tmp_path / "study")
    node = NodeProcess(tmp_path / "node", [dest.destination()],
                       study={"stable_seconds": 2, "complete_on_four_views": False}).start()
    try:
        assert storescu(node.port, study[:3]).returncode == 0
        first = _received(dest, 1, 3)
        first_sr = _objects(first)[0][0]
        # A late instance re-opens the study: a new analysis supersedes the first result.
        assert storescu(node.port, study[3:]).returncode == 0
        second = _received(dest, 2, 7)
        srs, _ = _objects(second)
        new_sr = next(s for s in srs if s.SOPInstanceUID != first_sr.SOPInstanceUID)
        assert len(list(new_sr.CurrentRequestedProcedureEvidenceSequence[0]
                        .ReferencedSeriesSequence)) == 4
        # The new SR names the one it supersedes.
        predecessors = {item.ReferencedSOPInstanceUID
                        for study_item in new_sr.PredecessorDocumentsSequence
                        for series in study_item.ReferencedSeriesSequence
                        for item in series.ReferencedSOPSequence}
        assert predecessors == {first_sr.SOPInstanceUID}
        for f in second:
            assert dciodvfy_problems(f)[0] == [], f.name
            if pydicom.dcmread(f).SOPClassUID == SR_CLASS:
                assert dsrdump(f)[0] == 0, f.name
        # The same four instances again: stored already, same content -> nothing new is sent.
        assert storescu(node.port, study).returncode == 0
        time.sleep(8)
        assert len(dest.files()) == len(second)
        status = _status(node)
    finally:
        node.stop()
    assert status["studies"] == {"done": 1}
    assert status["jobs"] == {"done": 2}
    assert node.log().count("analysis.done") == 2
    assert "study.reopened" in node.log()


def test_destination_down_then_retry_and_restart_resume(tmp_path: Path) -> None:
    """Delivery fails while the PACS is down; `retry` and a restart get everything out."""
    dest = StoreSCP(tmp_path / "dest")  # not started yet: the destination is down
    src = tmp_path / "in" / "mdb209.dcm"
    mias_to_mg("mdb209", src)
    node = NodeProcess(tmp_path / "node", [dest.destination()],
                       study={"stable_seconds": 1},
                       delivery={"max_attempts": 2, "backoff_initial_seconds": 1,
                                 "backoff_max_seconds": 1}).start()
    try:
        assert storescu(node.port, [src]).returncode == 0
        wait_until(lambda: _status(node)["deliveries"].get("failed"), 120, 1.0,
                   "the delivery to fail")
        status = _status(node)
        assert status["recent_errors"][0]["destination"] == "dest"
        assert "cannot connect" in status["recent_errors"][0]["error"]
        node.stop()  # the node goes down too
        dest.start()
        out = node.cli("retry")
        assert out.returncode == 0 and "re-queued 1 failed deliveries" in out.stdout
        node.start()  # resumes: the re-queued delivery goes out
        files = _received(dest, 1, 1, timeout=120)
    finally:
        node.stop()
        dest.stop()
    assert len(files) == 2
    assert "delivery.failed" in node.log() and "delivery.sent" in node.log()


def test_restart_resumes_queued_analysis(tmp_path: Path, dest: StoreSCP) -> None:
    """Instances acknowledged before a SIGKILL are analysed and delivered after the restart."""
    study = mias_four_view(tmp_path / "study")
    node = NodeProcess(tmp_path / "node", [dest.destination()],
                       study={"stable_seconds": 600, "complete_on_four_views": False}).start()
    try:
        assert storescu(node.port, study).returncode == 0
    finally:
        node.stop(sig=9)  # killed before the quiet timer ran out
    assert dest.files() == []
    node2 = NodeProcess(tmp_path / "node", [dest.destination()], node={"port": node.port},
                        study={"stable_seconds": 1, "complete_on_four_views": False}).start()
    try:
        files = _received(dest, 1, 4)
    finally:
        node2.stop()
    assert len(_objects(files)[0]) == 1
    assert "analysis.done" in node2.log()


def test_operating_point_from_config_reaches_the_detector(tmp_path: Path, dest: StoreSCP) -> None:
    """With the detector operating point above any cluster score, the SR says no calcification
    cluster was found."""
    src = tmp_path / "in" / "mdb209.dcm"
    mias_to_mg("mdb209", src)
    node = NodeProcess(tmp_path / "node", [dest.destination()], study={"stable_seconds": 1},
                       analysis={"detector_operating_point": 1.0}).start()
    try:
        assert storescu(node.port, [src]).returncode == 0
        files = _received(dest, 1, 1)
    finally:
        node.stop()
    sr_file = next(f for f in files if pydicom.dcmread(f).SOPClassUID == SR_CLASS)
    rc, out = dsrdump(sr_file)
    assert rc == 0
    assert "Absent" in out and "Probability of cancer" not in out
    assert re.search(r"analysis\.done .*rois=0 ", node.log())
