"""The compose file's monitoring: Debian's Prometheus scrapes a running node with the shipped
scrape config (docker/prometheus/prometheus.yml, only the target's address replaced), and every
query of the shipped Grafana dashboard is valid PromQL that Prometheus evaluates and names
metrics the node exports.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.netutil import (
    REPO,
    NodeProcess,
    StoreSCP,
    free_port,
    storescu,
    wait_for_port,
    wait_until,
)
from tests.smallstudies import small_study
from tests.tools import require_binary

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

DOCKER = REPO / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "mammo-node.json"
_METRIC = re.compile(r"\b(mammo_[a-z_]+)")


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_grafana_provisioning_is_consistent() -> None:
    source = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml")
                            .read_text())
    (ds,) = source["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/mammo-node.yml")
                              .read_text())
    (prov,) = provider["providers"]
    assert prov["options"]["path"] == "/var/lib/grafana/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {ds["uid"]}
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "stage", "queue", "failures per destination", "model scores"):
        assert topic in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as rsp:
        return json.loads(rsp.read())


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status == 200
    except urllib.error.HTTPError as exc:
        if exc.code == 503:  # still starting
            return False
        raise
    except urllib.error.URLError:
        return False


def test_prometheus_scrapes_node_and_dashboard_queries_evaluate(tmp_path: Path) -> None:
    exe = require_binary("prometheus")
    dest = StoreSCP(tmp_path / "dest").start()
    http_port = free_port()
    node = NodeProcess(tmp_path / "node", [dest.destination("pacs")],
                       http={"enabled": True, "host": "127.0.0.1", "port": http_port}).start()
    prom_port = free_port()
    shipped = (DOCKER / "prometheus" / "prometheus.yml").read_text()
    assert shipped.count('"node:8080"') == 1
    config = tmp_path / "prometheus.yml"
    config.write_text(shipped.replace('"node:8080"', f'"127.0.0.1:{http_port}"'))
    prom = None
    try:
        # One study through the node, so that every histogram has samples.
        assert storescu(node.port, small_study(tmp_path / "in", 1, tag="prom")).returncode == 0
        wait_until(lambda: len(dest.files()) >= 5, 180, 1.0, "results delivered")
        with open(tmp_path / "prometheus.log", "wb") as plog:
            prom = subprocess.Popen(
                [exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=plog, stderr=subprocess.STDOUT)
            wait_for_port(prom_port, 60, prom)
            # Prometheus opens its port before its storage is ready and answers 503 until then.
            wait_until(lambda: _ready(f"http://127.0.0.1:{prom_port}/-/ready"), 60, 0.5,
                       "Prometheus ready")
            api = f"http://127.0.0.1:{prom_port}/api/v1"

            def scraped() -> dict | None:
                targets = _get(api + "/targets")["data"]["activeTargets"]
                up = [t for t in targets if t["health"] == "up"]
                return up[0] if up else None

            target = wait_until(scraped, 60, 1.0, "Prometheus scraping the node")
            names = set(_get(api + "/label/__name__/values")["data"])
            results = {}
            for expr in dashboard_queries():
                q = urllib.parse.urlencode({"query": expr})
                rsp = _get(f"{api}/query?{q}")
                assert rsp["status"] == "success", (expr, rsp)
                results[expr] = rsp["data"]["result"]
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(30)
        node.stop()
        dest.stop()
    assert target["labels"]["job"] == "mammo-node"
    # Every metric a query names is one the node exported to Prometheus.
    named = {m for expr in dashboard_queries() for m in _METRIC.findall(expr)}
    missing = sorted(m for m in named if m not in names)
    assert missing == [], missing
    assert {"mammo_stage_duration_seconds_bucket", "mammo_finding_probability_bucket",
            "mammo_delivery_duration_seconds_bucket"} <= names
    # Gauges answer at once (no rate window needed).
    assert results["mammo_queue_depth"][0]["value"][1] == "0"
    assert results['mammo_database_up'][0]["value"][1] == "1"
