"""Lean C-STORE request of a file's dataset over an association pynetdicom negotiated.

pynetdicom's own send of a dataset from a file (``send_c_store(path)`` with
``STORE_SEND_CHUNKED_DATASET``) turns every PDU into a ``P_DATA`` primitive, queues it to the
DUL thread, runs it through the state machine, copies the bytes three times (fragment, PDV,
PDU) and writes it with ``socket.send``; a 10 MB Secondary Capture to a peer taking 16 KiB PDUs
is 640 such round trips between two threads contending for the GIL. Here the C-STORE-RQ
command and the dataset's bytes go straight to the association's socket as P-DATA-TF PDUs: a
12-byte header and a slice of a read buffer each, many PDUs per ``sendmsg`` call, no copy of
the payload in Python. pynetdicom keeps everything else: it negotiated the association, its
DUL thread keeps reading the socket and decodes the C-STORE-RSP, and it releases or aborts.

Used only where it is safe (:func:`usable`): a plain TCP socket (a TLS socket goes through
pynetdicom's send: an ``ssl.SSLSocket`` must not be written by one thread while another reads
it) and the pynetdicom internals this relies on present (pinned in pyproject; checked by
tests/test_fastsend.py). The state machine stays in Sta6 (data transfer) throughout: sending
P-DATA does not change the association's state.

The association's own reactor thread may take the C-STORE-RSP off the DIMSE queue before this
module looks (and drop it as "unexpected"): pausing it, as pynetdicom's ``send_*`` do, leaves a
window where a pause that has just ended still reads as paused (the reactor was woken but has not
run yet), and on a busy process the next request's answer can come within it. Every C-STORE-RSP
is therefore also caught as it is decoded (:class:`_Responses`, on ``EVT_DIMSE_RECV``), and an
answer seen there but not on the queue is taken from there: a lost answer is never waited for
until the DIMSE timeout.

Guarantees: the status returned is the peer's C-STORE-RSP for this request's Message ID, or an
empty Dataset (no status: nothing is marked sent) when the connection broke, the peer aborted,
stopped reading for ``timeout`` seconds, or did not answer within the DIMSE timeout; after a
broken send the association is aborted (the byte stream may end inside a PDU).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

# Bytes read per buffer fill (rounded down to whole PDUs): bounds memory whatever the file size.
_CHUNK = 4 << 20
_MAX_IOV = 512  # buffers per sendmsg (IOV_MAX is 1024 on Linux)
_UNLIMITED_PDU = 1 << 20  # payload per PDU when the peer sets no maximum (0)
_POLL_S = 0.05  # how often the wait for the response looks for an abort
_QUICK_S, _QUICK_POLL_S = 0.5, 0.002  # the first half second: quick ACKs (_quick_ack)
# An answer caught on decoding (_Responses) but not on the DIMSE queue after this long was taken
# by the reactor: the DUL thread puts it on the queue right after the catch, microseconds later.
_STOLEN_AFTER_S = 0.01
_LEAVE_PAUSE_S = 0.5  # the longest wait for the reactor to leave the previous request's pause


class SendBroken(Exception):
    """The socket failed or the peer stopped reading: the association is unusable."""


def usable(assoc: Association) -> bool:
    """Whether :func:`send_file` may send on this association: established, a plain TCP
    socket, and pynetdicom's internals as this module expects them."""
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    return (assoc.is_established and isinstance(sock, socket.socket)
            and not isinstance(sock, ssl.SSLSocket)
            and hasattr(assoc, "_reactor_checkpoint") and hasattr(assoc, "_is_paused")
            and hasattr(assoc.dimse, "msg_queue") and hasattr(assoc, "_check_received_status"))


def payload_size(peer_max_pdu: int | None) -> int:
    """Data bytes per P-DATA-TF PDU for a peer's Maximum Length Received: the PDU's length
    field counts the PDV item's 4-byte length, context ID and control header (6 bytes) plus
    the fragment; even (fragments of a dataset keep even offsets), at least 1."""
    if not peer_max_pdu:
        return _UNLIMITED_PDU
    size = peer_max_pdu - 6
    if size >= 2:
        size -= size % 2
    return max(size, 1)


def _header(context_id: int, control: int, length: int) -> bytes:
    """P-DATA-TF PDU header with one PDV item of ``length`` data bytes (PS3.8 9.3.5)."""
    return struct.pack(">BBLLBB", 0x04, 0x00, length + 6, length + 2, context_id, control)


def command_set(sop_class: str, sop_instance: str, message_id: int, priority: int = 2) -> bytes:
    """The C-STORE-RQ command set (Implicit VR Little Endian), as pynetdicom would encode it
    for a dataset sent from a file."""
    req = C_STORE()
    req.MessageID = message_id
    req.Priority = priority
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req._dataset_path = (Path(), 0)  # "a data set follows"
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    out = encode(msg.command_set, True, True)
    assert out is not None  # pynetdicom's own command set always encodes
    return out


class _Responses:
    """The C-STORE-RSPs of one association by Message ID Being Responded To, caught by an
    ``EVT_DIMSE_RECV`` handler in the DUL thread as each is decoded (before it is queued)."""

    def __init__(self, assoc: Association) -> None:
        self._lock = threading.Lock()
        self._caught: dict[int, tuple[float, C_STORE]] = {}
        self.paused_last = False  # whether a request of this module paused the reactor last
        assoc.bind(evt.EVT_DIMSE_RECV, self._on_message)

    def _on_message(self, event: evt.Event) -> None:
        try:
            primitive = event.message.message_to_primitive()
        except Exception:  # noqa: BLE001 - pynetdicom reports an undecodable message itself
            return
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            with self._lock:
                self._caught[int(primitive.MessageIDBeingRespondedTo)] = (time.monotonic(),
                                                                          primitive)

    def forget(self, message_id: int) -> None:
        with self._lock:
            self._caught.pop(message_id, None)

    def stolen(self, message_id: int) -> C_STORE | None:
        """The answer to ``message_id`` when it was caught but never reached the queue."""
        with self._lock:
            got = self._caught.get(message_id)
            if got is None or time.monotonic() - got[0] < _STOLEN_AFTER_S:
                return None
            del self._caught[message_id]
        return got[1]


_RESPONSES: weakref.WeakKeyDictionary[Association, _Responses] = weakref.WeakKeyDictionary()


def _responses(assoc: Association) -> _Responses:
    """The association's catcher, bound before its first request (nothing is in flight yet)."""
    got = _RESPONSES.get(assoc)
    if got is None:
        got = _RESPONSES[assoc] = _Responses(assoc)
    return got


class _Sender:
    """Writes byte buffers to a socket with ``sendmsg``, never blocking longer than
    ``timeout`` for the peer to read."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLOUT)

    def send(self, buffers: list[memoryview]) -> None:
        i, n = 0, len(buffers)
        while i < n:
            try:
                sent = self.sock.sendmsg(buffers[i:i + _MAX_IOV], [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not self.poll.poll(self.timeout * 1000):
                    raise SendBroken(f"the peer read nothing for {self.timeout:g} s") from None
                continue
            except OSError as exc:
                raise SendBroken(f"connection lost while sending: {exc}") from exc
            while sent:
                size = len(buffers[i])
                if sent >= size:
                    sent -= size
                    i += 1
                else:
                    buffers[i] = buffers[i][sent:]
                    sent = 0


def send_file(assoc: Association, path: Path, offset: int, sop_class: str, sop_instance: str,
              context_id: int, message_id: int = 1, timeout: float = 60) -> Dataset:
    """C-STORE the dataset of the DICOM file at ``path`` (its bytes from ``offset``, encoded
    in the transfer syntax of presentation context ``context_id``) and wait for the answer.
    Returns the response's status elements (as ``Association.send_c_store``), or an empty
    Dataset when no answer came (see the module's guarantees)."""
    sock = cast(socket.socket, assoc.dul.socket.socket)  # type: ignore[union-attr]
    payload = payload_size(assoc.acceptor.maximum_length)
    command = command_set(sop_class, sop_instance, message_id)
    responses = _responses(assoc)
    responses.forget(message_id)
    # Pause the association's reactor (as pynetdicom's send_* do) so that it does not take
    # the response off the DIMSE queue first. Right after the previous request's pause ended
    # the reactor may not have run yet and still reads as paused: wait until it has left that
    # pause (bounded: a reactor that has stopped never will), then pause it anew.
    if responses.paused_last:
        leave_previous_pause(assoc)
    assoc._reactor_checkpoint.clear()
    responses.paused_last = True
    try:
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            _write(sock, path, offset, command, context_id, payload, timeout)
            _quick_ack(sock)
        except SendBroken:
            # a peer may answer (a failure status) and close before it has read everything
            early = _response(assoc, message_id, 0, responses=responses)
            assoc._reactor_checkpoint.set()
            assoc.abort()
            return assoc._check_received_status(early) if early is not None else Dataset()
        rsp = _response(assoc, message_id, assoc.dimse_timeout, sock, responses)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        if assoc.is_established:
            assoc.abort()
        return Dataset()
    status: Dataset = assoc._check_received_status(rsp)
    return status


def leave_previous_pause(assoc: Association) -> None:
    """Wait (at most :data:`_LEAVE_PAUSE_S`) until the association's reactor has run after the
    pause of the request before (it reads as paused until it has): call before pausing it
    again, here or in pynetdicom's ``send_*``."""
    left_by = time.monotonic() + _LEAVE_PAUSE_S
    while assoc._is_paused and time.monotonic() < left_by:
        time.sleep(0.0001)


def _write(sock: socket.socket, path: Path, offset: int, command: bytes, context_id: int,
           payload: int, timeout: float) -> None:
    """The command PDU(s), then the dataset's PDUs, the file read a buffer of whole PDUs at a
    time."""
    # The last PDU's tail must not wait for the peer's (delayed) ACK of the previous segment
    # (Nagle): the answer cannot come before it.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sender = _Sender(sock, timeout)
    buffers: list[memoryview] = []
    for start in range(0, len(command), payload):
        part = memoryview(command)[start:start + payload]
        last = start + payload >= len(command)
        buffers += [memoryview(_header(context_id, 0x03 if last else 0x01, len(part))), part]
    with open(path, "rb", buffering=0) as fh:
        remaining = os.fstat(fh.fileno()).st_size - offset
        if remaining <= 0:
            raise SendBroken(f"{path.name} has no dataset after its meta header")
        fh.seek(offset)
        per_fill = max(1, min(_CHUNK // payload, _MAX_IOV // 2 - 2)) * payload
        buf = bytearray(min(per_fill, remaining))
        view = memoryview(buf)
        while remaining:
            want = min(len(buf), remaining)
            got = fh.readinto(view[:want])
            if got != want:
                raise SendBroken(f"{path.name} ended early (read {got} of {want} bytes)")
            for start in range(0, got, payload):
                part = view[start:min(start + payload, got)]
                last = remaining - start <= payload
                buffers += [memoryview(_header(context_id, 0x02 if last else 0x00, len(part))),
                            part]
            sender.send(buffers)
            buffers = []
            remaining -= got


def _quick_ack(sock: socket.socket) -> None:
    """ACK what the peer sends next at once: a peer with Nagle's algorithm on that writes its
    C-STORE-RSP in two pieces (dcmtk: PDU header, then the rest) holds the second until the
    first is ACKed, and a delayed ACK would hold it up to 40 ms. Linux only; not permanent, so
    set after each request."""
    if hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):  # the connection just broke: the wait says so
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _response(assoc: Association, message_id: int, limit: float | None,
              sock: socket.socket | None = None, responses: _Responses | None = None) -> Any:
    """The C-STORE-RSP to ``message_id`` from the DIMSE queue the DUL thread fills; None when
    the peer aborted, the connection closed or nothing came within ``limit`` seconds. For the
    first :data:`_QUICK_S` seconds ``sock`` ACKs at once (:func:`_quick_ack`: the kernel may
    leave quick-ACK mode again, so it is set on every look). ``responses``: the answer caught
    on decoding is taken when the reactor took it off the queue first (module docstring)."""
    start = time.monotonic()
    while True:
        waited = time.monotonic() - start
        if limit is not None and waited >= limit:
            try:  # one that is already there (limit 0: a look without waiting)
                _, msg = assoc.dimse.msg_queue.get_nowait()
            except queue.Empty:
                return responses.stolen(message_id) if responses is not None else None
            return msg if isinstance(msg, C_STORE) and \
                msg.MessageIDBeingRespondedTo == message_id else None
        quick = sock is not None and waited < _QUICK_S
        if quick:
            _quick_ack(cast(socket.socket, sock))
        try:
            _, msg = assoc.dimse.msg_queue.get(timeout=_QUICK_POLL_S if quick else _POLL_S)
        except queue.Empty:
            stolen = responses.stolen(message_id) if responses is not None else None
            if stolen is not None:
                return stolen
            if assoc.acse.is_aborted() or not assoc.dul.is_alive():
                return None
            continue
        if msg is None:  # the state machine's sign that the association was aborted
            return None
        if isinstance(msg, C_STORE) and msg.MessageIDBeingRespondedTo == message_id:
            if responses is not None:
                responses.forget(message_id)
            return msg
        # anything else on a requestor's association (a late answer to nothing we sent) is
        # not our answer: keep waiting
