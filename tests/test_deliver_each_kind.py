"""Each output kind is delivered as soon as it is written, not after the whole result.

In-process: the real worker (a stand-in analyser hands it a finished analysis of a real
four-view study), the real report builders, the real deliverer sending over C-STORE to a
pynetdicom SCP on 127.0.0.1. The Secondary Capture build waits until the peer has the TID 1500
SR: before per-kind delivery the SR was sent only after every kind was built and the result
recorded, so the wait timed out. The delivery is not ``done`` while the result is still being
built, only when every kind reached the peer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import ComprehensiveSRStorage as COMPREHENSIVE_SR
from pydicom.uid import SecondaryCaptureImageStorage as SECONDARY_CAPTURE
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from sqlalchemy import select

from bench.studies import StudyFactory
from node.analysis.result import Finding, ImageAnalysis, ImageInput, ModelInfo, StudyAnalysis
from node.config import DeliverySettings, Destination
from node.db import (
    Database,
    Delivery,
    DeliveryKind,
    Instance,
    Job,
    Result,
    ResultKind,
    ResultObject,
    Series,
    Study,
)
from node.deliver import Deliverer, DeliveryContext
from node.reports import build_reports
from node.store import Spool
from node.worker import AnalysisWorker, ReportOptions
from tests.netutil import free_port

MODEL = ModelInfo("calc-cluster-lite0", "0.1.0", "tf_efficientnet_lite0", 0.41)


class Peer:
    """A C-STORE SCP that records (SOP class, arrival time) and signals the first SR."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[str, float]] = []
        self.got_sr = threading.Event()
        ae = AE(ae_title="PACS")
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, ev: evt.Event) -> int:
        sop_class = str(ev.request.AffectedSOPClassUID)
        self.received.append((sop_class, time.monotonic()))
        if sop_class == COMPREHENSIVE_SR:
            self.got_sr.set()
        return 0x0000


class FinishedAnalysis:
    """The analyser: one cluster on the first image, display image and Grad-CAM map on each."""

    model = MODEL

    def analyse(self, study_uid: str, inputs: Sequence[ImageInput], **_: Any) -> StudyAnalysis:
        images = []
        for n, item in enumerate(inputs):
            ds = pydicom.dcmread(item.path, stop_before_pixels=True)
            rows, cols = int(ds.Rows), int(ds.Columns)
            cx, cy = cols / 2, rows / 2
            outline = tuple((cx + 20 * np.cos(a), cy + 20 * np.sin(a))
                            for a in np.linspace(0, 2 * np.pi, 16, endpoint=False))
            findings = [Finding(1, item.sop_instance_uid, str(ds.ImageLaterality),
                                str(ds.ViewPosition), (cx, cy), (*outline, outline[0]), 1.4, 5,
                                0.7)] if n == 0 else []
            images.append(ImageAnalysis(
                item.sop_instance_uid, item.sop_class_uid, str(ds.ImageLaterality),
                str(ds.ViewPosition), rows, cols, 0.07, "ImagerPixelSpacing", True, findings,
                np.full((rows, cols), 90, np.uint8), np.zeros((rows, cols), np.float32), 1.0))
        return StudyAnalysis(study_uid, MODEL, images)


def _stored_study(tmp_path: Path, spool: Spool, db: Database) -> None:
    files = StudyFactory("tiny", tag="each-kind").write_study(0, tmp_path / "send")
    with db.session() as s:
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        study = Study(study_uid=study_uid, state="complete", generation=1)
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid=study_uid + ".1", modality="MG")
        s.add(series)
        s.flush()
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            relpath, size, sha = spool.adopt(f)
            s.add(Instance(study_id=study.id, series_id=series.id, sop_uid=str(ds.SOPInstanceUID),
                           sop_class_uid=str(ds.SOPClassUID), transfer_syntax="x",
                           relpath=relpath, size=size, sha256=sha))
        s.add(Job(study_id=study.id, generation=1, input_key="k", state="queued"))


def test_the_sr_reaches_the_peer_before_the_scs_are_built(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    _stored_study(tmp_path, spool, db)
    peer = Peer()
    dest = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=peer.port)
    deliverer = Deliverer(DeliverySettings(), [dest], DeliveryContext(db, spool))
    states_while_building: list[str] = []
    sr_first: dict[str, bool] = {}

    def builder(analysis: StudyAnalysis, sources: Any, context: Any,
                kinds: Sequence[str]) -> list:  # type: ignore[type-arg]
        if tuple(kinds) == ("sc",):
            sr_first["sr at the peer before the SC build"] = peer.got_sr.wait(20)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # until the pass that sent the SR recorded it
                with db.session() as s:
                    states = list(s.execute(select(Delivery.state)).scalars())
                if states != ["sending"]:
                    break
                time.sleep(0.05)
            states_while_building.extend(states)
        return build_reports(analysis, sources, context, kinds)

    worker = AnalysisWorker(db, spool, FinishedAnalysis(), builder,
                            ReportOptions("mammo-node", 901, 902, MODEL.threshold, "t"),
                            ["pacs"])
    due = threading.Event()
    stop = threading.Event()

    def on_result() -> None:
        deliverer.wake()
        due.set()

    worker.on_result = on_result

    def deliver_loop() -> None:  # the scheduler's deliver job: woken, else a 1 s tick
        while not stop.is_set():
            due.wait(1.0)
            due.clear()
            deliverer.run_due()

    thread = threading.Thread(target=deliver_loop, daemon=True)
    thread.start()
    try:
        assert worker.run_once()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with db.session() as s:
                if s.execute(select(Delivery.state)).scalar() == "done":
                    break
            time.sleep(0.1)
    finally:
        stop.set()
        due.set()
        thread.join(10)
        peer.server.shutdown()

    assert sr_first == {"sr at the peer before the SC build": True}
    # sent, but the result was open (SCs to come): not done, waiting for the next kind
    assert states_while_building == ["pending"]
    classes = [c for c, _ in peer.received]
    assert classes == [COMPREHENSIVE_SR] + [SECONDARY_CAPTURE] * 4
    with db.session() as s:
        assert s.execute(select(Delivery.state)).scalar() == "done"
        assert sorted((k.kind, k.state) for k in s.execute(select(DeliveryKind)).scalars()) \
            == [("sc", "done"), ("tid1500", "done")]
        assert sorted((k.kind, k.state) for k in s.execute(select(ResultKind)).scalars()) \
            == [("sc", "built"), ("tid1500", "built")]
        assert s.execute(select(Job.state)).scalar() == "done"
        assert s.execute(select(Study.state)).scalar() == "done"
        result = s.execute(select(Result)).scalar_one()
        assert result.current and result.roi_count == 1
        assert len(s.execute(select(ResultObject)).scalars().all()) == 5
