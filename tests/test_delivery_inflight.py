"""A kind added to a result while its delivery is in flight is still delivered.

The race: a rebuilt output kind (``mammo-node retry``) is recorded and its delivery set back to
pending while the deliverer is already sending that delivery's earlier snapshot of objects; the
deliverer used to mark the delivery done at the end and the new kind was never sent.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage as GRAYSCALE_SOFTCOPY_PS

from node.config import DeliverySettings, Destination
from node.db import Database, Delivery, ResultObject
from node.deliver import Deliverer, DeliveryContext, SendOutcome
from node.queue import queue_deliveries
from node.store import Spool
from tests.inprocess import result_with_one_sc

_ACCEPTED = SendOutcome(True, False, "0x0000", "")
_REFUSED = SendOutcome(False, True, "0xA700", "C-STORE refused with 0xA700")


class KindAddedDuringFirstSend:
    """Records what is sent; during the first send the worker records another kind (a rebuilt
    one, or the next kind of a result still being built), and that send gets ``first``."""

    def __init__(self, db: Database, result_id: int, first: SendOutcome) -> None:
        self.db, self.result_id, self.first = db, result_id, first
        self.sent: list[list[str]] = []

    def send(self, dest: Destination, paths: Sequence[Path]) -> SendOutcome:
        self.sent.append(sorted(p.name for p in paths))
        if len(self.sent) > 1:
            return _ACCEPTED
        with self.db.session() as s:  # what the worker does when it records a kind
            s.add(ResultObject(result_id=self.result_id, sop_class_uid=GRAYSCALE_SOFTCOPY_PS,
                               sop_uid="1.2.3.9", relpath="r/gsps.dcm"))
            queue_deliveries(s, self.result_id, [dest.name])
        return self.first


def _deliverer(tmp_path: Path, first: SendOutcome
               ) -> tuple[Database, Deliverer, KindAddedDuringFirstSend]:
    """A result with one SC due to "pacs" (which takes SCs and GSPS), sent through
    :class:`KindAddedDuringFirstSend`."""
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    transport = KindAddedDuringFirstSend(db, result_with_one_sc(db), first)
    dest = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1,
                       objects=["sc", "gsps"])
    return db, Deliverer(DeliverySettings(), [dest], DeliveryContext(
        db, Spool(tmp_path / "data"), transports={"dicom": transport})), transport


def test_a_kind_added_while_the_delivery_is_sending_is_sent_too(tmp_path: Path) -> None:
    db, deliverer, transport = _deliverer(tmp_path, _ACCEPTED)

    assert deliverer.run_due() == 1
    with db.session() as s:  # the attempt saw only the SC: the delivery is due again, not done
        d = s.query(Delivery).one()
        assert d.state == "pending"
        assert d.sent_at is None
    assert deliverer.run_due() == 1
    assert transport.sent == [["sc.dcm"], ["gsps.dcm"]]  # the SC once, then the rebuilt GSPS
    with db.session() as s:
        assert s.query(Delivery).one().state == "done"


def test_a_kind_recorded_while_another_is_refused_is_still_sent(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Seen in the full suite under load (tests/test_outage.py): the SR was refused while the SCs
    # were recorded, the delivery became failed at once, and the SCs were withheld until
    # `mammo-node retry`. One refused kind must not withhold the others.
    db, deliverer, transport = _deliverer(tmp_path, _REFUSED)

    with caplog.at_level(logging.INFO, logger="node.deliver"):
        assert deliverer.run_due() == 1
    lines = [r.getMessage() for r in caplog.records]
    # the admin's log: the refusal, and that the rest is still to go (no "failed", no retry)
    assert any(m.startswith("delivery.kind_failed") and "kind=sc" in m for m in lines), lines
    assert any(m.startswith("delivery.kinds_sent") and "refused=sc" in m for m in lines), lines
    assert not any(m.startswith("delivery.failed") for m in lines), lines
    with db.session() as s:  # the SC was refused, the GSPS is still to go: due again
        d = s.query(Delivery).one()
        assert d.state == "pending", d.state
        assert "0xA700" in (d.last_error or "")
    assert deliverer.run_due() == 1
    assert transport.sent == [["sc.dcm"], ["gsps.dcm"]]  # the refused SC is not sent again
    with db.session() as s:  # everything else went: failed, with the refusal that made it so
        d = s.query(Delivery).one()
        assert d.state == "failed"
        assert "0xA700" in (d.last_error or "")
