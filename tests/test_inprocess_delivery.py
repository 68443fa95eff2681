"""Delivery in-process: the real worker and deliverer of a :class:`node.service.Node` behind a
fake analyser, sending to real dcmtk storescp destinations. A destination that is down is
retried with backoff and gets everything once it is up; a destination that stays down fails
after ``delivery.max_attempts`` and never withholds another destination's objects."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage as COMPREHENSIVE_SR
from pydicom.uid import SecondaryCaptureImageStorage as SECONDARY_CAPTURE
from sqlalchemy import select

from node.config import DeliverySettings, NodeSettings
from node.db import Delivery
from node.deliver import Deliverer, DeliveryContext
from node.service import Node
from node.store import Spool
from tests.fakeanalyser import FakeAnalyser
from tests.inprocess import deliveries, result_with_one_sc, send, wait_done
from tests.netutil import StoreSCP, free_port, wait_until
from tests.smallstudies import small_study

pytestmark = pytest.mark.dcmtk


def _received(scp: StoreSCP) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
                  for p in scp.files())


def test_one_unreachable_destination_does_not_withhold_the_other(
        tmp_path: Path, storescp: StoreSCP, inprocess_node: Callable[..., Node]) -> None:
    down = {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}
    # the unreachable one first: its deliveries are claimed first at every pass
    node = inprocess_node(FakeAnalyser(), [down, storescp.destination("up")],
                          delivery={"max_attempts": 5, "backoff_initial_seconds": 0.5,
                                    "backoff_max_seconds": 1})
    files = small_study(tmp_path / "in", 11, views=4)
    send(node, files)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    wait_done(node, uid)
    wait_until(lambda: deliveries(node).get("up", ("",))[0] == "done" or None, 30, 0.1,
               "the reachable destination's delivery")
    # ...while the other one is still being retried: it did not wait for it to give up
    state, attempts, _ = deliveries(node)["down"]
    assert state in ("pending", "sending") and attempts < 5
    # the SR and the SC of each image reached the destination that is up
    assert _received(storescp) == sorted([COMPREHENSIVE_SR] + [SECONDARY_CAPTURE] * 4)
    # the other one was tried max_attempts times, then failed with the reason
    wait_until(lambda: deliveries(node)["down"][0] == "failed" or None, 30, 0.2,
               "the unreachable destination to fail")
    state, attempts, error = deliveries(node)["down"]
    assert attempts == 5 and "cannot connect" in (error or "")


def test_a_destination_that_comes_back_gets_everything(
        tmp_path: Path, inprocess_node: Callable[..., Node]) -> None:
    late = StoreSCP(tmp_path / "late", ae_title="LATE")  # its port is known, nothing listens
    node = inprocess_node(FakeAnalyser(), [late.destination("late")],
                          delivery={"max_attempts": 20, "backoff_initial_seconds": 0.2,
                                    "backoff_max_seconds": 0.5})
    files = small_study(tmp_path / "in", 12, views=2)
    send(node, files)
    wait_until(lambda: (d := deliveries(node).get("late")) and d[1] >= 2 or None, 30, 0.1,
               "two failed attempts")
    assert deliveries(node)["late"][0] in ("pending", "sending")  # retried, not given up
    late.start()
    try:
        wait_until(lambda: deliveries(node)["late"][0] == "done" or None, 30, 0.1,
                   "the delivery once the destination is up")
        assert _received(late) == sorted([COMPREHENSIVE_SR] + [SECONDARY_CAPTURE] * 2)
    finally:
        late.stop()


def test_backoff_doubles_up_to_its_maximum_and_is_recorded(db, tmp_path: Path) -> None:
    """The retry time written after a failed attempt follows the backoff rule."""
    from node.config import Destination

    result_with_one_sc(db)
    spool = Spool(tmp_path / "data")
    (spool.path("r/sc.dcm")).parent.mkdir(parents=True, exist_ok=True)
    small = small_study(tmp_path / "in", 13, views=1)[0]
    spool.path("r/sc.dcm").write_bytes(small.read_bytes())
    dest = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())
    d = Deliverer(DeliverySettings(max_attempts=5, backoff_initial_seconds=10,
                                   backoff_max_seconds=30), [dest], DeliveryContext(db, spool),
                  node=NodeSettings(ae_title="NODE"))
    assert [d.backoff(n) for n in range(1, 6)] == [10, 20, 30, 30, 30]
    waits = []
    for _ in range(5):
        with db.session() as s:  # due now
            s.execute(select(Delivery)).scalar_one().next_attempt_at = \
                dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=1)
        before = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        assert d.run_due() == 1
        after = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        with db.session() as s:
            row = s.execute(select(Delivery)).scalar_one()
            # The retry time is set when the attempt ends: between `before` and `after` plus
            # the backoff (a loaded machine may take over a second to refuse the connection).
            lo = (row.next_attempt_at - after).total_seconds()
            hi = (row.next_attempt_at - before).total_seconds()
            waits.append(next((b for b in (10, 20, 30) if lo - 0.01 <= b <= hi + 0.01), (lo, hi)))
            state = row.state
    assert waits[:4] == [10, 20, 30, 30] and state == "failed", waits
