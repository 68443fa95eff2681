"""Red team, network side: hostile or broken peers replayed against a real node process.

Each test replays one attack from issue 14 (loopback only, bounded loops, short timeouts in the
test node's config) and asserts the outcome the node must show:

* stalled peers (A-ASSOCIATE, then the first bytes of a P-DATA PDU, then nothing) from many
  addresses and AE titles fill the general pool; the trusted PACS still stores through the
  reserve, an untrusted sender is told "local limit exceeded", and every staller is cut off after
  ``node.pdu_timeout`` (before the fix: the pool stayed locked for as long as they stayed);
* a sender dripping bytes below ``node.min_receive_rate_kib`` is cut off;
* silent TCP connections and idle associations from one address get at most
  ``max_associations_per_ip`` slots, and the rest an A-ASSOCIATE-RJ at once;
* control characters in a calling AE title cannot forge a log line;
* an HTTP slowloris holds at most ``http.max_connections`` threads, each for at most
  ``http.request_timeout`` seconds.

Peers bind other loopback source addresses (127.0.0.2, ...) to look like other hosts.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests import hostile_peers as hp
from tests.netutil import NodeProcess, free_port, storescu, wait_until
from tests.reliability import echo, stored_sop_uids
from tests.smallstudies import small_study, sop_uids

pytestmark = [pytest.mark.dcmtk]

POOL = 4
RESERVE = 2
PDU_TIMEOUT = 2.0
ACSE_TIMEOUT = 3.0
HTTP_MAX = 6
HTTP_REQUEST_TIMEOUT = 2.0
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("redteam-net")
    http_port = free_port()
    n = NodeProcess(
        work / "node",
        node={"max_associations": POOL, "reserved_associations": RESERVE,
              "max_associations_per_ip": 2, "max_associations_per_ae": 2,
              "trusted_peers": ["PACS@127.0.0.1"], "pdu_timeout": PDU_TIMEOUT,
              "acse_timeout": ACSE_TIMEOUT, "network_timeout": 6,
              "min_receive_rate_kib": 1},
        study={"stable_seconds": 600, "complete_on_four_views": False},
        http={"enabled": True, "port": http_port, "max_connections": HTTP_MAX,
              "request_timeout": HTTP_REQUEST_TIMEOUT, "idle_timeout": 1},
    )
    n.http_port = http_port
    n.start()
    yield n
    n.stop()


def _metrics(node: NodeProcess) -> str:
    return hp.scrape(node.http_port)


_metric = hp.metric


def _slots_free(node: NodeProcess) -> bool:
    m = _metrics(node)
    return _metric(m, "mammo_associations_open", kind="other") + \
        _metric(m, "mammo_associations_open", kind="trusted") == 0


def _echo_from(port: int, source_ip: str, calling: str) -> int | None:
    """C-ECHO from ``source_ip``: 0x0000, or None when the association was not accepted."""
    peer = hp.RawPeer(port, source_ip)
    try:
        if peer.associate(calling=calling) != 0x02:
            return None
        peer.send(hp.p_data([(1, 0x03, hp.c_echo_command())]))
        rsp = peer.read_pdu()
        return 0 if rsp is not None and rsp[0] == 0x04 else None
    finally:
        peer.close()


def test_stalled_peers_fill_the_pool_the_pacs_still_stores(node: NodeProcess,
                                                            tmp_path: Path) -> None:
    wait_until(lambda: _slots_free(node), 30, 0.2, "no association open")
    before = _metrics(node)
    # 8 stallers, each from its own address and AE title: per-IP and per-AE limits do not bind,
    # only the pool does (4 get in, the others are refused at once).
    stallers = [hp.stalled_association(node.port, f"127.0.0.{10 + i}", calling=f"STALL{i}")
                for i in range(8)]
    admitted = [p for p in stallers if p is not None]
    try:
        assert len(admitted) == POOL
        # An untrusted sender is refused while the pool is held: rejected, not left hanging.
        t0 = time.monotonic()
        assert _echo_from(node.port, "127.0.0.40", "OTHER") is None
        assert time.monotonic() - t0 < 2.0
        # The PACS (trusted: PACS@127.0.0.1) stores a study through the reserve, now.
        study = small_study(tmp_path / "pacs", 1, tag="redteam-pacs")
        t0 = time.monotonic()
        res = storescu(node.port, study, calling="PACS", timeout=60)
        pacs_s = time.monotonic() - t0
        assert res.returncode == 0, res.stdout + res.stderr
        assert sop_uids(study) <= stored_sop_uids(node.data_dir)
        assert pacs_s < PDU_TIMEOUT, "the PACS had to wait for the stallers to be cut off"
        # ... and every staller is cut off after node.pdu_timeout.
        t0 = time.monotonic()
        assert all(p.closed_by_node(PDU_TIMEOUT + 4) for p in admitted)
        cut_s = time.monotonic() - t0
    finally:
        for p in admitted:
            p.close()
    assert echo(node.port, calling="OTHER") == 0x0000  # the pool is free again
    after = _metrics(node)
    print(f"\nstalled: {len(admitted)} of 8 stallers held the pool of {POOL}; the PACS stored "
          f"4 instances in {pacs_s:.2f} s meanwhile; stallers cut off within {cut_s:.1f} s")
    assert _metric(after, "mammo_associations_aborted_total", reason="stalled") - \
        _metric(before, "mammo_associations_aborted_total", reason="stalled") == POOL
    assert _metric(after, "mammo_connections_refused_total", reason="pool_full") - \
        _metric(before, "mammo_connections_refused_total", reason="pool_full") >= 5
    log = node.log()
    assert log.count("association.stalled") >= POOL
    assert "reason=pool_full" in log


def test_slow_sender_below_the_minimum_rate_is_cut_off(node: NodeProcess,
                                                        tmp_path: Path) -> None:
    wait_until(lambda: _slots_free(node), 30, 0.2, "no association open")
    study = small_study(tmp_path / "slow", 2, views=1, tag="redteam-slow")
    incoming = node.data_dir / "incoming"
    peer = hp.start_store(node.port, study[0], hp.MG_FOR_PRESENTATION,
                          str(sop_uids(study).pop()), source_ip="127.0.0.50",
                          calling="DRIPPER", fraction=0.1)
    assert peer is not None
    # Then one PDU of the rest at 200 bytes/s (node.min_receive_rate_kib = 1 KiB/s).
    rest = hp.p_data([(1, 0x02, hp.dataset_body(study[0])[-16000:])])
    t0 = time.monotonic()
    hp.drip(peer, rest, 200, until=t0 + 30)
    cut_s = time.monotonic() - t0
    peer.close()
    assert cut_s < 12, f"a 200 B/s sender was still connected after {cut_s:.0f} s"
    wait_until(lambda: not any(incoming.iterdir()), 10, 0.1, "partial file removed")
    log = node.log()
    assert 'reason="too slow"' in log or "reason=stalled" in log
    assert "transfer.partial_removed" in log
    print(f"\nslow sender: 200 B/s cut off after {cut_s:.1f} s; partial file removed")


def test_silent_connections_and_idle_associations_per_address(node: NodeProcess) -> None:
    wait_until(lambda: _slots_free(node), 30, 0.2, "no association open")
    silent = [hp.silent_connection(node.port, "127.0.0.60") for _ in range(30)]
    idle = [hp.idle_association(node.port, "127.0.0.61", calling=f"IDLE{i}")
            for i in range(10)]
    try:
        # From one address at most max_associations_per_ip (2) connections hold a slot; the
        # others got an A-ASSOCIATE-RJ (local limit exceeded) and were closed right away.
        for p in silent:
            p.sock.settimeout(0.2)  # an admitted one says nothing: do not wait for it
        refused = sum(1 for p in silent if p.read_pdu() == (0x03, bytes([0, 0x02, 0x03, 0x02])))
        assert refused >= len(silent) - 2, refused
        assert sum(p is not None for p in idle) == 2
        # Two addresses now hold the pool of 4: the PACS is served at once from the reserve,
        # another sender is refused until the silent connections go.
        t0 = time.monotonic()
        assert _echo_from(node.port, "127.0.0.1", "PACS") == 0
        assert time.monotonic() - t0 < 1.0
        assert _echo_from(node.port, "127.0.0.62", "REAL") is None
        # Silent connections are dropped after node.acse_timeout; then REAL gets in.
        t0 = time.monotonic()
        assert all(p.closed_by_node(ACSE_TIMEOUT + 4) for p in silent)
        wait_until(lambda: _echo_from(node.port, "127.0.0.62", "REAL") == 0, 5, 0.3,
                   "REAL admitted once the silent connections were dropped")
        print(f"\nsilent/idle: {refused}/30 silent refused at once, "
              f"{sum(p is not None for p in idle)}/10 idle admitted; the rest dropped within "
              f"{time.monotonic() - t0:.1f} s")
    finally:
        for p in silent + [p for p in idle if p is not None]:
            p.close()


def test_control_characters_in_a_calling_ae_title_cannot_forge_a_log_line(
        node: NodeProcess) -> None:
    forged = "X\n2026 INFO\x1b[2J"  # 16 bytes: a newline, a fake record start, an escape
    peer = hp.RawPeer(node.port, "127.0.0.70")
    try:
        peer.associate(calling=forged)
    finally:
        peer.close()
    wait_until(lambda: "X\\n2026" in node.log(), 10, 0.2, "the AE title logged")
    lines = node.log().splitlines()
    bad = [ln for ln in lines if not LINE.match(ln) and not ln.startswith("    ")]
    assert bad == [], bad[:5]
    assert not any("\x1b" in ln for ln in lines)
    # pynetdicom puts the raw value in its own error message; it arrives escaped.
    assert any("X\\n2026 INFO\\x1b[2J" in ln for ln in lines)


def test_http_slowloris_is_bounded(node: NodeProcess) -> None:
    def threads() -> int:
        status = Path(f"/proc/{node.proc.pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))

    base = threads()
    before = _metrics(node)
    socks = hp.http_slowloris(node.http_port, 60)
    open_socks = list(socks)
    held = 0
    t0 = time.monotonic()
    try:
        # A real slowloris: one more header byte every 0.4 s, under http.idle_timeout (1 s),
        # so only http.request_timeout can end it.
        while open_socks and time.monotonic() - t0 < HTTP_REQUEST_TIMEOUT + 6:
            for s in list(open_socks):
                try:
                    s.send(b"X")
                except OSError:
                    open_socks.remove(s)
            held = max(held, threads() - base)
            time.sleep(0.4)
        cut_s = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    assert not open_socks, f"{len(open_socks)} slowloris connections still open"
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/health", timeout=10) as r:
        assert r.status == 200
    after = _metrics(node)
    print(f"\nslowloris: 60 connections dripping a byte every 0.4 s held at most {held} threads "
          f"(cap {HTTP_MAX}), all closed within {cut_s:.1f} s")
    assert held <= HTTP_MAX + 2
    cut = {r: _metric(after, "mammo_http_connections_cut_total", reason=r) -
           _metric(before, "mammo_http_connections_cut_total", reason=r)
           for r in ("over_limit", "idle_timeout", "request_timeout")}
    assert cut["request_timeout"] >= 1 and cut["over_limit"] >= 1, cut
    assert cut_s < HTTP_REQUEST_TIMEOUT + 4


def test_many_associations_at_once_still_bounded_by_the_pool(node: NodeProcess) -> None:
    """Opening connections in parallel (not one by one) must not overshoot the pool."""
    wait_until(lambda: _slots_free(node), 30, 0.2, "no association open")
    results: list[hp.RawPeer | None] = []
    lock = threading.Lock()

    def open_one(i: int) -> None:
        p = hp.stalled_association(node.port, f"127.0.1.{i + 1}", calling=f"PAR{i}")
        with lock:
            results.append(p)

    ts = [threading.Thread(target=open_one, args=(i,)) for i in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    admitted = [p for p in results if p is not None]
    try:
        assert len(admitted) <= POOL
    finally:
        for p in admitted:
            p.close()


def test_port_probes_do_not_hold_slots(node: NodeProcess) -> None:
    """A TCP connect that closes at once (a monitoring probe) must not keep its slot until
    node.acse_timeout: otherwise probes alone exhaust max_associations_per_ip."""
    wait_until(lambda: _slots_free(node), 30, 0.2, "no association open")
    for _ in range(10):
        socket.create_connection(("127.0.0.1", node.port), timeout=5).close()
    t0 = time.monotonic()
    wait_until(lambda: _slots_free(node), ACSE_TIMEOUT, 0.1, "probe slots released")
    assert time.monotonic() - t0 < ACSE_TIMEOUT - 1
    assert echo(node.port, calling="AFTERPROBE") == 0x0000
