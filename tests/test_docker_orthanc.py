"""The compose deployment's Orthanc files, run with Debian's Orthanc: auto-routing for real.

A modality (dcmtk storescu) sends a four-view MG study to Orthanc. Orthanc, configured with
docker/orthanc/orthanc.json and docker/orthanc/autorouting.lua (the very files the compose file
mounts; only site.json is replaced, by one with this test's ports and folders), routes the stable
study to the node by itself; the node's SR and Secondary Captures land in Orthanc's copy of the
study. No test code sits between Orthanc and the node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from node.testdata import mias_four_view
from tests.netutil import REPO, NodeProcess, storescu, wait_until
from tests.orthanc import DeployedOrthanc

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]

ORTHANC_DIR = REPO / "docker" / "orthanc"
SHARED = ["orthanc.json", "autorouting.lua"]


def test_orthanc_routes_stable_mg_study_to_node_and_files_results(tmp_path: Path) -> None:
    study = mias_four_view(tmp_path / "study")
    # Long quiet timer on the node: it completes on the four views, as in production.
    node = NodeProcess(tmp_path / "node", study={"stable_seconds": 600})
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
                       study={"stable_seconds": 600}).start()
    try:
        res = storescu(pacs.dicom_port, study, aet="ORTHANC", calling="MODALITY")
        assert res.returncode == 0, res.stderr
        studies = pacs.get("/studies")
        assert len(studies) == 1
        study_id = studies[0]

        counts = wait_until(lambda: pacs.ai_results(study_id), 400, 2.0,
                            "1 SR + 4 SC in Orthanc's study")
        # The results made the study stable again: the script must not send them (or the
        # mammograms) back to the node. Wait past StableAge and check nothing else arrived.
        time.sleep(8)
        series = pacs.get(f"/studies/{study_id}/series")
        metadata = pacs.get(f"/studies/{study_id}/metadata/MammoRoutedInstances")
        orthanc_log = (tmp_path / "orthanc" / "orthanc.log").read_text(errors="replace")
        node_log = node.log()
    finally:
        node.stop()
        pacs.stop()
    assert counts["AI calcification analysis"] == 1 and counts["AI Grad-CAM"] == 4
    # Filed in the study Orthanc received from the modality: 4 MG series + SR + SC.
    assert len(series) == 4 + 2
    modalities = sorted(s["MainDicomTags"].get("Modality") for s in series)
    assert modalities.count("SR") == 1
    # Routed once, by the Lua script, not by this test.
    assert metadata == 4
    assert orthanc_log.count("mammo-node: routing study") == 1, orthanc_log[-3000:]
    assert node_log.count("analysis.done") == 1
    assert node_log.count("instance.stored") == 4
    assert "peer_aet=ORTHANC" in node_log
