"""Output kinds end to end: one real node, destinations that each want other kinds.

dcmtk storescu sends a four-view study to the node (a real process); two dcmtk storescp
destinations and an Orthanc receive exactly the kinds configured for them. What arrives is
checked with dciodvfy, dsrdump and dcentvfy, and the Mammography CAD SR is read back against the
TID 1500 SR.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pydicom
import pydicom.errors
import pytest

from node.analysis.pipeline import AnalysisPipeline
from node.analysis.result import ImageInput
from node.config import ModelSettings
from node.kinds import SOP_CLASS_OF_KIND
from node.reports.codes import PRESENTATION_OPTIONAL, PRESENTATION_REQUIRED
from tests.netutil import REPO, NodeProcess, StoreSCP, storescu, wait_until
from tests.orthanc import Orthanc
from tests.srfindings import sr_findings
from tests.srread import read_cad_findings
from tests.testdata import mias_four_view
from tests.tools import dcentvfy_lines, dciodvfy_problems, dsrdump

pytestmark = [pytest.mark.dcmtk, pytest.mark.dicom3tools, pytest.mark.orthanc, pytest.mark.slow]

CARD = os.environ.get("MAMMO_NODE_TEST_CARD", str(REPO / "models/weights/calc-cluster-lite0.json"))


def operating_point_between_scores(study: list[Path]) -> float:
    """Run the shipped analysis here once and put the operating point in the widest gap between
    two of its cluster scores, so the CAD SR must mark some clusters Required and some Optional
    (no fragile constant: it follows whatever the model scores)."""
    pipeline = AnalysisPipeline(ModelSettings(card=Path(CARD), device="cpu"))
    inputs = []
    for path in study:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        inputs.append(ImageInput(path, ds.SOPInstanceUID, ds.SOPClassUID))
    analysis = pipeline.analyse(str(ds.StudyInstanceUID), inputs)
    # the operating point applies to P(malignant) for a model validated for classification,
    # to the cluster score otherwise (the shipped card)
    validated = analysis.model.classification_validated
    scores = sorted(f.probability if validated else f.detection_score
                    for f in analysis.findings)
    assert len(scores) >= 2, "the test study needs at least two clusters"
    gap, low = max((b - a, a) for a, b in zip(scores, scores[1:], strict=False))
    assert gap > 1e-3, scores
    return round(low + gap / 2, 6)


def received(dest: StoreSCP, expected: Counter, timeout: float = 300) -> list[Path]:
    """The files at ``dest`` once it holds exactly ``expected`` SOP classes (and has finished
    writing them)."""
    def ready():  # type: ignore[no-untyped-def]
        files = dest.files()
        try:
            got = Counter(str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID)
                          for f in files)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError,
                AttributeError):
            return None
        return files if got == expected else None

    wait_until(ready, timeout, 1.0, f"{dict(expected)} at {dest.out_dir.name}")
    sizes = None
    while sizes != (sizes := [(f, f.stat().st_size) for f in dest.files()]):
        time.sleep(0.5)
    return [f for f, _ in sizes]


def test_each_destination_gets_its_kinds(tmp_path: Path) -> None:
    study = mias_four_view(tmp_path / "study")
    op = operating_point_between_scores(study)
    sr_dest = StoreSCP(tmp_path / "mammo_ws", "MAMMO_WS").start()
    pr_dest = StoreSCP(tmp_path / "viewer", "VIEWER").start()
    pacs = Orthanc(tmp_path / "orthanc").start()
    node = NodeProcess(
        tmp_path / "node",
        [{**sr_dest.destination("mammo_ws"), "objects": ["tid1500", "mammo_cad"]},
         {**pr_dest.destination("viewer"), "objects": ["gsps", "sc"]},
         {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port,
          "objects": ["tid1500", "mammo_cad", "gsps", "sc"]}],
        study={"stable_seconds": 600, "complete_on_four_views": True},
        output={"objects": ["tid1500"], "cad_operating_point": op},
    ).start()
    kind = SOP_CLASS_OF_KIND
    try:
        assert storescu(node.port, study).returncode == 0
        sr_files = received(sr_dest, Counter({kind["tid1500"]: 1, kind["mammo_cad"]: 1}))
        pr_files = received(pr_dest, Counter({kind["gsps"]: 4, kind["sc"]: 4}))

        def in_orthanc() -> Counter | None:
            instances = pacs.get("/instances?expand") or []
            classes = Counter()
            for inst in instances:
                tags = pacs.get(f"/instances/{inst['ID']}/simplified-tags") or {}
                classes[tags.get("SOPClassUID", "")] += 1
            wanted = {kind["tid1500"]: 1, kind["mammo_cad"]: 1, kind["gsps"]: 4, kind["sc"]: 4}
            return classes if all(classes[k] == n for k, n in wanted.items()) else None

        orthanc_classes = wait_until(in_orthanc, 300, 2.0, "all kinds in Orthanc")
        time.sleep(3)  # nothing else may arrive afterwards
        sr_files, pr_files = sr_dest.files(), pr_dest.files()
        log = node.log()
    finally:
        node.stop()
        sr_dest.stop()
        pr_dest.stop()
        pacs.stop()
    # Exactly its kinds at each destination; Orthanc accepted and stored every kind.
    assert len(sr_files) == 2 and len(pr_files) == 8
    assert sum(orthanc_classes.values()) == 10
    assert log.count("delivery.sent") == 3
    # Validators on everything that arrived.
    for f in [*sr_files, *pr_files]:
        errors, _ = dciodvfy_problems(f)
        assert errors == [], f"{f.name}: {errors}"
    by_class = {str(pydicom.dcmread(f).SOPClassUID): f for f in sr_files}
    for cls in (kind["tid1500"], kind["mammo_cad"]):
        rc, out = dsrdump(by_class[cls])
        assert rc == 0 and not [ln for ln in out.splitlines() if ln.startswith("E:")], out
    conflicts = [ln for ln in dcentvfy_lines([*study, *sr_files, *pr_files])
                 if "AccessionNumber" not in ln]
    assert conflicts == [], conflicts
    # The CAD SR says what the TID 1500 SR says, and marks by the configured operating point.
    cad = read_cad_findings(pydicom.dcmread(by_class[kind["mammo_cad"]]))
    validated = "probability" in cad[0]
    key = "probability" if validated else "certainty"
    tid1500 = sorted((f.referenced_sop_instance_uid, round(f.score_percent, 2))
                     for f in sr_findings(by_class[kind["tid1500"]]))
    assert sorted((e["sop_instance_uid"], round(e[key], 2)) for e in cad) == tid1500
    intents = Counter(e["rendering_intent"] for e in cad)
    assert intents[PRESENTATION_REQUIRED.value] >= 1 and intents[PRESENTATION_OPTIONAL.value] >= 1
    for e in cad:
        required = e[key] >= op * 100
        assert e["rendering_intent"] == (PRESENTATION_REQUIRED if required
                                         else PRESENTATION_OPTIONAL).value
