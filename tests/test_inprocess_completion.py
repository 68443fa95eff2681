"""Study completion in-process: the real receiver, completion check and worker of a
:class:`node.service.Node`, behind a fake analyser (tests/fakeanalyser.py), over real DICOM
associations. The completion timer, the four-view rule, an identical re-send and a study
re-opened while its analysis runs (supersede)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from node.db import Study
from node.service import Node
from tests.fakeanalyser import FakeAnalyser
from tests.inprocess import jobs, results, send, wait_done
from tests.netutil import wait_until
from tests.smallstudies import small_study, sop_uids
from tests.testdata import mg_dataset, uid_from

pytestmark = pytest.mark.dcmtk


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_a_study_completes_only_after_stable_seconds_of_silence(
        tmp_path: Path, inprocess_node: Callable[..., Node]) -> None:
    fake = FakeAnalyser()
    node = inprocess_node(fake, study={"stable_seconds": 4, "complete_on_four_views": False})
    files = small_study(tmp_path / "in", 1, views=2)
    uid = _study_uid(files)
    t0 = time.monotonic()
    send(node, files)
    time.sleep(1.0)  # well inside the 4 s: still receiving, nothing queued or analysed
    assert jobs(node, uid) == [] and fake.calls == [], "completed before stable_seconds"
    wait_done(node, uid, 30)
    assert time.monotonic() - t0 >= 4
    assert [(u, set(s)) for u, s in fake.calls] == [(uid, sop_uids(files))]
    assert jobs(node, uid) == [("done", 1)]


def test_four_views_complete_a_study_before_the_timer(
        tmp_path: Path, inprocess_node: Callable[..., Node]) -> None:
    fake = FakeAnalyser()
    node = inprocess_node(fake, study={"stable_seconds": 60, "complete_on_four_views": True})
    files = small_study(tmp_path / "in", 2, views=4)
    uid = _study_uid(files)
    send(node, files)
    wait_done(node, uid, 30)  # far less than the 60 s timer
    assert [(u, set(s)) for u, s in fake.calls] == [(uid, sop_uids(files))]
    # one finding per image, with the analyser's probability, recorded on the current result
    [(current, rois, max_p, objects)] = results(node, uid)
    assert current and rois == 4 and max_p == fake.probability and objects >= 2


def test_an_identical_resend_is_not_analysed_again(
        tmp_path: Path, inprocess_node: Callable[..., Node]) -> None:
    fake = FakeAnalyser()
    node = inprocess_node(fake, study={"stable_seconds": 0.5})
    files = small_study(tmp_path / "in", 3, views=4)
    uid = _study_uid(files)
    send(node, files)
    wait_done(node, uid, 30)
    send(node, files)  # the same instances, byte for byte: re-opens the study...
    time.sleep(2.0)  # ...which completes again after 0.5 s, with the same input key
    with node.db.session() as s:
        state = s.execute(select(Study.state).where(Study.study_uid == uid)).scalar_one()
    assert state != "receiving"
    assert len(fake.calls) == 1, "the same content was analysed twice"
    assert len(results(node, uid)) == 1 and jobs(node, uid) == [("done", 1)]


def test_an_instance_arriving_during_the_analysis_supersedes_it(
        tmp_path: Path, inprocess_node: Callable[..., Node]) -> None:
    fake = FakeAnalyser()
    fake.hold = threading.Event()
    node = inprocess_node(fake, study={"stable_seconds": 0.5, "complete_on_four_views": True})
    files = small_study(tmp_path / "in", 4, views=4)
    uid = _study_uid(files)
    send(node, files)
    assert fake.started.wait(30), "the analysis did not start"
    extra = tmp_path / "in" / "extra.dcm"
    mg_dataset(np.full((64, 64), 700, np.uint16), patient_id="SMALL0004", study_uid=uid,
               sop_uid=uid_from("small", "sop", "4", "extra"), laterality="L", view="CC",
               spacing_mm=0.1, instance_number=9).save_as(extra, enforce_file_format=True)
    send(node, [extra])  # re-opens the study: the running analysis stops at a safe point
    wait_until(lambda: len(fake.calls) >= 2 or None, 30, 0.1, "the analysis to run again")
    fake.hold.set()
    wait_done(node, uid, 30)
    assert set(fake.calls[-1][1]) == sop_uids([*files, extra])  # the latest content
    # one job, finished once, its superseded run not counted as an attempt; one result
    assert jobs(node, uid) == [("done", 1)]
    [(current, rois, _, _)] = results(node, uid)
    assert current and rois == 5
