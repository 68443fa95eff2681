"""Faster chunked C-STORE receive: fewer syscalls, and the SHA-256 computed while data arrives.

Two narrow adjustments to pynetdicom 3.0 (measured with ``python -m bench --only ingest``):

* ``AssociationSocket.recv`` reads a PDU with ``recv_into`` into one pre-sized buffer instead of
  4 KiB ``recv`` calls appended to a growing bytearray (~6,700 calls per 27 MB instance).
* The temporary file pynetdicom streams a C-STORE dataset into is wrapped so that every chunk is
  also fed to SHA-256 as it is written. :meth:`node.store.Spool.adopt` then takes the digest with
  :func:`take_digest` instead of reading the whole file back before the fsync.
* Every 4 MiB the wrapper asks the kernel to start writing the new range to disk (Linux
  ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, asynchronous), so the fsync before the 0x0000 only
  waits for the tail (16 -> ~10 ms per 27 MB instance here, more where the disk is slow).

While the disk is below the node's free-space limit (:func:`set_space_guard`), a new C-STORE's
bytes are counted and hashed but not written: the handler then answers 0xA700 without anything
partial having reached the disk (:func:`discarded`).

Read deadlines (:func:`set_read_limits`, acceptor side only): pynetdicom resets its idle timer
only between complete PDUs and reads a PDU with blocking ``recv`` calls, so a peer that sends the
first bytes of a PDU and then nothing (or one byte a minute) held its association, and its slot,
forever. Here every read inside a PDU waits at most ``pdu_timeout`` seconds, and after that grace
the bytes must keep arriving at ``min_rate`` bytes/s on average; otherwise the connection is shut
down, the association ends as if the peer had closed it (logged as ``association.stalled``) and
:func:`discard_partial` removes what its unfinished C-STORE had written.

The digest is only used when the byte count matches the file on disk, so a write that bypassed
the wrapper falls back to hashing the file. :func:`install` is idempotent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MAX_PENDING = 256  # digests of files never adopted (refused, aborted) are dropped oldest-first
_lock = threading.Lock()
_pending: OrderedDict[str, _HashingTempFile] = OrderedDict()
_installed = False
_space_ok: Callable[[], bool] | None = None  # False: the disk is below the free-space limit
_WRITEBACK_STEP = 4 << 20
_SYNC_FILE_RANGE_WRITE = 2
# (seconds of silence allowed inside a PDU, minimum bytes/s after that grace); None: no limit.
_read_limits: tuple[float, float] | None = None
_incoming_dir: str | None = None  # where C-STORE datasets stream to (the spool's incoming/)
log = logging.getLogger("node.fastrecv")


def _load_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: the fsync does all the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


_sync_file_range = _load_sync_file_range()


class _HashingTempFile:
    """A ``NamedTemporaryFile`` whose ``write`` also updates a SHA-256 and a byte count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _incoming_dir is not None and "dir" not in kwargs and len(args) < 7:
            kwargs["dir"] = _incoming_dir  # pynetdicom names no folder
        self._file = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115
        self.name = self._file.name
        self.file = self._file.file
        self._sha = hashlib.sha256()
        self.size = 0
        self._flushed_to = 0  # bytes already handed to the kernel's writeback
        # Decided once per dataset: a C-STORE that starts while the disk is low writes nothing.
        self.discard = _space_ok is not None and not _space_ok()
        with _lock:
            _pending[str(Path(self.name))] = self
            while len(_pending) > _MAX_PENDING:
                _pending.popitem(last=False)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._sha.update(data)
        self.size += len(data)
        if self.discard:
            return len(data)
        n = self._file.write(data)
        if _sync_file_range is not None and self.size - self._flushed_to >= _WRITEBACK_STEP:
            self.file.flush()
            _sync_file_range(self.file.fileno(), self._flushed_to, self.size - self._flushed_to,
                             _SYNC_FILE_RANGE_WRITE)  # a hint: errors are left to the fsync
            self._flushed_to = self.size
        return n

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def set_space_guard(space_ok: Callable[[], bool] | None) -> None:
    """``space_ok()`` is asked when a C-STORE dataset starts; False discards its bytes."""
    global _space_ok
    _space_ok = space_ok


def discarded(path: Path | str) -> int | None:
    """Bytes received but not written for ``path`` (disk low when it started); None if written."""
    with _lock:
        entry = _pending.get(str(Path(path)))
        if entry is None or not entry.discard:
            return None
        del _pending[str(Path(path))]
    return entry.size


def set_incoming_dir(path: Path | str | None) -> None:
    """Stream received C-STORE datasets into ``path`` (the spool's incoming/, on the same
    filesystem as the store, so adopting one is a rename). Only these temp files go there: the
    process's ``tempfile`` default is left alone. None: tempfile's default."""
    global _incoming_dir
    _incoming_dir = None if path is None else str(path)


def set_read_limits(pdu_timeout: float | None, min_rate_bytes: float = 0.0) -> None:
    """Deadlines for reads inside a PDU on accepted connections (None: pynetdicom's own)."""
    global _read_limits
    _read_limits = None if pdu_timeout is None else (float(pdu_timeout), float(min_rate_bytes))


def discard_partial(message: Any) -> str | None:
    """Close and delete the temp file of a C-STORE that will never complete; its path or None.

    ``message`` is the DIMSE message pynetdicom was still decoding when the association ended
    (``assoc.dimse.message``); a complete one has been handed to the handler and reset already.
    """
    f = getattr(message, "_data_set_file", None)
    if f is None:
        return None
    name = str(getattr(f, "name", ""))
    with contextlib.suppress(Exception):
        f.close()
    with _lock:
        _pending.pop(str(Path(name)), None)
    with contextlib.suppress(OSError):
        os.unlink(name)
    message._data_set_file = None
    message._data_set_path = None
    return name


def take_digest(path: Path | str) -> tuple[int, str] | None:
    """(bytes written, SHA-256 hex) of a received temp file, once; None when unknown."""
    with _lock:
        entry = _pending.pop(str(Path(path)), None)
    if entry is None:
        return None
    if not entry.file.closed:
        entry.file.flush()
    return entry.size, entry.hexdigest()


_RECV_STEP = 4 << 20  # first buffer size; it grows only as data actually arrives


def _recv(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: read ``nr_bytes`` (fewer on a closed connection).

    The buffer starts at most 4 MiB and doubles as it fills, so a peer that declares a 4 GiB PDU
    and sends nothing costs 4 MiB, not 4 GiB. On an accepted connection the read deadlines of
    :func:`set_read_limits` apply; a peer that misses them is cut off (fewer bytes returned).
    """
    sock = self.socket
    acceptor = getattr(getattr(self, "assoc", None), "is_acceptor", False)
    limits = _read_limits if acceptor else None
    start = time.monotonic()
    buf = bytearray(min(nr_bytes, _RECV_STEP))
    n = 0
    while n < nr_bytes:
        if n == len(buf):
            buf.extend(bytes(min(nr_bytes - n, len(buf))))
        if limits is not None:
            timeout, rate = limits
            # After the grace of `timeout` s, the bytes so far must keep up with `rate` bytes/s.
            owed = start + timeout + (n / rate if rate > 0 else float("inf")) - time.monotonic()
            if owed <= 0:
                return _cut_off(self, buf, n, nr_bytes, start, "too slow")
            wait = min(timeout, owed)
            current = sock.gettimeout()
            # settimeout costs an ioctl: keep the current one unless it would overshoot the
            # deadline by more than 5 % of pdu_timeout (it is ~1 ms short at each PDU start)
            if current is None or wait > current or wait < current - 0.05 * timeout:
                sock.settimeout(wait)
        try:
            with memoryview(buf) as view:
                got = sock.recv_into(view[n:], len(buf) - n)
        except TimeoutError:
            return _cut_off(self, buf, n, nr_bytes, start, "stalled")
        except ConnectionError:  # reset by the peer: the same as a close (and no traceback)
            got = 0
        if not got:  # connection closed: return what was read
            del buf[n:]
            return buf
        n += got
        self.rx_bytes = getattr(self, "rx_bytes", 0) + got  # for the message watchdog
        self.rx_last = time.monotonic()
    if limits is not None and sock.gettimeout() != limits[0]:
        sock.settimeout(limits[0])  # what a send may wait for the peer to read
    return buf


def read_limits() -> tuple[float, float] | None:
    return _read_limits


def message_verdict(assoc_socket: Any, started: float, bytes_at_start: int,
                    now: float) -> str | None:
    """For the watchdog (node.security): a DIMSE message in progress since ``started`` must not
    pause longer than ``pdu_timeout`` between PDUs, and after that grace must keep up with the
    minimum rate; "stalled", "too slow" or None."""
    if _read_limits is None:
        return None
    timeout, rate = _read_limits
    last = getattr(assoc_socket, "rx_last", started)
    if now - max(last, started) > timeout:
        return "stalled"
    got = getattr(assoc_socket, "rx_bytes", 0) - bytes_at_start
    if rate > 0 and now - started > timeout and got < rate * (now - started - timeout):
        return "too slow"
    return None


def cut_off(assoc_socket: Any, why: str, received: int, seconds: float) -> None:
    """Log, count and shut the connection of a message that stalled between PDUs."""
    from node import metrics
    from node.log import event

    timeout, rate = _read_limits or (0.0, 0.0)
    requestor = getattr(assoc_socket.assoc, "requestor", None)
    event(log, "association.stalled", logging.WARNING,
          peer_aet=getattr(requestor, "ae_title", None) or None,
          peer=f"{getattr(requestor, 'address', '?')}:{getattr(requestor, 'port', '?')}",
          reason=why, received=received, seconds=round(seconds, 1), where="between PDUs",
          limit=f"node.pdu_timeout={timeout:g}s, node.min_receive_rate_kib={rate / 1024:g}")
    metrics.association_aborted("stalled" if why == "stalled" else "too_slow")
    sock = getattr(assoc_socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _cut_off(assoc_socket: Any, buf: bytearray, n: int, wanted: int, start: float,
             why: str) -> bytearray:
    """Shut a stalled or too slow connection; pynetdicom then sees a short PDU and ends it."""
    from node import metrics
    from node.log import event

    timeout, rate = _read_limits or (0.0, 0.0)
    requestor = getattr(assoc_socket.assoc, "requestor", None)
    event(log, "association.stalled", logging.WARNING,
          peer_aet=getattr(requestor, "ae_title", None) or None,
          peer=f"{getattr(requestor, 'address', '?')}:{getattr(requestor, 'port', '?')}",
          reason=why, received=n, expected=wanted, seconds=round(time.monotonic() - start, 1),
          limit=f"node.pdu_timeout={timeout:g}s, node.min_receive_rate_kib={rate / 1024:g}")
    metrics.association_aborted("stalled" if why == "stalled" else "too_slow")
    with contextlib.suppress(OSError):
        assoc_socket.socket.shutdown(socket.SHUT_RDWR)
    del buf[n:]
    return buf


def install() -> None:
    """Apply both adjustments to pynetdicom (process-wide; the node has one receiver)."""
    global _installed
    if _installed:
        return
    from pynetdicom import dimse_messages, transport

    # the socket's receive is replaced process-wide (pinned: tests/test_fastrecv_patch_points.py)
    transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
    # pynetdicom's decoder calls NamedTemporaryFile(...) by name at each dataset: a class with
    # the same call signature replaces the function (pinned: tests/test_fastrecv_patch_points.py)
    dimse_messages.NamedTemporaryFile = _HashingTempFile  # type: ignore[assignment]
    from node import fastpdu

    fastpdu.install()  # the acceptor's reactors, with the P-DATA-TF shortcut (node/fastpdu.py)
    _installed = True
