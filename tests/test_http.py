"""The monitoring server in-process: real database, real spool, real HTTP over loopback.

The end-to-end version (a node process, storescu, chromium) is tests/test_http_e2e.py.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node import health, metrics, status_page
from node.config import ConfigError, parse_settings
from node.db import Database, Delivery, Instance, Job, Result, Series, Study, utcnow
from node.httpd import MonitoringServer
from node.store import Spool


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as rsp:
            return rsp.status, rsp.headers["Content-Type"], rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _study(db: Database, uid: str, *, state: str = "done", deliveries: dict[str, str] = (),
           error: str | None = None, rois: int = 2, p: float | None = 0.734) -> None:
    now = utcnow()
    with db.session() as s:
        st = Study(study_uid=uid, state=state, created_at=now - dt.timedelta(seconds=40),
                   last_received_at=now - dt.timedelta(seconds=35),
                   completed_at=now - dt.timedelta(seconds=30))
        s.add(st)
        s.flush()
        se = Series(study_id=st.id, series_uid=uid + ".1", modality="MG")
        s.add(se)
        s.flush()
        s.add(Instance(study_id=st.id, series_id=se.id, sop_uid=uid + ".1.1",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2", transfer_syntax="1.2",
                       relpath="x", size=1, sha256="0" * 64))
        job = Job(study_id=st.id, generation=1, input_key=uid, state="done")
        s.add(job)
        s.flush()
        if state == "done":
            r = Result(study_id=st.id, job_id=job.id, analysis_key=uid, roi_count=rois,
                       max_probability=p, analysis_ms=5210.0)
            s.add(r)
            s.flush()
            for name, dstate in dict(deliveries).items():
                s.add(Delivery(result_id=r.id, destination=name, state=dstate, attempts=1,
                               sent_at=now if dstate == "done" else None,
                               last_error=error if dstate != "done" else None,
                               last_status=None))


def test_status_page_lists_studies_and_failed_deliveries_escaped(db: Database) -> None:
    _study(db, "1.2.3.4", deliveries={"pacs": "done", "archive": "failed"},
           error="cannot connect to <archive>:104")
    _study(db, "1.2.3.5", state="analysing")
    page = status_page.render(db, ae_title="MAMMO_AI", version="0.1.0", limit=50)
    assert "1.2.3.4" in page and "1.2.3.5" in page
    assert "73.4 %" in page and ">2<" in page  # highest probability, ROI count
    assert "pacs: done" in page and "archive: failed" in page
    # Peer-controlled text is escaped, never interpreted as markup.
    assert "cannot connect to &lt;archive&gt;:104" in page and "<archive>" not in page
    assert 'http-equiv="refresh" content="10"' in page
    assert status_page.render(db, ae_title="X", version="v", limit=1).count('class="study"') == 1


def test_metrics_report_state_from_the_database(db: Database, tmp_path: Path) -> None:
    _study(db, "1.2.3.4", deliveries={"pacs": "done", "archive": "failed"}, error="down")
    _study(db, "1.2.3.5", state="receiving")
    metrics.bind(db, tmp_path, ["pacs", "archive", "unused"])
    before = _samples(metrics.render().decode())
    metrics.instance_received()
    metrics.instance_rejected(0xC001)
    metrics.delivery_attempt("archive", ok=False)
    metrics.analysis_done(4.2, 3)
    m = _samples(metrics.render().decode())
    assert m[("mammo_studies", (("state", "done"),))] == 1
    assert m[("mammo_studies", (("state", "receiving"),))] == 1
    assert m[("mammo_deliveries", (("destination", "archive"), ("state", "failed")))] == 1
    assert m[("mammo_deliveries", (("destination", "unused"), ("state", "pending")))] == 0
    assert ("mammo_destination_last_success_timestamp_seconds",
            (("destination", "pacs"),)) in m
    assert m[("mammo_disk_free_bytes", ())] > 0
    assert m[("mammo_database_up", ())] == 1
    assert m[("mammo_queue_depth", ())] == 0

    def delta(name: str, labels: tuple = ()) -> float:
        return m[(name, labels)] - before.get((name, labels), 0.0)

    assert delta("mammo_instances_received_total") == 1
    assert delta("mammo_instances_rejected_total", (("reason", "not_mammogram"),)) == 1
    assert delta("mammo_delivery_failures_total", (("destination", "archive"),)) == 1
    assert delta("mammo_analysis_duration_seconds_count") == 1
    assert delta("mammo_rois_per_study_sum") == 3


def test_server_routes_health_503_and_404(db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    metrics.bind(db, spool.root, [])
    min_free = {"mb": 1.0}
    server = MonitoringServer(
        "127.0.0.1", 0,
        health=lambda: health.health(host="127.0.0.1", port=11112, listening=True, db=db,
                                     spool=spool, min_free_mb=min_free["mb"],
                                     destinations=["pacs"]),
        status_page=lambda: status_page.render(db, ae_title="MAMMO_AI", version="t"))
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        code, ctype, body = _get(base + "/health")
        assert code == 200 and ctype == "application/json"
        report = json.loads(body)
        assert report["ok"] is True
        assert set(report["checks"]) == {"listener", "database", "disk"}
        assert report["destinations"]["pacs"]["last_success"] is None
        min_free["mb"] = 1e12  # no disk has a petabyte free: the node would refuse C-STOREs
        code, _, body = _get(base + "/health")
        assert code == 503 and json.loads(body)["checks"]["disk"]["ok"] is False
        code, ctype, body = _get(base + "/metrics")
        assert code == 200 and ctype.startswith("text/plain") and "mammo_disk_free_bytes" in body
        code, ctype, body = _get(base + "/")
        assert code == 200 and ctype.startswith("text/html") and "No studies" in body
        assert _get(base + "/nothing")[0] == 404
    finally:
        server.stop()


def test_port_in_use_stops_start_up_with_a_clear_message(db: Database) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            MonitoringServer("127.0.0.1", port, health=lambda: (True, {}),
                             status_page=lambda: "")
    server = MonitoringServer("127.0.0.1", 0, health=lambda: (True, {}), status_page=lambda: "")
    server.stop()  # never started: must not wait for a serve loop


def test_health_reports_database_down(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'missing-dir' / 'node.sqlite3'}")
    ok, report = health.health(host="0.0.0.0", port=11112, listening=False, db=db, spool=spool,
                               min_free_mb=0, destinations=[])
    assert not ok
    assert report["checks"]["database"]["ok"] is False
    assert report["checks"]["listener"]["ok"] is False


def test_http_config_keys(tmp_path: Path) -> None:
    s = parse_settings({}, tmp_path)
    assert (s.http.enabled, s.http.host, s.http.port) == (False, "127.0.0.1", 8080)
    s = parse_settings({"http": {"enabled": True, "port": 9100}}, tmp_path)
    assert s.http.enabled and s.http.port == 9100
    with pytest.raises(ConfigError, match="http.port"):
        parse_settings({"http": {"port": 0}}, tmp_path)
    with pytest.raises(ConfigError, match="http.bogus"):
        parse_settings({"http": {"bogus": 1}}, tmp_path)
