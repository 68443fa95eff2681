"""One output kind failing never withholds the others.

A node process builds every kind for two destinations: dcmtk storescp (the PACS) and a pynetdicom
SCP that refuses Secondary Captures (0xA900), over real associations. A failing GSPS builder is
planted (``MAMMO_NODE_FAULTS=build.gsps:1``, as a builder bug would fail). The PACS still gets
the TID 1500 SR, the CAD SR and the SCs; the other destination the two SRs. Both failures are
recorded with their reason (log line, ``mammo-node status``, status page, /metrics). After "the
upgrade" (the node restarted without the fault, the destination now accepting SCs),
``mammo-node retry`` rebuilds the GSPS with the same UIDs it would have had, and sends each
destination exactly what it lacked: nothing is sent twice.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

from node.reports.uids import ResultUIDs
from tests.netutil import NodeProcess, StoreSCP, free_port, storescu, wait_until
from tests.smallstudies import small_study

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

SR, CAD, SC, GSPS = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.50",
                     "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.11.1")


class PickySCP:
    """A destination that answers 0xA900 to Secondary Captures while ``refuse_sc`` is set."""

    def __init__(self) -> None:
        self.port = free_port()
        self.refuse_sc = True
        self.received: list[tuple[str, str]] = []  # (SOP Class, SOP Instance), in order
        self.lock = threading.Lock()
        ae = AE(ae_title="PICKY")
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, ev: evt.Event) -> int:
        sop_class = str(ev.request.AffectedSOPClassUID)
        if sop_class == SC and self.refuse_sc:
            return 0xA900
        with self.lock:
            self.received.append((sop_class, str(ev.request.AffectedSOPInstanceUID)))
        return 0x0000

    def classes(self) -> list[str]:
        with self.lock:
            return [c for c, _ in self.received]


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as rsp:
        return rsp.read().decode()


def _page(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as rsp:
        return rsp.read().decode()


def _received(pacs: StoreSCP) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for f in pacs.files():
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - still being written
            continue  # still being written
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def test_a_failing_kind_never_withholds_the_others_and_retry_rebuilds_it(
        tmp_path: Path) -> None:
    study = small_study(tmp_path / "study", 1, tag="isolation")
    pacs = StoreSCP(tmp_path / "pacs").start()
    picky = PickySCP()
    http_port = free_port()
    kinds = ["tid1500", "mammo_cad", "sc", "gsps"]
    destinations = [{**pacs.destination("pacs"), "objects": kinds},
                    {"name": "picky", "ae_title": "PICKY", "host": "127.0.0.1",
                     "port": picky.port, "objects": kinds}]
    node = NodeProcess(tmp_path / "node", destinations,
                       study={"stable_seconds": 600, "complete_on_four_views": True},
                       http={"enabled": True, "port": http_port})
    os.environ["MAMMO_NODE_FAULTS"] = "build.gsps:1"  # the node process inherits it
    try:
        node.start()
    finally:
        del os.environ["MAMMO_NODE_FAULTS"]
    try:
        assert storescu(node.port, study).returncode == 0
        wait_until(lambda: len(_received(pacs).get(SC, [])) == 4 and
                   sorted(picky.classes()) == sorted([SR, CAD]), 300, 1.0,
                   "SRs and SCs at the PACS, SRs at the picky destination")
        wait_until(lambda: "delivery.kind_failed" in node.log(), 60, 0.5, "SC refusal logged")
        got = _received(pacs)
        assert len(got[SR]) == 1 and len(got[CAD]) == 1 and GSPS not in got
        log = node.log()
        assert re.search(r"output\.failed .*kind=gsps .*planted failure", log)
        assert re.search(r"delivery\.kind_failed destination=picky .*kind=sc .*0xA900", log)
        status = json.loads(node.cli("status", "--json").stdout)
        failed = {(f["stage"], f["kind"], f.get("destination")) for f in status["failed_outputs"]}
        assert failed == {("build", "gsps", None), ("delivery", "sc", "picky")}
        assert any("planted failure" in f["error"] for f in status["failed_outputs"])
        text = node.cli("status").stdout
        assert "gsps (build)" in text and "sc (delivery -> picky)" in text
        page = _page(http_port)
        assert "Failed output kinds (2)" in page and "planted failure" in page
        metrics = _metrics(http_port)
        assert 'mammo_output_build_failures_total{kind="gsps"} 1.0' in metrics
        assert 'mammo_output_kinds_failed{kind="gsps",stage="build"} 1.0' in metrics
        assert 'mammo_delivery_kind_failures_total{destination="picky",kind="sc"} 1.0' in metrics
    finally:
        node.stop()

    # "The upgrade": the builder works again, the destination takes SCs now.
    picky.refuse_sc = False
    sent_before = len(picky.received)
    node.start()
    try:
        out = node.cli("retry")
        assert out.returncode == 0 and "1 failed output kinds" in out.stdout, out.stdout
        wait_until(lambda: len(_received(pacs).get(GSPS, [])) == 4 and
                   picky.classes().count(GSPS) == 4 and picky.classes().count(SC) == 4,
                   300, 1.0, "rebuilt GSPS at both destinations, SCs at the picky one")
        status = json.loads(node.cli("status", "--json").stdout)
        assert status["failed_outputs"] == []
        log = node.log()
    finally:
        node.stop()
        pacs.stop()
        picky.server.shutdown()
    # Each destination got exactly what it lacked: the picky one SCs and GSPSs, the PACS GSPSs.
    assert sorted(picky.classes()[sent_before:]) == sorted([SC] * 4 + [GSPS] * 4)
    sent_lines = [ln for ln in log.splitlines() if "delivery.sent" in ln]
    assert any("destination=pacs" in ln and "kinds=gsps " in ln for ln in sent_lines), sent_lines
    # The rebuilt GSPS has the UIDs this analysis always gives (node/reports/uids.py).
    gsps = _received(pacs)[GSPS]
    sr = _received(pacs)[SR][0]
    refs = {str(ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
                .ReferencedSOPInstanceUID): str(ds.SOPInstanceUID) for ds in gsps}
    key = _analysis_key(node, str(sr.SOPInstanceUID))
    assert refs == {ref: str(ResultUIDs(key).gsps_instance(ref)) for ref in refs}


def _analysis_key(node: NodeProcess, sr_uid: str) -> str:
    """The analysis key of the result whose TID 1500 SR is ``sr_uid`` (from the database)."""
    from sqlalchemy import select

    from node.db import Database, Result, ResultObject

    db = Database(f"sqlite:///{node.data_dir / 'node.sqlite3'}")
    try:
        with db.session() as s:
            return s.execute(select(Result.analysis_key).join(
                ResultObject, ResultObject.result_id == Result.id).where(
                ResultObject.sop_uid == sr_uid)).scalar_one()
    finally:
        db.dispose()
