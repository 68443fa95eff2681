"""A lean path for the bulk of a C-STORE dataset on accepted associations (pynetdicom 3.0).

pynetdicom handles every received P-DATA-TF PDU the same way: the PDU is copied twice into
``bytes``, decoded into PDV item objects (each fragment copied again), queued as an FSM event,
run through the state machine (DT-2), turned into a P-DATA primitive, and handed to the DIMSE
decoder, which copies each fragment once more before writing it to the dataset's temp file.
For a 27 MB image in 128 KiB PDUs that is ~210 rounds of it, and between them the reactor
sleeps 1 ms whenever the socket has not caught up yet.

Here the acceptor's DUL reactor reads a P-DATA-TF PDU itself and, when every PDV in it is a
dataset fragment that is not the last one of a chunked C-STORE dataset already being written
(the middle of every image), writes the fragments straight from the receive buffer to that
temp file (:class:`node.fastrecv._HashingTempFile`: SHA-256, free-space discard, writeback
hints), through ``memoryview`` slices: no copy, no event, no primitive. pynetdicom's own path
still handles everything else, unchanged and in the same order: association negotiation,
command sets, the first and the last fragment of each dataset (so the C-STORE request event,
the handler and the answer are pynetdicom's), in-memory datasets, A-RELEASE, A-ABORT, any PDU
in another state, a malformed PDU (pynetdicom decides, Evt19), and every association on which
someone bound ``EVT_DATA_RECV``, ``EVT_PDU_RECV`` or ``EVT_FSM_TRANSITION`` (those would not
fire for the PDUs taken here; pynetdicom's own logging handler of ``EVT_PDU_RECV`` logs nothing
for a P-DATA-TF, so it does not count). Reads keep the deadlines of :func:`node.fastrecv._recv`.

The reactor's idle wait is a ``select`` on the socket bounded by pynetdicom's 1 ms loop delay
instead of a plain 1 ms sleep, so data that arrives is read at once; and on a plain TCP socket
the next PDU's header is polled with one non-blocking ``read`` instead of ``select`` + ``poll``
+ ``recv``.

The association thread's reactor (``Association._run_reactor``, acceptor side) wakes every 1 ms
to poll for a complete DIMSE message, a release or an abort (~1,000 GIL hand-offs a second,
each taken from the thread that is receiving); here it waits on the DIMSE message queue, which
is also nudged whenever the DUL hands the association a primitive (release, abort, closed
connection), and otherwise re-checks every 50 ms (DUL thread gone, network timeout, kill).

Requestor associations (the node's own sends, node.deliver) keep pynetdicom's reactors.
:func:`install` is idempotent; the replaced code is pinned by tests/test_fastrecv_patch_points.py.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import standard_pdu_recv_handler

LOGGER = logging.getLogger("pynetdicom.dul")  # pynetdicom's logger, for its own messages
_HEADER = struct.Struct(">BBL")
_ITEM_LENGTH = struct.Struct(">L")
_P_DATA_TF = 0x04
_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
_TRANSPORT_NONE, _TRANSPORT_EVENT, _TRANSPORT_TAKEN = 0, 1, 2
_SILENT_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION)
_installed = False
_orig_run_reactor: Any = None
_orig_assoc_run_reactor: Any = None


def _dataset_file(dul: Any) -> Any:
    """The temp file of the chunked C-STORE dataset being received, when the next P-DATA-TF
    may be written to it directly; else None (pynetdicom's path decides)."""
    if dul.state_machine.current_state != "Sta6" or not dul.event_queue.empty():
        return None
    message = dul.assoc.dimse.message
    f = getattr(message, "_data_set_file", None) if message is not None else None
    if f is None:
        return None
    handlers = dul.assoc._handlers
    for event in _SILENT_EVENTS:
        for handler, _ in handlers.get(event, ()):
            if handler is not standard_pdu_recv_handler:  # its P-DATA-TF part does nothing
                return None
    return f


def _write_fragments(f: Any, body: bytearray) -> bool:
    """Write the PDVs of a P-DATA-TF ``body`` to ``f`` if all are non-last dataset fragments
    and the items are well formed; False (nothing written) otherwise."""
    end = len(body)
    spans: list[tuple[int, int]] = []
    off = 0
    while off < end:
        if end - off < 6:
            return False
        (length,) = _ITEM_LENGTH.unpack_from(body, off)
        stop = off + 4 + length
        # at least the context ID and the control header; inside the PDU
        if length < 2 or stop > end or body[off + 5] & 0x03:  # a command or a last fragment
            return False
        spans.append((off + 6, stop))
        off = stop
    if not spans:
        return False
    with memoryview(body) as view:
        for start, stop in spans:
            f.write(view[start:stop])
    f.file.flush()  # what pynetdicom does after each fragment (the file is complete on disk)
    return True


def _read_pdu(dul: Any, head: bytes = b"") -> int:
    """``DULServiceProvider._read_pdu_data`` for an acceptor, with the P-DATA-TF shortcut.
    ``head``: the first bytes of the PDU header, already read by :func:`_poll_header`.

    The error handling and the events put on the queue are pynetdicom's (READ_PDU_EXC_A..F).
    """
    sock = dul.socket
    try:
        header = head + sock.recv(6 - len(head)) if len(head) < 6 else head
    except (OSError, TimeoutError) as exc:
        LOGGER.error("Connection closed before the entire PDU was received")
        LOGGER.exception(exc)
        dul.event_queue.put("Evt17")
        return _TRANSPORT_EVENT
    try:
        pdu_type, _, pdu_length = _HEADER.unpack(header)
    except struct.error:
        dul.event_queue.put("Evt17")
        return _TRANSPORT_EVENT
    if pdu_type not in _PDU_TYPES:
        LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        dul.event_queue.put("Evt19")
        return _TRANSPORT_EVENT
    try:
        body = sock.recv(pdu_length)
    except (OSError, TimeoutError) as exc:
        LOGGER.error("Connection closed before the entire PDU was received")
        LOGGER.exception(exc)
        dul.event_queue.put("Evt17")
        return _TRANSPORT_EVENT
    if len(body) != pdu_length:
        LOGGER.error(
            f"The received PDU is shorter than expected ({len(body) + 6} of "
            f"{6 + pdu_length} bytes received)"
        )
        dul.event_queue.put("Evt17")
        return _TRANSPORT_EVENT
    if pdu_type == _P_DATA_TF:
        f = _dataset_file(dul)
        if f is not None and _write_fragments(f, body):
            return _TRANSPORT_TAKEN
    try:
        pdu, event = dul._decode_pdu(bytearray(header) + body)
        dul.event_queue.put(event)
    except Exception as exc:  # pynetdicom's READ_PDU_EXC_F: Evt19
        LOGGER.error("Unable to decode the received PDU data")
        LOGGER.exception(exc)
        dul.event_queue.put("Evt19")
        return _TRANSPORT_EVENT
    dul._recv_pdu.put(pdu)
    return _TRANSPORT_EVENT


def _transport_event(dul: Any) -> int:
    """``DULServiceProvider._is_transport_event`` with :func:`_read_pdu`: NONE, EVENT (an
    event was queued) or TAKEN (a PDU was written by the shortcut, nothing queued)."""
    sock = dul.socket
    if dul.state_machine.current_state == "Sta13":
        return _TRANSPORT_EVENT if dul._is_transport_event() else _TRANSPORT_NONE
    head = _poll_header(sock)
    if head is not None:
        return _read_pdu(dul, head) if head else _TRANSPORT_NONE
    if sock and sock.ready:
        return _read_pdu(dul)
    return _TRANSPORT_NONE


_NOTHING = b""


def _poll_header(assoc_socket: Any) -> bytes | None:
    """Up to 6 bytes of the next PDU if they are there, in one non-blocking ``read`` (instead of
    pynetdicom's ``select`` + Python's ``poll`` + ``recv``): b"" when nothing has arrived yet,
    None when this does not apply (TLS, a blocking socket, not connected, the connection
    closed or broken: pynetdicom's ``ready`` + read then see it and queue Evt17)."""
    raw = getattr(assoc_socket, "socket", None) if assoc_socket is not None else None
    if type(raw) is not socket.socket or not getattr(assoc_socket, "_is_connected", False):
        return None
    timeout = raw.gettimeout()
    if timeout is None or timeout <= 0:  # only then is the descriptor non-blocking
        return None
    try:
        head = os.read(raw.fileno(), 6)
    except BlockingIOError:
        return _NOTHING
    except OSError:  # reset, closed: pynetdicom's own path reports it
        return None
    if not head:  # the peer closed: pynetdicom's path reads that too (Evt17)
        return None
    assoc_socket.rx_bytes = getattr(assoc_socket, "rx_bytes", 0) + len(head)
    assoc_socket.rx_last = time.monotonic()
    return head


def _wait_readable(assoc_socket: Any, delay: float) -> None:
    """At most ``delay`` seconds, less when the socket has data (pynetdicom: ``sleep(delay)``)."""
    raw = getattr(assoc_socket, "socket", None) if assoc_socket is not None else None
    if raw is None or not getattr(assoc_socket, "_is_connected", False):
        time.sleep(delay)
        return
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return
    try:
        select.select([raw], [], [], delay)
    except (OSError, ValueError):  # closed meanwhile: the reactor's own checks see it
        time.sleep(delay)


def _run_reactor(self: Any) -> None:
    """``DULServiceProvider.run_reactor``; for an acceptor with the two changes above."""
    if not self.assoc.is_acceptor:
        _orig_run_reactor(self)
        return
    from pynetdicom.pdu import A_ABORT_RQ

    self._idle_timer.start()
    sleep = False
    while True:
        if not self.assoc._dul_ready.is_set():
            self.assoc._dul_ready.set()
            sleep = True
        if sleep:
            _wait_readable(self.socket, self._run_loop_delay)
        if self._kill_thread:
            break
        if self.artim_timer.expired:
            self.event_queue.put("Evt18")
        try:
            if self._process_recv_primitive():
                pass
            else:
                got = _transport_event(self)
                if got != _TRANSPORT_NONE:
                    self._idle_timer.restart()
                if got == _TRANSPORT_TAKEN:
                    sleep = False
                    continue
        except Exception as exc:  # pynetdicom's own handling, kept as is
            LOGGER.error("Exception in DUL.run(), aborting association")
            LOGGER.exception(exc)
            abort_pdu = A_ABORT_RQ()
            abort_pdu.source = 0x02
            abort_pdu.reason_diagnostic = 0x00
            self.socket.send(abort_pdu.encode())
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            self.assoc._kill = True
            self._kill_thread = True
            return
        try:
            event = self.event_queue.get(block=False)
        except queue.Empty:
            sleep = True
            continue
        self.state_machine.do_action(event)
        sleep = False


class _WakingQueue(queue.Queue[Any]):
    """The DUL's ``to_user_queue`` (A-RELEASE, A-ABORT, A-P-ABORT indications for the
    association thread): each put also wakes that thread's wait on the DIMSE message queue
    with a ``(None, None)`` item, which the reactor reads as "no message".

    Not while the reactor is paused: pynetdicom pauses it when a handler sends on its own
    association (``send_c_store`` from a C-GET SCP...) and reads the answer from the same
    queue, where a wake-up item would read as "no answer". The node's handlers never do."""

    wake: queue.Queue[Any]
    running: threading.Event  # the association's _reactor_checkpoint

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if self.running.is_set():
            self.wake.put((None, None))


#: The association thread's longest wait between its checks. A DIMSE message, a release or an
#: abort from the peer and a closed connection wake it at once; this bounds how late it sees
#: the DUL thread gone without a word, the network timeout and a local kill().
_ASSOC_POLL = 0.05


def _assoc_run_reactor(self: Any) -> None:
    """``Association._run_reactor`` (acceptor): the 1 ms sleep + non-blocking poll of the DIMSE
    message queue becomes a wait on that queue, woken by a complete message or by anything the
    DUL hands the association (:class:`_WakingQueue`); the checks are pynetdicom's."""
    if not self.is_acceptor:
        _orig_assoc_run_reactor(self)
        return
    self._is_paused = False
    msg_queue = self.dimse.msg_queue
    to_user = self.dul.to_user_queue
    if type(to_user) is queue.Queue:
        to_user.wake = msg_queue  # type: ignore[attr-defined]
        to_user.running = self._reactor_checkpoint  # type: ignore[attr-defined]
        to_user.__class__ = _WakingQueue  # in place: the DUL thread keeps putting into it
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        try:
            # pynetdicom: dimse.get_msg(block=False) after a 1 ms sleep
            context_id, msg = msg_queue.get(timeout=_ASSOC_POLL)
        except queue.Empty:
            msg = None
        if msg:
            self._serve_request(msg, context_id)
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            logging.getLogger("pynetdicom.assoc").info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            logging.getLogger("pynetdicom.assoc").info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            _orig_idle_expired(self)
            return


def _orig_idle_expired(self: Any) -> None:
    """pynetdicom's network-timeout branch of ``Association._run_reactor``."""
    logging.getLogger("pynetdicom.assoc").error("Network timeout reached")
    if self.network_timeout_response == "A-RELEASE":
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self.release()
        self._is_paused = False
    else:
        self.abort()
    self.kill()


def install() -> None:
    """Replace the acceptor's two reactors (requestors keep pynetdicom's). Process-wide."""
    global _installed, _orig_run_reactor, _orig_assoc_run_reactor
    if _installed:
        return
    from pynetdicom import association, dul

    _orig_run_reactor = dul.DULServiceProvider.run_reactor
    dul.DULServiceProvider.run_reactor = _run_reactor  # type: ignore[method-assign]
    _orig_assoc_run_reactor = association.Association._run_reactor
    association.Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
    _installed = True
