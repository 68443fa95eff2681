"""The compose deployment's Orthanc files, run with Debian's Orthanc: auto-routing for real.

A modality (dcmtk storescu) sends a screening study as PACS hold them to Orthanc: four MG views,
a Breast Projection X-Ray view, a synthesized 2D view, a tomosynthesis object, a vendor flat-field
Secondary Capture, a dose report, a presentation state and another system's CAD SR
(tests/mixedstudy.py). Orthanc, configured with docker/orthanc/orthanc.json and
docker/orthanc/autorouting.lua (the very files the compose file mounts; only site.json is
replaced, by one with this test's ports and folders), routes the stable study to the node by
itself (its MG series, tomosynthesis left out); the node's SR and Secondary Captures land in
Orthanc's copy of the study. Then the PACS admin sends the *whole* study to the node again:
every object is accepted (the Orthanc job succeeds), nothing is analysed again, nothing changes.
No test code sits between Orthanc and the node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.mixedstudy import mixed_study
from tests.netutil import REPO, NodeProcess, storescu, wait_until
from tests.orthanc import DeployedOrthanc

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]

ORTHANC_DIR = REPO / "docker" / "orthanc"
SHARED = ["orthanc.json", "autorouting.lua"]


def test_orthanc_routes_a_mixed_screening_study_and_the_whole_study_is_accepted(
        tmp_path: Path) -> None:
    study = mixed_study(tmp_path / "study")
    n_analysed = len(study.analysed)  # 4 MG views + 1 Breast Projection X-Ray view
    # The study has five analysed views: completing on the first four would analyse twice
    # (the fifth re-opens it), so this node waits for the routed batch to be quiet.
    quiet = {"stable_seconds": 5, "complete_on_four_views": False}
    node = NodeProcess(tmp_path / "node", study=quiet)
    compose_site = json.loads((ORTHANC_DIR / "site.json").read_text())
    site = {"StableAge": 2,
            "DicomModalities": {"mammo": {"AET": "MAMMO_AI", "Host": "127.0.0.1",
                                          "Port": node.port}}}
    pacs = DeployedOrthanc(tmp_path / "orthanc", ORTHANC_DIR, SHARED, site)
    # The test's site.json stands in for the compose one key for key, nothing more.
    assert set(pacs.config()) <= set(compose_site), set(pacs.config()) - set(compose_site)
    pacs.start()
    node = NodeProcess(tmp_path / "node",
                       [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                         "port": pacs.dicom_port}],
                       node={"port": node.port, "allowed_calling_aets": ["ORTHANC"]},
                       study=quiet).start()
    try:
        # -R: exactly the contexts of these files (storescu's default list lacks newer classes)
        res = storescu(pacs.dicom_port, study.files, aet="ORTHANC", calling="MODALITY",
                       extra=["-R"])
        assert res.returncode == 0, res.stderr
        studies = pacs.get("/studies")
        assert len(studies) == 1
        study_id = studies[0]

        counts = wait_until(lambda: pacs.ai_results(study_id, sc_count=n_analysed), 400, 2.0,
                            f"1 SR + {n_analysed} SC in Orthanc's study")
        # The results made the study stable again: the script must not send them (or the
        # mammograms) back to the node. Wait past StableAge and check nothing else arrived.
        time.sleep(8)
        metadata = pacs.get(f"/studies/{study_id}/metadata/MammoRoutedInstances")
        routed_log = node.log()
        # The PACS admin sends the whole study (everything in it, the node's results too).
        job = pacs.post("/modalities/mammo/store", {"Resources": [study_id],
                                                     "Synchronous": True})
        time.sleep(8)  # past stable_seconds: nothing may complete or start
        series = pacs.get(f"/studies/{study_id}/series")
        orthanc_log = (tmp_path / "orthanc" / "orthanc.log").read_text(errors="replace")
        node_log = node.log()
        status = node.cli("status", "--json").stdout
    finally:
        node.stop()
        pacs.stop()
    assert counts["AI calcification analysis"] == 1 and counts["AI Grad-CAM"] == n_analysed
    # Filed in the study Orthanc received from the modality: 11 series + SR + SC.
    described = sorted(
        (x["MainDicomTags"].get("Modality", ""), x["MainDicomTags"].get("SeriesDescription", ""),
         len(x["Instances"])) for x in series)
    assert len(series) == 4 + 7 + 2, described
    # Routed once, by the Lua script (MG series, no tomosynthesis), not by this test.
    assert metadata == n_analysed + 2  # + the synthesized view and the flat-field SC
    assert orthanc_log.count("mammo-node: routing study") == 1, orthanc_log[-3000:]
    assert routed_log.count("instance.stored") == n_analysed
    assert routed_log.count("instance.not_analysed") == 2
    assert "kind=synthesized_2d" in routed_log and "kind=quality_control" in routed_log
    assert "kind=tomosynthesis" not in routed_log
    assert "peer_aet=ORTHANC" in routed_log
    # The whole study: every object acknowledged (the job succeeded), none analysed again.
    late = node_log[len(routed_log):]
    sent = len(study.files) + 1 + n_analysed  # + the node's SR and SCs
    assert isinstance(job, dict) and job.get("FailedInstancesCount", 0) == 0, job
    assert job.get("InstancesCount", sent) == sent, job
    assert late.count("instance.duplicate") + late.count("instance.not_analysed") == sent, late
    for kind in ("tomosynthesis", "dose_report", "presentation_state", "structured_report",
                 "secondary_capture"):
        assert f"kind={kind}" in late, kind
    assert "status=0x" not in late and "instance.quarantined" not in late
    assert "study.reopened" not in node_log and "study.complete" not in late
    assert node_log.count("analysis.done") == 1
    assert json.loads(status)["studies"] == {"done": 1}
