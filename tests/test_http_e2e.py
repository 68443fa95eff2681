"""Monitoring end to end: a node process with [http] on, storescu sends a study (and a refused
object), /metrics is scraped before, during and after, /health is read, and the status page is
rendered by a real headless browser (Debian's chromium): a screenshot and its DOM.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from tests.netutil import NodeProcess, StoreSCP, free_port, storescu, wait_until
from tests.testdata import mias_to_mg
from tests.tools import require_binary

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray For Presentation


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, text = _get(base + "/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = require_binary("chromium")
    # --no-sandbox: the test may run as root (CI containers), where the sandbox cannot start.
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, HOME=os.environ.get("HOME", "/")))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_metrics_health_and_status_page_during_a_real_run(tmp_path: Path) -> None:
    good = tmp_path / "in" / "mdb209.dcm"
    ds = mias_to_mg("mdb209", good)
    study_uid = str(ds.StudyInstanceUID)
    # A Digital X-Ray whose Modality is not MG: accepted at negotiation, refused 0xC001.
    bad = tmp_path / "in" / "not-mg.dcm"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.save_as(bad, enforce_file_format=True)

    dest = StoreSCP(tmp_path / "dest").start()
    down_port = free_port()  # nothing listens there: every attempt fails
    http_port = free_port()
    node = NodeProcess(
        tmp_path / "node",
        [dest.destination("pacs"),
         {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": down_port}],
        http={"enabled": True, "host": "127.0.0.1", "port": http_port, "refresh_seconds": 0},
        delivery={"max_attempts": 1, "backoff_initial_seconds": 1, "backoff_max_seconds": 1},
    ).start()
    base = f"http://127.0.0.1:{http_port}"
    shot = tmp_path / "status.png"
    try:
        wait_until(lambda: _get(base + "/health")[0] == 200, 60, 0.5, "/health 200")
        before = _scrape(base)
        res = storescu(node.port, [good, bad])
        assert "Received Store Response (Success)" in res.stdout + res.stderr
        during = _scrape(base)  # the study is received; its analysis runs or waits

        def delivered() -> dict | None:
            m = _scrape(base)
            done = m.get(("mammo_destination_last_success_timestamp_seconds",
                          (("destination", "pacs"),)))
            failed = m.get(("mammo_deliveries", (("destination", "archive"),
                                                 ("state", "failed"))))
            return m if done and failed == 1 else None

        after = wait_until(delivered, 400, 1.0, "delivery done to pacs and failed to archive")
        code, body = _get(base + "/health")
        health = json.loads(body)
        url = base + "/"
        dom = chromium("--dump-dom", url)
        png = chromium(f"--screenshot={shot}", "--window-size=1400,900", url)
    finally:
        node.stop()
        dest.stop()

    def delta(m: dict, name: str, labels: tuple = ()) -> float:
        return m.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    # Counters moved with the traffic, and the gauges describe the database.
    assert delta(during, "mammo_instances_received_total") == 1
    assert delta(during, "mammo_instances_rejected_total", (("reason", "not_mammogram"),)) == 1
    assert during[("mammo_studies", (("state", "receiving"),))] + sum(
        during.get(("mammo_studies", (("state", st),)), 0)
        for st in ("complete", "analysing", "done")) == 1
    assert delta(after, "mammo_analysis_duration_seconds_count") == 1
    assert after[("mammo_analysis_duration_seconds_sum", ())] > 0
    assert delta(after, "mammo_rois_per_study_count") == 1
    # Each kind goes as soon as it is written: one attempt per pass that sent something to
    # pacs, so one or two for its two kinds (SR, SC); the closing pass that finds nothing left
    # to send is no attempt.
    assert 1 <= delta(after, "mammo_delivery_attempts_total", (("destination", "pacs"),)) <= 2
    assert delta(after, "mammo_delivery_failures_total", (("destination", "pacs"),)) == 0
    assert delta(after, "mammo_delivery_failures_total", (("destination", "archive"),)) == 1
    assert after[("mammo_studies", (("state", "done"),))] == 1
    assert after[("mammo_queue_depth", ())] == 0
    assert after[("mammo_disk_free_bytes", ())] > 0
    assert ("mammo_destination_last_success_timestamp_seconds",
            (("destination", "archive"),)) not in after
    assert after[("mammo_deliveries", (("destination", "pacs"), ("state", "pending")))] == 0

    assert code == 200 and health["ok"] is True
    assert health["checks"]["listener"]["ok"] and health["checks"]["database"]["ok"]
    assert health["destinations"]["pacs"]["last_success"] is not None
    assert health["destinations"]["archive"]["last_success"] is None
    assert "cannot connect" in health["destinations"]["archive"]["last_error"]

    # The browser rendered the page: the study, its state, and the failed delivery's error.
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert study_uid in html
    assert 'class="state-done">done<' in html
    assert "pacs: done" in html and "archive: failed" in html
    assert "cannot connect to 127.0.0.1:" in html
    assert png.returncode == 0, png.stderr[-2000:]
    assert _png_size(shot) == (1400, 900)
    assert shot.stat().st_size > 10_000  # a rendered table, not a blank page
