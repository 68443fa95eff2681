"""The analysis worker in-process: the real receiver, completion, worker, report builders and
deliverer of a :class:`node.service.Node` behind a fake analyser (tests/fakeanalyser.py). A
failed analysis is retried and then failed for good with every image's outcome; the per-study
image bound; one output kind that cannot be built does not withhold the other; a node stopped
during an analysis re-queues the job without counting an attempt, and the next start
finishes it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage as COMPREHENSIVE_SR
from sqlalchemy import select

from node.db import Instance, ResultKind
from node.service import Node
from node.worker import MAX_JOB_ATTEMPTS
from tests.fakeanalyser import FakeAnalyser
from tests.inprocess import deliveries, jobs, results, send, wait_done
from tests.netutil import StoreSCP, wait_for_port, wait_until
from tests.smallstudies import small_study

pytestmark = pytest.mark.dcmtk


def _uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _outcomes(node: Node) -> list[tuple[str | None, str | None]]:
    with node.db.session() as s:
        return [(i.outcome, i.outcome_reason) for i in
                s.execute(select(Instance).order_by(Instance.id)).scalars()]


def test_a_failed_analysis_is_retried_and_then_recorded(
        tmp_path: Path, inprocess_node: Callable[..., Node]) -> None:
    fake = FakeAnalyser()
    fake.fail_times = 1
    node = inprocess_node(fake)
    files = small_study(tmp_path / "in", 21, views=4)
    send(node, files)
    wait_done(node, _uid(files))
    assert jobs(node, _uid(files)) == [("done", 2)]  # the second attempt succeeded
    assert len(fake.calls) == 2
    assert [o for o, _ in _outcomes(node)] == ["analysed"] * 4


def test_an_analysis_that_keeps_failing_fails_for_good_with_its_images(
        tmp_path: Path, storescp: StoreSCP, inprocess_node: Callable[..., Node]) -> None:
    fake = FakeAnalyser()
    fake.fail_times = 99
    node = inprocess_node(fake, [storescp.destination()])
    files = small_study(tmp_path / "in", 22, views=2)
    send(node, files)
    wait_until(lambda: jobs(node, _uid(files))[-1:] == [("failed", MAX_JOB_ATTEMPTS)] or None,
               60, 0.1, "the job to fail for good")
    assert len(fake.calls) == MAX_JOB_ATTEMPTS
    assert results(node, _uid(files)) == [] and storescp.files() == []
    assert all(o == "failed" and "fake analyser told to fail" in (why or "")
               for o, why in _outcomes(node))


def test_images_over_the_per_study_bound_are_skipped_with_the_reason(
        tmp_path: Path, inprocess_node: Callable[..., Node]) -> None:
    fake = FakeAnalyser()
    node = inprocess_node(fake, analysis={"max_images_per_study": 2, "preanalysis_workers": 0})
    files = small_study(tmp_path / "in", 23, views=4)
    send(node, files)
    wait_done(node, _uid(files))
    assert len(fake.calls[0][1]) == 2
    outcomes = _outcomes(node)
    assert sorted(o for o, _ in outcomes) == ["analysed", "analysed", "skipped", "skipped"]
    assert all("max_images_per_study" in (why or "") for o, why in outcomes if o == "skipped")


def test_a_kind_that_cannot_be_built_does_not_withhold_the_other(
        tmp_path: Path, storescp: StoreSCP, inprocess_node: Callable[..., Node]) -> None:
    fake = FakeAnalyser()
    fake.display_scale = 0  # the Secondary Capture builder refuses it; the SR does not need it
    node = inprocess_node(fake, [storescp.destination()])
    files = small_study(tmp_path / "in", 24, views=2)
    send(node, files)
    wait_done(node, _uid(files))
    wait_until(lambda: deliveries(node).get("dest", ("",))[0] == "done" or None, 30, 0.1,
               "the delivery of the SR")
    assert [str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
            for p in storescp.files()] == [COMPREHENSIVE_SR]
    with node.db.session() as s:
        kinds = {k.kind: (k.state, k.error) for k in s.execute(select(ResultKind)).scalars()}
    assert kinds["tid1500"][0] == "built"
    assert kinds["sc"][0] == "failed" and "display_scale" in (kinds["sc"][1] or "")


def test_a_stop_during_the_analysis_requeues_it_and_the_restart_finishes_it(
        tmp_path: Path, inprocess_node: Callable[..., Node]) -> None:
    fake = FakeAnalyser()
    fake.hold = threading.Event()
    node = inprocess_node(fake)
    files = small_study(tmp_path / "in", 25, views=4)
    send(node, files)
    assert fake.started.wait(30)
    assert node.stop(5)  # reaches the analyser's next safe point
    assert jobs(node, _uid(files)) == [("queued", 0)]  # back in the queue, no attempt spent
    again = FakeAnalyser()
    restarted = Node(node.settings, analyser=again)  # type: ignore[arg-type]
    restarted.start()
    try:
        wait_for_port(node.settings.node.port, 30)
        wait_done(restarted, _uid(files))
        assert jobs(restarted, _uid(files)) == [("done", 1)]
        assert len(again.calls) == 1 and len(results(restarted, _uid(files))) == 1
    finally:
        restarted.stop(5)


def test_the_worker_pays_the_report_builds_one_time_costs_before_the_first_study(
        inprocess_node: Callable[..., Node]) -> None:
    """highdicom's first IOD check loads the standard's tables (~0.2-0.6 s); the worker does it
    as it starts, so the first study after a restart is not the slow one."""
    from node.intake import ANALYSED_SOP_CLASSES
    from node.reports.common import has_pixel_data

    has_pixel_data.cache_clear()
    inprocess_node(FakeAnalyser())  # started; nothing is sent
    wait_until(lambda: has_pixel_data.cache_info().currsize >= len(ANALYSED_SOP_CLASSES), 30,
               0.05, "the worker's warm-up")
