"""Per-instance pre-analysis (node.preanalysis) in-process, with the shipped pipeline on real
images: the study's analysis finds every image prepared, gives the same findings as without it,
a restart reuses the kept results, a torn file or another preparation key is recomputed, the
queue never blocks the caller, and the results go when the study's result is recorded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from bench.studies import StudyFactory
from node.analysis.pipeline import AnalysisPipeline
from node.analysis.result import ImageInput
from node.config import AnalysisSettings, ModelSettings
from node.db import Database, Instance, Series, Study
from node.preanalysis import PreAnalysis
from node.store import Spool

SHIPPED = Path(__file__).resolve().parents[1] / "models/weights/calc-cluster-lite0.json"
CPU = ModelSettings(card=SHIPPED, device="cpu")


class CountingPipeline(AnalysisPipeline):
    """The real pipeline, counting the per-image work it does."""

    calls: list[str]

    def _prepare_image(self, item):  # type: ignore[no-untyped-def]
        self.calls.append(item.sop_instance_uid)
        return super()._prepare_image(item)


@pytest.fixture(scope="module")
def pipeline() -> CountingPipeline:
    p = CountingPipeline(CPU, AnalysisSettings(sc_max_side=512))
    p.calls = []
    return p


@pytest.fixture
def node_parts(tmp_path: Path, pipeline: CountingPipeline):  # type: ignore[no-untyped-def]
    """A spool + database holding one stored four-view study (state receiving)."""
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    files = StudyFactory("tiny", tag="preanalysis").write_study(0, tmp_path / "send")
    stored = []
    with db.session() as s:
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        study = Study(study_uid=study_uid, state="receiving", generation=1)
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
            stored.append((relpath, str(ds.SOPInstanceUID), str(ds.SOPClassUID)))
    pipeline.calls.clear()
    return spool, db, study_uid, stored


def _inputs(spool: Spool, stored: list[tuple[str, str, str]]) -> list[ImageInput]:
    return [ImageInput(spool.path(r), sop, cls) for r, sop, cls in stored]


def _wait_done(pre: PreAnalysis, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while pre.stats["done"] < n:
        assert time.monotonic() < deadline, pre.stats
        time.sleep(0.02)


def _marks(analysis) -> list[tuple]:  # type: ignore[no-untyped-def]
    return [(f.sop_instance_uid, f.centre_xy, round(f.probability, 6)) for f in analysis.findings]


def test_the_analysis_finds_every_image_prepared_and_the_same_result(
        node_parts, pipeline: CountingPipeline) -> None:  # type: ignore[no-untyped-def]
    spool, db, study_uid, stored = node_parts
    reference = pipeline.analyse(study_uid, _inputs(spool, stored))
    assert len(reference.findings) > 0
    pipeline.calls.clear()
    pre = PreAnalysis(db, spool, pipeline, workers=2)
    pre.start()  # the study is receiving: its four instances are queued at start
    try:
        _wait_done(pre, 4)
        assert sorted(pipeline.calls) == sorted(sop for _, sop, _ in stored)
        pipeline.calls.clear()
        cache = pre.images_of(study_uid)
        out = pipeline.analyse(study_uid, _inputs(spool, stored), cache=cache)  # type: ignore[arg-type]
        assert pipeline.calls == []  # nothing decoded at completion
        assert _marks(out) == _marks(reference)
        assert [i.sop_instance_uid for i in out.images] == [s for _, s, _ in stored]
        again = pipeline.analyse(study_uid, _inputs(spool, stored), cache=cache)  # type: ignore[arg-type]
        assert _marks(again) == _marks(reference)  # the kept copies were not painted on
    finally:
        pre.stop()


def test_a_restart_reuses_the_kept_results_and_recomputes_a_torn_one(
        node_parts, pipeline: CountingPipeline) -> None:  # type: ignore[no-untyped-def]
    spool, db, study_uid, stored = node_parts
    first = PreAnalysis(db, spool, pipeline, workers=1)
    first.start()
    _wait_done(first, 4)
    first.stop()
    files = sorted((spool.root / "preanalysis").rglob("*.pa"))
    assert len(files) == 4
    files[0].write_bytes(files[0].read_bytes()[:1000])  # a file torn by a crash
    pipeline.calls.clear()
    second = PreAnalysis(db, spool, pipeline, workers=1)  # "after the restart"
    second.start()  # nothing missing to queue; the torn file is found when used
    try:
        out = pipeline.analyse(study_uid, _inputs(spool, stored),
                               cache=second.images_of(study_uid))  # type: ignore[arg-type]
        assert len(pipeline.calls) == 1  # the torn one only
        assert second.stats["from_disk"] == 3
        assert len(out.findings) > 0
    finally:
        second.stop()


def test_another_preparation_key_is_not_reused(node_parts, pipeline: CountingPipeline
                                               ) -> None:  # type: ignore[no-untyped-def]
    spool, db, study_uid, stored = node_parts
    pre = PreAnalysis(db, spool, pipeline, workers=1)
    pre.start()
    _wait_done(pre, 4)
    pre.stop()
    other = AnalysisPipeline(CPU, AnalysisSettings(sc_max_side=256))  # another display size
    assert other.preparation_key != pipeline.preparation_key
    pipeline.calls.clear()
    fresh = PreAnalysis(db, spool, other, workers=0)
    hit = fresh.images_of(study_uid).get(str(spool.path(stored[0][0])))
    assert hit is None


def test_recorded_study_results_are_dropped_and_swept(node_parts, pipeline: CountingPipeline
                                                      ) -> None:  # type: ignore[no-untyped-def]
    spool, db, study_uid, stored = node_parts
    pre = PreAnalysis(db, spool, pipeline, workers=1)
    pre.start()
    _wait_done(pre, 4)
    pre.drop_study(study_uid)
    assert not any((spool.root / "preanalysis").iterdir())
    assert pre.images_of(study_uid).get(str(spool.path(stored[0][0]))) is None
    pre.stop()
    # Kept results of a study that is done by the next start are removed at that start.
    again = PreAnalysis(db, spool, pipeline, workers=1)
    again.start()
    _wait_done(again, 4)
    again.stop()
    with db.session() as s:
        s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one().state = "done"
    assert PreAnalysis(db, spool, pipeline, workers=1).sweep() == 1
    assert not any((spool.root / "preanalysis").iterdir())


class BlockedAnalyser:
    """prepare_one waits for a gate: the pool is busy for as long as the test wants."""

    preparation_key = "k" * 32

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls = 0

    def prepare_one(self, item: ImageInput) -> tuple:  # type: ignore[type-arg]
        self.calls += 1
        self.started.set()
        self.gate.wait(30)
        return ("prepared", item.sop_instance_uid)


def test_submit_never_blocks_and_a_queued_image_is_taken_over(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    analyser = BlockedAnalyser()
    pre = PreAnalysis(db, spool, analyser, workers=1, max_pending=2, max_images_per_study=100)
    pre.start()
    try:
        t0 = time.perf_counter()
        assert pre.submit("1.2.3", "instances/a.dcm", "1.2.3.1", "c")
        assert analyser.started.wait(5)  # a.dcm is running, the queue is empty again
        results = [pre.submit("1.2.3", f"instances/{n}.dcm", f"1.2.3.{n}", "c")
                   for n in range(2, 6)]
        assert time.perf_counter() - t0 < 1.0  # never waited for the busy pool
        assert results == [True, True, False, False]  # two queued, the rest left to the analysis
        assert pre.stats["dropped_full"] == 2
        # The analysis reaches a queued image first: it takes it over (no wait behind others).
        cache = pre.images_of("1.2.3")
        assert cache.get(str(spool.path("instances/3.dcm"))) is None
        assert pre.stats["taken_over"] == 1
        # ... and waits for the running one, getting its result.
        threading.Timer(0.2, analyser.gate.set).start()
        assert cache.get(str(spool.path("instances/a.dcm"))) == ("prepared", "1.2.3.1")
    finally:
        analyser.gate.set()
        pre.stop()


def test_the_share_of_one_study_is_bounded(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    analyser = BlockedAnalyser()
    analyser.gate.set()
    pre = PreAnalysis(db, spool, analyser, workers=1, max_pending=100, max_images_per_study=3)
    accepted = [pre.submit("1.2.4", f"instances/{n}.dcm", f"1.2.4.{n}", "c") for n in range(10)]
    assert accepted == [True] * 3 + [False] * 7


class OrderRecorder(BlockedAnalyser):
    """Records the order in which the pool prepares images; the first one waits for the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def prepare_one(self, item: ImageInput) -> tuple:  # type: ignore[type-arg]
        self.order.append(item.sop_instance_uid)
        if len(self.order) == 1:
            self.started.set()
            self.gate.wait(30)
        return ("prepared", item.sop_instance_uid)


def test_the_image_that_completes_a_study_goes_first(tmp_path: Path) -> None:
    """Not first in, first out: the image of the most advanced study overtakes the first images
    of later studies, and a study whose analysis started overtakes everything."""
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    analyser = OrderRecorder()
    pre = PreAnalysis(db, spool, analyser, workers=1, max_pending=32, max_images_per_study=16)
    pre.start()
    try:
        assert pre.submit("A", "instances/a1.dcm", "a1", "c")
        assert analyser.started.wait(5)  # the pool's one thread is busy with a1
        for uid in ("a2", "a3"):
            assert pre.submit("A", f"instances/{uid}.dcm", uid, "c")
        assert pre.submit("B", "instances/b1.dcm", "b1", "c")  # the next study begins
        assert pre.submit("C", "instances/c1.dcm", "c1", "c")
        assert pre.submit("A", "instances/a4.dcm", "a4", "c")  # A's fourth view: complete
        assert pre.prioritise("C") == 1  # C's analysis started (e.g. completed on time-out)
        analyser.gate.set()
        _wait_done(pre, 6)
        # FIFO would be a1 a2 a3 b1 c1 a4
        assert analyser.order == ["a1", "c1", "a4", "a3", "a2", "b1"]
        assert pre.stats["done"] == 6
    finally:
        analyser.gate.set()
        pre.stop()
