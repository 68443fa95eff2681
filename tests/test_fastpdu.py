"""node/fastpdu.py: the acceptor's P-DATA-TF shortcut writes exactly the bytes that were sent.

A requestor written here sends raw P-DATA-TF PDUs over a real association (negotiated by
pynetdicom) to the node's Receiver, with layouts dcmtk's storescu never produces: fragments of
1, 7, 4093 or 65,537 bytes, several PDVs per PDU, the command's last fragment and the first
dataset fragments in one PDU, the last dataset fragment after non-last ones in one PDU, two
C-STOREs on one association, two associations sending at once, and an association that dies in
the middle of a dataset. Each stored file must hold the sent dataset byte for byte and the
database its SHA-256; the shortcut must have carried most of the bytes; nothing partial stays.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from sqlalchemy import select

from bench.studies import StudyFactory
from node import fastpdu
from node.db import Database, Instance
from node.receive import Receiver
from node.store import Spool
from tests.receivers import local_receiver

MAX_PDU = 131072


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    r = local_receiver(spool, db, max_pdu_size=MAX_PDU, max_associations=8)
    r.start()
    yield r
    r.stop()
    db.dispose()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight 1.7 MB synthetic mammograms (two studies), as the benchmarks send them."""
    out = tmp_path_factory.mktemp("fastpdu-images")
    factory = StudyFactory("tiny", "raw", tag="test-fastpdu")
    return factory.write_study(0, out / "s0") + factory.write_study(1, out / "s1")


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes and PDUs the shortcut wrote (to prove it carried the transfer)."""
    counts = {"pdus": 0, "bytes": 0}
    real = fastpdu._write_fragments

    def counting(f: object, body: bytearray) -> bool:
        ok = real(f, body)
        if ok:
            counts["pdus"] += 1
            counts["bytes"] += len(body)
        return ok

    monkeypatch.setattr(fastpdu, "_write_fragments", counting)
    return counts


def _dataset_bytes(path: Path) -> bytes:
    """The dataset of a Part 10 file as it travels in a C-STORE: without preamble and meta."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    (meta_len,) = struct.unpack_from("<L", raw, 132 + 8)  # (0002,0000) UL, explicit VR
    return raw[132 + 12 + meta_len:]


def _command(path: Path, message_id: int) -> bytes:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    prim = C_STORE()
    prim.MessageID = message_id
    prim.AffectedSOPClassUID = ds.SOPClassUID
    prim.AffectedSOPInstanceUID = ds.SOPInstanceUID
    prim.Priority = 2
    prim.DataSet = BytesIO(b"\x00")
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    return bytes(encode(msg.command_set, True, True))


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def _pdus(pdvs: list[bytes], per_pdu: int) -> list[bytes]:
    """Pack PDV items into P-DATA-TF PDUs of at most ``per_pdu`` PDVs and MAX_PDU bytes."""
    out: list[bytes] = []
    batch: list[bytes] = []
    for item in pdvs:
        if batch and (len(batch) == per_pdu or sum(map(len, batch)) + len(item) > MAX_PDU):
            out.append(b"".join(batch))
            batch = []
        batch.append(item)
    out.append(b"".join(batch))
    return [struct.pack(">BBL", 0x04, 0, len(body)) + body for body in out]


def _c_store_pdus(path: Path, context_id: int, message_id: int, sizes: list[int],
                  per_pdu: int) -> list[bytes]:
    """The command (in two fragments, the last one sharing a PDU with the first dataset
    fragments) and the dataset cut into fragments of the cycling ``sizes``."""
    cmd = _command(path, message_id)
    data = _dataset_bytes(path)
    pdvs = [_pdv(context_id, 0x01, cmd[:10]), _pdv(context_id, 0x03, cmd[10:])]
    pos, k = 0, 0
    while pos < len(data):
        n = min(sizes[k % len(sizes)], len(data) - pos, MAX_PDU - 6 - 6)
        last = pos + n == len(data)
        pdvs.append(_pdv(context_id, 0x02 if last else 0x00, data[pos:pos + n]))
        pos, k = pos + n, k + 1
    # the command's first fragment alone; its last fragment leads the next PDU
    return _pdus(pdvs[:1], 1) + _pdus(pdvs[1:], per_pdu)


def _associate(port: int, path: Path) -> tuple[Association, int]:
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID,
                             ExplicitVRLittleEndian)
    ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMO_AI", max_pdu=MAX_PDU)
    assert assoc.is_established
    return assoc, assoc.accepted_contexts[0].context_id


def _send_raw(assoc: Association, pdus: list[bytes], chunk: int | None = None) -> int:
    """Write the PDUs on the association's socket (``chunk``: in writes of that many bytes,
    so PDUs arrive split at odd places); the C-STORE answer's status."""
    assoc._reactor_checkpoint.clear()  # as pynetdicom's own send_c_* do: pause its reactor
    while not assoc._is_paused:
        time.sleep(0.0001)
    sock = assoc.dul.socket.socket
    stream = b"".join(pdus)
    step = chunk or len(stream)
    for i in range(0, len(stream), step):
        sock.sendall(stream[i:i + step])
    _, rsp = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    assert rsp is not None, "no C-STORE answer"
    return int(rsp.Status)


def _check_stored(receiver: Receiver, path: Path) -> None:
    sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    with receiver.db.session() as s:
        inst = s.execute(select(Instance).where(Instance.sop_uid == sop)).scalar_one()
    stored = receiver.spool.path(inst.relpath).read_bytes()
    assert _dataset_bytes(receiver.spool.path(inst.relpath)) == _dataset_bytes(path)
    assert inst.size == len(stored)
    assert inst.sha256 == hashlib.sha256(stored).hexdigest()


def test_odd_fragments_several_per_pdu_two_stores_on_one_association(
        receiver: Receiver, images: list[Path], taken: dict[str, int]) -> None:
    assoc, cx = _associate(receiver.port, images[0])
    try:
        first = _c_store_pdus(images[0], cx, 1, [1, 7, 4093, 65537, 3, 30001], per_pdu=5)
        assert _send_raw(assoc, first, chunk=9973) == 0x0000  # writes split PDUs anywhere
        second = _c_store_pdus(images[1], cx, 2, [131000], per_pdu=1)
        assert _send_raw(assoc, second) == 0x0000
    finally:
        assoc.release()
    _check_stored(receiver, images[0])
    _check_stored(receiver, images[1])
    sent = len(_dataset_bytes(images[0])) + len(_dataset_bytes(images[1]))
    assert taken["bytes"] > 0.8 * sent, taken  # the shortcut carried the bulk of both
    assert list(receiver.spool.incoming.iterdir()) == []


def test_two_associations_at_once(receiver: Receiver, images: list[Path],
                                  taken: dict[str, int]) -> None:
    statuses: dict[int, list[int]] = {0: [], 1: []}

    def send(k: int) -> None:
        assoc, cx = _associate(receiver.port, images[2 + k])
        try:
            for j, path in enumerate(images[2 + k::2][:3]):  # 3 images each, interleaved
                pdus = _c_store_pdus(path, cx, j + 1, [16381, 2, 40000 + k], per_pdu=3)
                statuses[k].append(_send_raw(assoc, pdus, chunk=65536 + 17 * k))
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == {0: [0, 0, 0], 1: [0, 0, 0]}
    for path in images[2:8]:
        _check_stored(receiver, path)
    assert taken["pdus"] > 0
    assert list(receiver.spool.incoming.iterdir()) == []


def test_association_lost_in_the_middle_of_a_dataset_leaves_nothing(
        receiver: Receiver, images: list[Path], taken: dict[str, int]) -> None:
    assoc, cx = _associate(receiver.port, images[0])
    pdus = _c_store_pdus(images[0], cx, 1, [65000], per_pdu=2)
    sock = assoc.dul.socket.socket
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    sock.sendall(b"".join(pdus[: len(pdus) // 2]))
    deadline = time.monotonic() + 10
    while taken["pdus"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert taken["pdus"] > 0  # part of the dataset went through the shortcut
    assoc.abort()
    deadline = time.monotonic() + 10
    while list(receiver.spool.incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(receiver.spool.incoming.iterdir()) == []  # the partial temp file is gone
    with receiver.db.session() as s:
        assert s.execute(select(Instance)).first() is None
