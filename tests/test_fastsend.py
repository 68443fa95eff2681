"""The lean C-STORE send (node/fastsend.py) against real peers on 127.0.0.1: a pynetdicom SCP
(the bytes it receives are the file's dataset, for sizes on and off PDU boundaries and for tiny,
odd and unlimited peer PDU sizes) and a raw acceptor written from PS3.8 that checks every PDU's
framing, aborts in the middle of a send, or stops reading. A broken send is a transient failure
(nothing marked sent) and the deliverer retries it; the destination that works still gets
everything."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import decode, encode, split_dataset
from sqlalchemy import select

from node import fastsend
from node.config import Destination
from node.db import DeliveryKind
from node.deliver import CStoreTransport
from node.service import Node
from tests.fakeanalyser import FakeAnalyser
from tests.hostile_peers import _item, _uid_bytes
from tests.inprocess import deliveries, send, wait_done
from tests.netutil import StoreSCP, free_port, wait_until
from tests.smallstudies import small_study


def _sc_file(folder: Path, data_bytes: int, odd_tail: bool = False) -> Path:
    """A Secondary Capture file whose Pixel Data is ``data_bytes`` long (even), written by
    pydicom; ``odd_tail``: one stray byte after the dataset (an odd-length body: the sender
    must pass it on as it is, not pad or drop it)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "FASTSEND"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 1, 1, 1  # the bytes matter here, not the image
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    rng = np.random.default_rng(data_bytes)
    ds.PixelData = rng.integers(0, 65535, data_bytes // 2, dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"sc-{data_bytes}{'-odd' if odd_tail else ''}.dcm"
    ds.save_as(path, enforce_file_format=True)
    if odd_tail:
        with open(path, "ab") as fh:
            fh.write(b"\x07")
    return path


def _after_meta(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _dest(port: int, ae_title: str = "PACS") -> Destination:
    return Destination(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Files the lean path wrote (so a test knows it ran, not pynetdicom's send)."""
    sent: list[Path] = []
    real = fastsend._write

    def spy(sock, path, *args):  # type: ignore[no-untyped-def]
        sent.append(path)
        return real(sock, path, *args)

    monkeypatch.setattr(fastsend, "_write", spy)
    return sent


# -- a real pynetdicom SCP: what arrives is the file's dataset --------------------------------
@pytest.mark.parametrize("peer_max_pdu", [1024, 4097, 16384, 0])
def test_the_peer_receives_the_files_dataset(tmp_path: Path, peer_max_pdu: int,
                                             counted: list[Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    payload = fastsend.payload_size(peer_max_pdu)
    # sizes on a PDU boundary, one dataset byte over/under it, smaller than one PDU, an odd
    # body, and several MB (several buffer fills)
    base = len(_after_meta(_sc_file(tmp_path, 2)))
    sizes = [payload * 3 - base + 2, payload * 3 - base + 4, payload * 3 - base, 2,
             5 * 1024 * 1024 + 6]
    files = [_sc_file(tmp_path, max(2, n - n % 2)) for n in sizes]
    files.append(_sc_file(tmp_path, 3000, odd_tail=True))
    received: list[bytes] = []
    pdus: list[int] = []

    def on_store(ev: evt.Event) -> int:
        received.append(ev.request.DataSet.getvalue())
        return 0x0000

    def on_pdu(ev: evt.Event) -> None:
        if ev.pdu.__class__.__name__ == "P_DATA_TF":
            pdus.append(len(ev.pdu.encode()) - 6)  # the PDU-length field's value

    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    ae = AE(ae_title="PACS")
    ae.maximum_pdu_size = peer_max_pdu
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store),
                                           (evt.EVT_PDU_RECV, on_pdu)])
    try:
        out = CStoreTransport("MAMMO_AI").send(_dest(port), files)
    finally:
        server.shutdown()
    assert out.ok and out.status == "0x0000", out
    assert counted == files  # the lean path sent every one of them
    assert [len(r) for r in received] == [len(_after_meta(f)) for f in files]
    for path, data in zip(files, received, strict=True):
        assert data == _after_meta(path), path.name
    if peer_max_pdu:
        assert max(pdus) <= peer_max_pdu


# -- a raw acceptor: framing checked byte by byte; aborts; stalls -----------------------------
def _read_exact(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def _read_pdu(conn: socket.socket) -> tuple[int, bytes]:
    kind, _, length = struct.unpack(">BBL", _read_exact(conn, 6))
    return kind, _read_exact(conn, length)


def _associate_ac(rq: bytes, max_pdu: int) -> bytes:
    """A-ASSOCIATE-AC accepting every proposed context with Explicit VR Little Endian."""
    called, calling = rq[4:20], rq[20:36]
    items, pos = b"", 68
    while pos < len(rq):
        kind, length = rq[pos], struct.unpack(">H", rq[pos + 2:pos + 4])[0]
        if kind == 0x20:  # a presentation context: its ID first
            items += _item(0x21, bytes([rq[pos + 4], 0, 0, 0])
                           + _item(0x40, _uid_bytes(ExplicitVRLittleEndian)))
        pos += 4 + length
    body = (b"\x00\x01\x00\x00" + called + calling + bytes(32)
            + _item(0x10, _uid_bytes("1.2.840.10008.3.1.1.1")) + items
            + _item(0x50, _item(0x51, struct.pack(">L", max_pdu))))
    return struct.pack(">BBL", 0x02, 0, len(body)) + body


def _store_rsp(command: bytes, context_id: int, status: int = 0x0000) -> bytes:
    rq = decode(BytesIO(command), True, True)
    rsp = Dataset()
    rsp.CommandGroupLength = 0
    rsp.AffectedSOPClassUID = rq.AffectedSOPClassUID
    rsp.CommandField = 0x8001
    rsp.MessageIDBeingRespondedTo = rq.MessageID
    rsp.CommandDataSetType = 0x0101
    rsp.Status = status
    rsp.AffectedSOPInstanceUID = rq.AffectedSOPInstanceUID
    rsp.CommandGroupLength = len(encode(rsp, True, True) or b"") - 12
    cmd = encode(rsp, True, True) or b""
    pdv = struct.pack(">LBB", len(cmd) + 2, context_id, 0x03) + cmd
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


class RawAcceptor:
    """One association at a time: ``mode`` "store" (checks each P-DATA-TF: one PDV, length
    fields consistent, at most ``max_pdu``, fragments in order, the last-fragment bit on the
    last only; answers 0x0000), "abort" (reads ``abort_after`` bytes of P-DATA, then A-ABORT
    and close), "stall" (never reads after the A-ASSOCIATE-AC)."""

    def __init__(self, mode: str, max_pdu: int = 16384, abort_after: int = 65536) -> None:
        self.mode, self.max_pdu, self.abort_after = mode, max_pdu, abort_after
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.datasets: list[bytes] = []
        self.errors: list[str] = []
        self.associations = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.associations += 1
                try:
                    self._one(conn)
                except (ConnectionError, OSError):
                    pass
                except AssertionError as exc:
                    self.errors.append(str(exc))

    def _one(self, conn: socket.socket) -> None:
        kind, rq = _read_pdu(conn)
        assert kind == 0x01
        conn.sendall(_associate_ac(rq, self.max_pdu))
        if self.mode == "stall":
            self._stop.wait(30)
            return
        if self.mode == "abort":
            _read_exact(conn, self.abort_after)
            conn.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 2, 0))
            return
        if self.mode == "refuse":  # out of resources, said after the command, then gone
            _, body = _read_pdu(conn)
            conn.sendall(_store_rsp(body[6:], body[4], 0xA700))
            time.sleep(0.2)
            return
        while True:
            command, data, ctx = b"", b"", 0
            while True:  # one message: command fragments, then data set fragments
                kind, body = _read_pdu(conn)
                if kind == 0x05:  # A-RELEASE-RQ
                    conn.sendall(struct.pack(">BBLL", 0x06, 0, 4, 0))
                    return
                assert kind == 0x04, f"PDU type {kind:#x}"
                assert len(body) <= self.max_pdu, f"PDU of {len(body)} > {self.max_pdu}"
                item_len, ctx, control = struct.unpack(">LBB", body[:6])
                assert item_len == len(body) - 4, "one PDV per PDU, its length consistent"
                fragment = body[6:]
                if control & 1:
                    assert not data, "command fragment after data"
                    command += fragment
                    if control & 2:
                        continue
                else:
                    assert command, "data before the command's last fragment"
                    data += fragment
                    if control & 2:
                        break
            self.datasets.append(data)
            conn.sendall(_store_rsp(command, ctx))

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def raw_acceptor() -> Iterator[Callable[..., RawAcceptor]]:
    made: list[RawAcceptor] = []

    def make(*args: object, **kwargs: object) -> RawAcceptor:
        made.append(RawAcceptor(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for peer in made:
        peer.close()


@pytest.mark.parametrize("max_pdu", [64, 4096, 4099])
def test_every_pdu_is_framed_as_ps3_8_says(tmp_path: Path, max_pdu: int, counted: list[Path],
                                           raw_acceptor: Callable[..., RawAcceptor]) -> None:
    peer = raw_acceptor("store", max_pdu=max_pdu)
    files = [_sc_file(tmp_path, n) for n in (2, 4090, 4094, 200_000)]
    out = CStoreTransport("MAMMO_AI").send(_dest(peer.port), files)
    assert out.ok, out
    assert peer.errors == []
    assert counted == files
    assert peer.datasets == [_after_meta(f) for f in files]


def test_an_answer_the_associations_reactor_took_first_is_still_the_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        raw_acceptor: Callable[..., RawAcceptor]) -> None:
    """The reactor is let run while the answers come (as when a pause that had just ended
    still read as paused on a busy process): it takes each C-STORE-RSP off the DIMSE queue and
    drops it as unexpected. Each answer is still the request's, at once, not a 'no response'
    after the DIMSE timeout (this lost about one send in six under load before)."""
    peer = raw_acceptor("store", max_pdu=16384)
    files = [_sc_file(tmp_path, n) for n in (2, 4090, 200_000)]
    real_ack = fastsend._quick_ack
    live: list[object] = []

    def unpaused_while_answering(sock: socket.socket) -> None:
        real_ack(sock)
        assoc = live[-1]
        assoc._reactor_checkpoint.set()  # type: ignore[attr-defined]
        time.sleep(0.3)  # the answer arrives; the reactor takes it

    real_send = fastsend.send_file

    def spy(assoc, *args, **kwargs):  # type: ignore[no-untyped-def]
        live.append(assoc)
        return real_send(assoc, *args, **kwargs)

    monkeypatch.setattr(fastsend, "_quick_ack", unpaused_while_answering)
    monkeypatch.setattr(fastsend, "send_file", spy)
    caplog.set_level("WARNING", logger="pynetdicom")
    t0 = time.monotonic()
    out = CStoreTransport("MAMMO_AI", timeout=5).send(_dest(peer.port), files)
    assert out.ok and out.status == "0x0000", out
    assert time.monotonic() - t0 < 4, "an answer was waited for until the DIMSE timeout"
    assert peer.datasets == [_after_meta(f) for f in files]
    # the reactor did take them: the situation this test is about did happen
    assert caplog.text.count("Received unexpected C-STORE service message") == len(files)


def test_a_peer_aborting_mid_send_is_a_transient_failure(
        tmp_path: Path, counted: list[Path], raw_acceptor: Callable[..., RawAcceptor]) -> None:
    big = _sc_file(tmp_path, 24 * 1024 * 1024)  # more than the socket buffers hold
    peer = raw_acceptor("abort", abort_after=64 * 1024)
    t0 = time.monotonic()
    out = CStoreTransport("MAMMO_AI", timeout=20).send(_dest(peer.port), [big])
    assert not out.ok and not out.permanent, out  # retried, never marked sent
    assert "no response" in out.error
    assert time.monotonic() - t0 < 10  # noticed at once, not after the 20 s timeout
    assert counted == [big]


def test_a_refusal_before_the_dataset_was_read_is_the_peers_answer(
        tmp_path: Path, counted: list[Path], raw_acceptor: Callable[..., RawAcceptor]) -> None:
    big = _sc_file(tmp_path, 24 * 1024 * 1024)
    peer = raw_acceptor("refuse")
    out = CStoreTransport("MAMMO_AI", timeout=20).send(_dest(peer.port), [big])
    assert not out.ok and out.permanent and out.status == "0xA700", out
    assert counted == [big]


def test_a_peer_that_stops_reading_times_out(tmp_path: Path, counted: list[Path],
                                             raw_acceptor: Callable[..., RawAcceptor]) -> None:
    big = _sc_file(tmp_path, 24 * 1024 * 1024)
    peer = raw_acceptor("stall")
    t0 = time.monotonic()
    out = CStoreTransport("MAMMO_AI", timeout=1.5).send(_dest(peer.port), [big])
    took = time.monotonic() - t0
    assert not out.ok and not out.permanent, out
    assert 1.0 < took < 15, took
    assert counted == [big]


@pytest.mark.dcmtk
def test_an_aborting_destination_is_retried_and_never_marked_sent(
        tmp_path: Path, storescp: StoreSCP, inprocess_node: Callable[..., Node],
        raw_acceptor: Callable[..., RawAcceptor]) -> None:
    peer = raw_acceptor("abort", abort_after=200)  # inside the first C-STORE
    node = inprocess_node(FakeAnalyser(), [
        {"name": "aborts", "ae_title": "ABORTS", "host": "127.0.0.1", "port": peer.port},
        storescp.destination("up")],
        delivery={"max_attempts": 3, "backoff_initial_seconds": 0.2,
                  "backoff_max_seconds": 0.4})
    files = small_study(tmp_path / "in", 12, views=4)
    send(node, files)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    wait_done(node, uid)
    wait_until(lambda: deliveries(node).get("up", ("",))[0] == "done" or None, 30, 0.1,
               "the working destination's delivery")
    assert len(storescp.files()) == 5  # SR + 4 SC, through the lean path
    wait_until(lambda: deliveries(node)["aborts"][0] == "failed" or None, 30, 0.1,
               "the aborting destination to run out of attempts")
    state, attempts, error = deliveries(node)["aborts"]
    assert attempts == 3 and "no response" in (error or ""), (state, attempts, error)
    assert peer.associations >= 3  # each attempt reached the peer again
    with node.db.session() as s:
        rows = s.execute(select(DeliveryKind)).scalars().all()
        sent = {(r.delivery_id, r.kind) for r in rows if r.state == "done"}
        assert all(r.sent_at is None for r in rows if r.state != "done")
    up_id = next(i for i, n in _delivery_ids(node).items() if n == "up")
    assert sent and all(d == up_id for d, _ in sent)  # nothing of "aborts" marked sent


def _delivery_ids(node: Node) -> dict[int, str]:
    from node.db import Delivery

    with node.db.session() as s:
        return {d.id: d.destination for d in s.execute(select(Delivery)).scalars()}


def test_usable_only_on_a_plain_tcp_socket(tmp_path: Path,
                                           raw_acceptor: Callable[..., RawAcceptor]) -> None:
    """The internals the lean path uses are there (pynetdicom is pinned; an upgrade that
    moves them makes this fail, not the deliveries), and a TLS socket is never used."""
    import ssl

    peer = raw_acceptor("store")
    ae = AE(ae_title="MAMMO_AI")
    ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", peer.port, ae_title="PACS")
    try:
        assert assoc.is_established
        assert fastsend.usable(assoc)
        plain = assoc.dul.socket.socket  # type: ignore[union-attr]
        tls = ssl.create_default_context().wrap_socket(
            socket.socket(), server_hostname="pacs", do_handshake_on_connect=False)
        try:
            assoc.dul.socket.socket = tls  # type: ignore[union-attr]
            assert not fastsend.usable(assoc)
        finally:
            assoc.dul.socket.socket = plain  # type: ignore[union-attr]
            tls.close()
    finally:
        assoc.release()


@pytest.mark.dcmtk
def test_the_send_bench_runs() -> None:
    """bench/send.py end to end, this tree as its own baseline (one run per PDU size)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "bench.send", "--baseline-dir", str(repo),
                          "--repeats", "1", "--calls", "1", "--pdus", "16384"],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()
            if line.startswith(("tid1500 ", "sc "))]
    assert [r[0] for r in rows] == ["tid1500", "sc"], out.stdout
    assert all(float(r[7]) > 0 for r in rows)  # a ratio per kind
