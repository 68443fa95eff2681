"""The compose deployment's Orthanc and viewer files, run with Debian's Orthanc, its DICOMweb
plugin, Debian's nginx and the OHIF build: auto-routing for real, then a radiologist's look.

A modality (dcmtk storescu) sends a four-view MG study to Orthanc. Orthanc, configured with
docker/orthanc/orthanc.json and docker/orthanc/autorouting.lua (the very files the compose file
mounts; only site.json is replaced, by one with this test's ports and folders), routes the stable
study to the node by itself; the node's SR and Secondary Captures land in Orthanc's copy of the
study. No test code sits between Orthanc and the node.

Then the viewer (docker/viewer/: nginx.conf.template, app-config.js and the OHIF build that
docker/viewer/install-ohif.sh installs) is opened in headless Chromium over the DevTools protocol:
the study list, the four mammograms (not black), the SR loaded into OHIF's Measurements panel with
one row per finding of the SR and its label, and each row jumping to its image with the outline
drawn. Screenshots are kept in test-artifacts/ohif/.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.cdp import Browser, CDPError
from tests.netutil import REPO, NodeProcess, storescu, wait_until
from tests.orthanc import DICOMWEB_PLUGIN, DeployedOrthanc, require_dicomweb_plugin
from tests.srfindings import sr_findings
from tests.testdata import mias_four_view
from tests.viewer import Viewer, basic, ohif_dist

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]

ORTHANC_DIR = REPO / "docker" / "orthanc"
SHARED = ["orthanc.json", "autorouting.lua"]
ARTIFACTS = REPO / "test-artifacts" / "ohif"
SR_SERIES = "AI calcification analysis"


@dataclass
class Deployment:
    pacs: DeployedOrthanc
    node: NodeProcess
    study_id: str
    study_uid: str
    counts: dict[str, int]
    series: list[dict]
    metadata: object
    orthanc_log: str
    node_log: str
    workdir: Path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp_path = tmp_path_factory.mktemp("deployment")
    study = mias_four_view(tmp_path / "study")
    # Long quiet timer on the node: it completes on the four views, as in production.
    node = NodeProcess(tmp_path / "node", study={"stable_seconds": 600})
    compose_site = json.loads((ORTHANC_DIR / "site.json").read_text())
    users = {"admin": "test-admin", "viewer": "test-viewer"}
    site = {"StableAge": 2, "Plugins": [require_dicomweb_plugin()],
            "AuthenticationEnabled": True, "RegisteredUsers": users,
            "DicomModalities": {"mammo": {"AET": "MAMMO_AI", "Host": "127.0.0.1",
                                          "Port": node.port}}}
    pacs = DeployedOrthanc(tmp_path / "orthanc", ORTHANC_DIR, SHARED, site)
    # The test's site.json stands in for the compose one key for key, nothing more.
    assert set(pacs.config()) <= set(compose_site), set(pacs.config()) - set(compose_site)
    assert str(DICOMWEB_PLUGIN).startswith("/usr/share/orthanc/plugins")
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
        study_uid = pacs.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
        yield Deployment(pacs, node, study_id, study_uid, counts, series, metadata,
                         (tmp_path / "orthanc" / "orthanc.log").read_text(errors="replace"),
                         node.log(), tmp_path)
    finally:
        node.stop()
        pacs.stop()


def test_orthanc_routes_stable_mg_study_to_node_and_files_results(deployment: Deployment) -> None:
    d = deployment
    assert d.counts["AI calcification analysis"] == 1 and d.counts["AI Grad-CAM"] == 4
    # Filed in the study Orthanc received from the modality: 4 MG series + SR + SC.
    assert len(d.series) == 4 + 2
    modalities = sorted(s["MainDicomTags"].get("Modality") for s in d.series)
    assert modalities.count("SR") == 1
    # Routed once, by the Lua script, not by this test.
    assert d.metadata == 4
    assert d.orthanc_log.count("mammo-node: routing study") == 1, d.orthanc_log[-3000:]
    assert d.node_log.count("analysis.done") == 1
    assert d.node_log.count("instance.stored") == 4
    assert "peer_aet=ORTHANC" in d.node_log


# -- the viewer -------------------------------------------------------------------------------
def _sr_file(d: Deployment, out: Path) -> Path:
    (sr_series,) = [s for s in d.series if s["MainDicomTags"].get("Modality") == "SR"]
    (instance,) = sr_series["Instances"]
    path = out / "sr.dcm"
    path.write_bytes(d.pacs.raw(f"/instances/{instance}/file"))
    return path


def _dismiss_onboarding(b: Browser) -> None:
    """OHIF's first-visit tour (its overlay takes every click until dismissed: mark it shown,
    as OHIF does once a reader has seen it) and its investigational-use banner."""
    b.evaluate("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
    for label in ("Skip all", "Confirm and hide"):
        b.evaluate("(() => { const e = [...document.querySelectorAll('button, span, div')]"
                   f".find(e => e.textContent.trim() === {json.dumps(label)}"
                   " && e.children.length === 0); if (e) e.click(); return !!e; })()")


def _double_click_text(b: Browser, text: str) -> None:
    """Double-click a study-browser thumbnail by its series description (as a reader does)."""
    find = ("[...document.querySelectorAll('[data-cy=series-description-label]')]"
            f".find(e => e.textContent.trim() === {json.dumps(text)})")
    box = b.wait_for(f"(() => {{ const e = {find}; if (!e) return null;"
                     " const r = e.getBoundingClientRect();"
                     " return [r.x + r.width / 2, r.y + r.height / 2]; })()",
                     30, f"the {text!r} thumbnail")
    for count in (1, 2):
        for kind in ("mousePressed", "mouseReleased"):
            b.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                   clickCount=count)


def _open_measurements_panel(b: Browser) -> None:
    panel = "!!document.querySelector('[data-cy=trackedMeasurements-panel]')"
    for _attempt in range(5):
        if b.evaluate(panel):
            return
        b.click_selector("[data-cy=trackedMeasurements-btn]")
        with contextlib.suppress(CDPError):
            b.wait_for(panel, 5, "the Measurements panel")
            return
    raise CDPError("the Measurements panel does not open")


VIEWPORT_STATE = """(() => {
  const grid = document.querySelector('[data-cy=viewport-grid]') || document.body;
  const overlay = [...grid.querySelectorAll('[data-cy=viewport-overlay-top-left]')]
    .map(e => e.innerText.replace(/\\s+/g, ' ').trim());
  const annotations = [...grid.querySelectorAll('svg [data-annotation-uid]')]
    .map(e => e.getAttribute('data-annotation-uid'));
  const canvas = grid.querySelector('canvas');
  const r = canvas ? canvas.getBoundingClientRect() : null;
  return {overlay, annotations: [...new Set(annotations)],
          canvas: r ? [r.x, r.y, r.width, r.height] : null};
})()"""

ROWS = """[...document.querySelectorAll('[data-cy^=measurement-table-row-]')].map(row => {
  const title = row.querySelector('[data-cy=data-row-title]');
  return {cy: row.getAttribute('data-cy'), title: title ? title.innerText.trim() : '',
          text: row.innerText};
})"""


@contextlib.contextmanager
def _screenshot_on_failure(b: Browser, path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            b.screenshot(path)
            path.with_suffix(".txt").write_text(
                b.evaluate("document.body.innerText") + "\n----\n" + "\n".join(b.console))
        raise


def _brightness(png: Path, box: list[float]) -> float:
    """Mean grey level of the screenshot inside ``box`` (x, y, w, h)."""
    img = Image.open(io.BytesIO(png.read_bytes())).convert("L")
    x, y, w, h = (int(v) for v in box)
    return float(np.asarray(img.crop((x, y, x + w, y + h))).mean())


def test_ohif_shows_every_finding_of_the_sr(deployment: Deployment) -> None:
    d = deployment
    ohif_dist()
    shots = ARTIFACTS
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    sr = _sr_file(d, shots)
    findings = sr_findings(sr)
    assert findings, "the node reported no finding on this study: nothing to look at"
    images = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID):
              pydicom.dcmread(p, stop_before_pixels=True)
              for p in (d.workdir / "study").glob("*.dcm")}
    expected_view = {uid: f"{ds.ImageLaterality} {ds.ViewPosition}" for uid, ds in images.items()}

    viewer = Viewer(d.workdir / "viewer", d.pacs.url, basic("viewer", "test-viewer"),
                    {"radiologist": "test-reader"}).start()
    try:
        with Browser(1600, 1000) as b, _screenshot_on_failure(b, shots / "failure.png"):
            # The study list: Orthanc answers OHIF's QIDO with the study description. Logging in
            # through the URL lets Chromium answer nginx's Basic challenge for every later
            # request, OHIF's web workers included (extra CDP headers do not reach those).
            b.navigate(viewer.url.replace("http://", "http://radiologist:test-reader@") + "/")
            b.wait_for("document.body.innerText.includes('Screening mammography')", 60,
                       "the study description in OHIF's study list")
            _dismiss_onboarding(b)
            b.screenshot(shots / "01-study-list.png")

            b.navigate(f"{viewer.url}/viewer?StudyInstanceUIDs={d.study_uid}")
            b.wait_for("document.querySelectorAll('[data-cy=series-description-label]').length"
                       " >= 6", 90, "the study's six series in the study browser")
            _dismiss_onboarding(b)
            state = b.wait_for(f"(() => {{ const s = {VIEWPORT_STATE}; "
                               "return s.canvas && s.overlay.length ? s : null; })()", 60,
                               "the first image")
            time.sleep(2)  # let the first frame finish rendering
            first = b.screenshot(shots / "02-first-image.png")
            # Not black: VOI LUT Function LINEAR in the images used to break OHIF's loader.
            assert _brightness(first, state["canvas"]) > 20

            b.wait_for("!!document.querySelector('[data-cy=trackedMeasurements-btn]')", 30,
                       "the Measurements panel button")
            _open_measurements_panel(b)
            # Load the SR: its findings land in the panel (app-config.js: no prompt).
            rows = None
            for _attempt in range(3):
                _double_click_text(b, SR_SERIES)
                with contextlib.suppress(CDPError):
                    rows = b.wait_for(f"(() => {{ const r = {ROWS}; return r.length >= "
                                      f"{len(findings)} ? r : null; }})()", 30,
                                      f"{len(findings)} measurements", interval=1.0)
                    break
            assert rows is not None, "the SR's findings never reached the Measurements panel"
            b.screenshot(shots / "03-measurements.png")
            # Every finding of the SR is one row, labelled as the SR labels it.
            assert len(rows) == len(findings), [r["title"] for r in rows]
            labels = sorted(f.label for f in findings)
            assert sorted(r["title"] for r in rows) == labels
            for row in rows:
                assert "Calcification Cluster" in row["text"]
                assert "Breast" in row["text"] and "363698007" not in row["text"]

            # Jump to each finding: its image comes up with the outline drawn on it.
            reached: dict[str, str] = {}
            by_label = {f.label: f for f in findings}
            for n, row in enumerate(rows):
                finding = by_label[row["title"]]
                want = expected_view[finding.referenced_sop_instance_uid]
                b.click_selector(f"[data-cy={row['cy']}] [data-cy=data-row-title]")
                state = b.wait_for(
                    f"(() => {{ const s = {VIEWPORT_STATE}; return s.overlay.some(o => "
                    f"o.endsWith({json.dumps(want)})) && s.annotations.length ? s : null; }})()",
                    30, f"{want} with its outline for {row['title']!r}")
                time.sleep(0.5)
                png = b.screenshot(shots / f"04-finding-{n + 1:02d}.png")
                assert _brightness(png, state["canvas"]) > 20
                on_image = sum(f.referenced_sop_instance_uid == finding.referenced_sop_instance_uid
                               for f in findings)
                assert len(state["annotations"]) >= on_image
                reached[finding.referenced_sop_instance_uid] = want
            assert set(reached) == {f.referenced_sop_instance_uid for f in findings}
            errors = [c for c in b.console if c.startswith("exception")
                      or "Error Boundary" in c]
            assert errors == [], errors
    finally:
        viewer.stop()
    print(f"OHIF: {len(findings)} findings on {len(reached)} image(s): "
          f"{sorted(reached.values())}; screenshots in {shots}")
