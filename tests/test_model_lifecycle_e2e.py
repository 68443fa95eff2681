"""The model lifecycle on a running node (a real process, storescu in, storescp out):
install -> shadow -> compare -> activate (no restart, work queued meanwhile) -> outcomes ->
live metrics, as models/README.md walks through it."""

from __future__ import annotations

import json
import re
import sqlite3
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from models.card import ModelCard
from tests.modelfixtures import SHIPPED_CARD, variant_card
from tests.netutil import NodeProcess, StoreSCP, free_port, storescu, wait_until
from tests.smallstudies import small_study

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

SR = "1.2.840.10008.5.1.4.1.1.88.33"
LOW = "calc-cluster-lite0-low"
SHIPPED_VERSION = ModelCard.load(SHIPPED_CARD).version


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as rsp:
        return rsp.read().decode()


def _srs(dest: StoreSCP) -> list[pydicom.Dataset]:
    out = []
    for f in dest.files():
        try:
            ds = pydicom.dcmread(f)
        except Exception:  # noqa: BLE001 - storescp still writing it
            continue
        if ds.SOPClassUID == SR:
            out.append(ds)
    return out


def _texts(ds: pydicom.Dataset) -> str:
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out.append(_texts(item))
    return " ".join(out)


def _query(node: NodeProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'node.sqlite3'}?mode=ro", uri=True,
                          timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _results(node: NodeProcess) -> dict[str, str]:
    """Study UID -> name of the model of its result; checks every key against that model."""
    import hashlib

    rows = _query(node, "SELECT j.input_key, r.analysis_key, r.summary, s.study_uid FROM "
                        "results r JOIN jobs j ON j.id = r.job_id JOIN studies s ON "
                        "s.id = r.study_id")
    ran = {}
    for input_key, key, summary, uid in rows:
        m = json.loads(summary)["model"]
        assert uid not in ran  # one result per study
        ran[uid] = m["name"]
        text = "|".join([input_key, m["name"], m["version"], "tf_efficientnet_lite0",
                         f"{THRESHOLD:.6f}"])
        assert key == hashlib.sha256(text.encode()).hexdigest()
    return ran


THRESHOLD = json.loads((Path(__file__).resolve().parents[1] /
                        "models/weights/calc-cluster-lite0.json").read_text())["threshold"]


def _uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_install_shadow_compare_activate_outcomes(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    dest = StoreSCP(tmp_path / "dest").start()
    http = free_port()
    sections = {"study": {"stable_seconds": 600, "complete_on_four_views": True},
                "http": {"enabled": True, "host": "127.0.0.1", "port": http,
                         "refresh_seconds": 0}}
    node = NodeProcess(tmp_path / "node", [dest.destination()], **sections)
    base = f"http://127.0.0.1:{http}"
    # the variant keeps the card's threshold: both models call at THRESHOLD
    card = variant_card(tmp_path / "cards", LOW, "0.2.0", logit_shift=-1.5)
    study1, study9 = (small_study(tmp_path / f"s{i}", i, tag="e2e") for i in (1, 9))
    burst = {i: small_study(tmp_path / f"b{i}", i, tag="e2e") for i in (3, 5, 7)}
    try:
        out = node.cli("model", "install", str(card))
        assert out.returncode == 0 and "installed in" in out.stdout, out.stderr
        out = node.cli("model", "shadow", LOW)
        assert out.returncode == 0 and "runs in shadow mode" in out.stdout, out.stderr
        # the 4th analysis kills this process (step 4)
        monkeypatch.setenv("MAMMO_NODE_FAULTS", "analysis.running:4")
        node.start()
        # 1. a study: the active (shipped) model's result is delivered, the shadow's stored
        assert storescu(node.port, study1).returncode == 0
        wait_until(lambda: len(dest.files()) >= 5 and _srs(dest), 180, 1.0, "the result")
        wait_until(lambda: _query(node, "SELECT state FROM shadow_runs") == [("done",)], 120,
                   1.0, "the shadow run")
        time.sleep(3)
        assert len(dest.files()) == 5  # 1 SR + 4 SC: nothing of the shadow model
        (sr1,) = _srs(dest)
        assert "calc-cluster-lite0" in _texts(sr1) and LOW not in _texts(sr1)
        (relpath,) = _query(node, "SELECT relpath FROM shadow_runs")[0]
        doc = json.loads((node.data_dir / relpath).read_text())
        assert doc["shadow"] is True and doc["model"]["name"] == LOW and doc["findings"]
        page = _get(base + "/")
        assert re.search(r'class="model-active"><td>active</td><td>calc-cluster-lite0</td>',
                         page)
        assert re.search(rf'class="model-shadow"><td>shadow</td><td>{LOW}</td>', page)
        assert "Shadow runs: queued 0, running 0, done 1" in page
        text = _get(base + "/metrics")
        assert re.search(rf'mammo_model_info{{model="{LOW}",role="shadow",source="installed",'
                         r'version="0.2.0"} 1.0', text)
        assert 'mammo_shadow_runs{state="done"} 1.0' in text
        # 2. compare: the shifted logit lowers every probability
        out = node.cli("model", "compare", "--json")
        assert out.returncode == 0, out.stderr
        cmp = json.loads(out.stdout)
        assert (cmp["active"], cmp["shadow"]) == (f"calc-cluster-lite0:{SHIPPED_VERSION}",
                                                  f"{LOW}:0.2.0")
        assert cmp["studies"] == 1 and cmp["breasts"] == 2
        assert cmp["per_finding"]["pairs"] == len(doc["findings"])
        assert cmp["per_finding"]["shadow_only_malignant"] == 0
        text_out = node.cli("model", "compare").stdout
        assert "agreement per breast" in text_out and "paired analyses: 1 studies" in text_out
        # 3. activate on the running node: no restart; the next study runs on it
        out = node.cli("model", "activate", f"{LOW}:0.2.0")
        assert out.returncode == 0 and "was the shadow model" in out.stdout, out.stderr
        wait_until(lambda: "model.activated" in node.log(), 60, 0.5, "the switch")
        assert storescu(node.port, study9).returncode == 0
        wait_until(lambda: len(_srs(dest)) >= 2, 180, 1.0, "the second SR")
        assert _results(node)[_uid(study9)] == LOW
        page = _get(base + "/")
        assert re.search(rf'class="model-active"><td>active</td><td>{LOW}</td>', page)
        assert 'class="model-shadow"><td>shadow</td><td colspan="8">off' in page
        # 4. three studies; the node dies at the start of the second one's analysis (the
        #    third queued or arriving), is back on [model] card while down, and restarts
        storescu(node.port, [p for i in (3, 5, 7) for p in burst[i]])
        wait_until(lambda: node.proc.poll() is not None, 180, 0.5, "the planned SIGKILL")
        node.stop()
        out = node.cli("model", "activate", "--default")
        assert out.returncode == 0 and "is active again" in out.stdout, out.stderr
        monkeypatch.delenv("MAMMO_NODE_FAULTS")
        node = NodeProcess(tmp_path / "node", [dest.destination()], node={"port": node.port},
                           **sections).start()
        # what the PACS does after a failed association: send again (stored ones are kept)
        assert storescu(node.port, [p for i in (3, 5, 7) for p in burst[i]]).returncode == 0
        wait_until(lambda: len(_srs(dest)) >= 5, 240, 1.0, "five SRs")
        wait_until(lambda: _query(node, "SELECT state, count(*) FROM jobs GROUP BY state")
                   == [("done", 5)], 120, 1.0, "five jobs done")
        time.sleep(3)
        srs = _srs(dest)
        assert len(srs) == 5 and len({s.StudyInstanceUID for s in srs}) == 5  # once each
        ran = _results(node)
        assert ran == {_uid(study1): "calc-cluster-lite0", _uid(study9): LOW,
                       _uid(burst[3]): LOW, _uid(burst[5]): "calc-cluster-lite0",
                       _uid(burst[7]): "calc-cluster-lite0"}
        by_uid = {s.StudyInstanceUID: s for s in srs}
        for uid, name in ran.items():  # each SR names the model that ran
            assert name in _texts(by_uid[uid]) and (name == LOW) == (LOW in _texts(by_uid[uid]))
        # 5. outcomes by accession number -> live sensitivity / specificity / AUC
        outcomes = tmp_path / "outcomes.csv"
        outcomes.write_text("accession_number,laterality,outcome,date\n"
                            "ACCE2E0001,R,malignant,2026-02-01\n"
                            "ACCE2E0001,L,negative,2027-01-05\n"
                            "ACCE2E0009,B,negative,2027-01-05\n"
                            "ACCNOSUCH1,R,malignant,2026-02-01\n")
        out = node.cli("outcomes", "import", str(outcomes))
        assert out.returncode == 0, out.stderr
        assert "4 rows; 4 linked to 2 studies" in out.stdout
        assert "line 5: accession number not found" in out.stdout
        text = _get(base + "/metrics")
        for version, name, n_pos, n_neg in ((SHIPPED_VERSION, "calc-cluster-lite0", 1, 1),
                                            ("0.2.0", LOW, 1, 3)):
            assert re.search(rf'mammo_model_outcome_breasts{{model="{name}",role="\w+",'
                             rf'truth="malignant",version="{version}"}} {n_pos}.0', text)
            assert re.search(rf'mammo_model_outcome_breasts{{model="{name}",role="\w+",'
                             rf'truth="negative",version="{version}"}} {n_neg}.0', text)
            assert re.search(rf'mammo_model_auc{{model="{name}",role="\w+",'
                             rf'version="{version}"}} [\d.]+', text)
        assert "Live performance" in _get(base + "/")
    finally:
        node.stop()
        dest.stop()
    log = node.log()
    assert "shadow.done" in log and "model.activated" in log and "worker.recovered" in log
    assert "ACCE2E" not in log and "ACCNOSUCH" not in log
