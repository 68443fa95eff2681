"""Outages: a destination that is down, and one that refuses (0xA7xx, 0xC0xx).

Down: deliveries are retried with exponential backoff up to ``delivery.backoff_max_seconds``
(the delays are read back from the log) and everything goes out once the destination is back.
Refusing: the delivery is marked failed at once, ``mammo-node status`` shows it with the status,
and ``mammo-node retry`` re-sends it; each object arrives exactly once in the end.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from tests.netutil import NodeProcess, free_port, storescu, wait_until
from tests.reliability import SC_CLASS, SR_CLASS, RecordingSCP
from tests.smallstudies import small_study

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

_LINE = re.compile(r"^(\S+Z) \w+ node\.deliver delivery\.failed .*attempt=(\d+) state=(\w+)"
                   r".*?(?:next_retry_s=([\d.]+))?$", re.M)


def _status(node: NodeProcess) -> dict:
    out = node.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_destination_down_backoff_capped_then_delivered(tmp_path: Path) -> None:
    dest = RecordingSCP(tmp_path / "dest")  # not started: the PACS is down
    node = NodeProcess(tmp_path / "node", [dest.destination()], study={"stable_seconds": 600},
                       delivery={"max_attempts": 30, "backoff_initial_seconds": 1,
                                 "backoff_max_seconds": 4}).start()
    try:
        assert storescu(node.port, small_study(tmp_path / "in", 1, tag="outage")).returncode == 0
        wait_until(lambda: len(_LINE.findall(node.log())) >= 6, 120, 0.5, "six failed attempts")
        dest.start()  # the PACS is back
        wait_until(lambda: _status(node)["deliveries"] == {"done": 1}, 120, 0.5, "delivery")
        wait_until(lambda: len(dest.files()) >= 5, 30, 0.5, "5 objects at the destination")
        status = _status(node)
    finally:
        node.stop()
        dest.stop()
    failures = _LINE.findall(node.log())
    planned = [float(m[3]) for m in failures]
    times = [dt.datetime.fromisoformat(m[0].replace("Z", "+00:00")) for m in failures]
    gaps = [round((b - a).total_seconds(), 1) for a, b in zip(times, times[1:], strict=False)]
    print(f"\noutage: planned retry delays {planned} s; measured gaps between attempts {gaps} s")
    assert planned[:5] == [1.0, 2.0, 4.0, 4.0, 4.0]  # doubled, then capped
    assert all(state == "pending" for _, _, state, _ in failures)
    for gap, delay in zip(gaps, planned, strict=False):
        assert gap >= delay - 0.1  # never earlier than planned
    assert "cannot connect" in node.log()
    assert status["deliveries"] == {"done": 1}
    assert len(dest.files()) == 5


class RefusingSCP:
    """A pynetdicom Storage SCP whose C-STORE answer the test sets (0xA700, 0xC000, 0x0000)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.answer = 0xA700
        self.received: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="PICKY")
        for uid in (SR_CLASS, SC_CLASS):
            ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append((str(event.request.AffectedSOPInstanceUID), self.answer))
            return self.answer

    def accepted(self) -> list[str]:
        return [uid for uid, answer in self.received if answer == 0x0000]

    def destination(self) -> dict[str, object]:
        return {"name": "picky", "ae_title": "PICKY", "host": "127.0.0.1", "port": self.port}


def test_refusing_destination_is_failed_in_status_and_retry_resends(tmp_path: Path) -> None:
    scp = RefusingSCP()
    node = NodeProcess(tmp_path / "node", [scp.destination()], study={"stable_seconds": 600},
                       delivery={"max_attempts": 6}).start()
    try:
        assert storescu(node.port, small_study(tmp_path / "in", 2, tag="outage")).returncode == 0
        # 0xA700 (out of resources at the PACS): failed at once, not retried blindly.
        # Each kind is refused at its first object (SR, then the first SC): the delivery may show
        # "failed" after the SR's refusal while the SCs are still being built, so wait for both.
        wait_until(lambda: len(scp.received) >= 2 and _status(node)["deliveries"].get("failed"),
                   120, 0.5, "failed")
        first = _status(node)
        text = node.cli("status").stdout
        # 0xC000 (cannot understand) after `retry`: failed again, with that status.
        scp.answer = 0xC000
        out = node.cli("retry")
        assert "re-queued 1 failed deliveries" in out.stdout
        wait_until(lambda: len(scp.received) >= 4, 60, 0.5, "second attempt")
        wait_until(lambda: _status(node)["deliveries"].get("failed"), 60, 0.5, "failed again")
        second = _status(node)
        # The PACS accepts now: `retry` sends everything, once.
        scp.answer = 0x0000
        assert "re-queued 1 failed deliveries" in node.cli("retry").stdout
        wait_until(lambda: _status(node)["deliveries"] == {"done": 1}, 60, 0.5, "delivered")
        done = _status(node)
    finally:
        node.stop()
        scp.server.shutdown()
    assert first["deliveries"] == {"failed": 1}
    assert "0xA700" in first["recent_errors"][0]["error"]
    assert first["recent_errors"][0]["attempts"] == 1
    assert "failed" in text and "0xA700" in text
    assert "0xC000" in second["recent_errors"][0]["error"]
    assert done["deliveries"] == {"done": 1}
    # Each output kind goes on its own: a refusal stops that kind at its first object (the SR
    # and the first SC here, each refused in both rounds); the accepted round delivers each of
    # the 5 objects once.
    assert [a for _, a in scp.received[:4]] == [0xA700, 0xA700, 0xC000, 0xC000]
    assert len(scp.accepted()) == 5 and len(set(scp.accepted())) == 5
    assert node.log().count("delivery.sent") == 1
