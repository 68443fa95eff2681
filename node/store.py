"""The spool: received instances, results and quarantined objects on disk, written durably.

Every file is written to a temporary name on the same filesystem, fsynced, atomically renamed and
its directory fsynced, so that after a crash a file either exists complete or not at all. File
names are random (uuid4) and never built from UIDs sent by a peer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import os
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.uid import ExplicitVRLittleEndian

from node.fastrecv import take_digest

_DIR_MODE = 0o700


class Spool:
    """Owns the folders under ``data_dir``: incoming/, instances/, results/, quarantine/."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.incoming = self.root / "incoming"
        self.instances = self.root / "instances"
        self.results = self.root / "results"
        self.quarantine_dir = self.root / "quarantine"
        for d in (self.root, self.incoming, self.instances, self.results, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, _DIR_MODE)

    def clear_incoming(self, min_age_seconds: float = 0.0) -> int:
        """Delete transfers that were in flight when the node stopped (never acknowledged);
        with ``min_age_seconds`` (a data_dir shared by several nodes) only older ones, so
        another node's transfer in progress is not touched."""
        n = 0
        now = time.time()
        for path in self.incoming.iterdir():
            try:
                if path.is_file() and now - path.stat().st_mtime >= min_age_seconds:
                    path.unlink()
                    n += 1
            except FileNotFoundError:  # another node finished or removed it meanwhile
                continue
        return n

    def free_mb(self) -> float:
        usage = shutil.disk_usage(self.root)
        return usage.free / (1024 * 1024)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def _new_relpath(self, area: str, suffix: str = ".dcm") -> str:
        day = dt.datetime.now(dt.UTC).strftime("%Y/%m/%d")
        return f"{area}/{day}/{uuid.uuid4().hex}{suffix}"

    def adopt(self, tmp_path: Path, area: str = "instances") -> tuple[str, int, str]:
        """Make a fully written file durable under ``area``; returns (relpath, size, sha256).

        The file is hashed (one sequential read, usually from the page cache), fsynced and
        renamed. When ``tmp_path`` is on another filesystem it is copied first.
        """
        relpath = self._new_relpath(area)
        dest = self.root / relpath
        dest.parent.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        streamed = take_digest(tmp_path)  # hashed while it was received (node.fastrecv)
        with open(tmp_path, "rb+") as fh:
            if streamed is not None and streamed[0] == os.fstat(fh.fileno()).st_size:
                os.fsync(fh.fileno())
                size, digest = streamed
            else:
                # The fsync (disk writeback) runs while this thread hashes the page-cached copy:
                # both release the GIL, so the two overlap instead of adding up.
                syncer = _Fsync(fh.fileno())
                size, digest = _sha256(fh)
                syncer.wait()
        try:
            os.replace(tmp_path, dest)
        except OSError:  # another filesystem: copy to a temp name beside dest, then rename
            part = dest.with_suffix(".part")
            shutil.copyfile(tmp_path, part)
            _fsync_file(part)
            os.replace(part, dest)
            os.unlink(tmp_path)
        _fsync_dir(dest.parent)
        return relpath, size, digest

    def quarantine(self, tmp_path: Path, reason: str) -> str:
        """Keep a refused object with its reason; returns its relpath."""
        relpath, _, _ = self.adopt(tmp_path, area="quarantine")
        reason_path = (self.root / relpath).with_suffix(".reason.txt")
        write_bytes_durably(reason_path, (reason.strip() + "\n").encode("utf-8", "replace"))
        return relpath

    def write_dataset(self, ds: Dataset, area: str = "results") -> str:
        """Write a DICOM object durably; returns its relpath. Encoded once in memory
        (:func:`encode_file`: the Pixel Data value is written from its own buffer), then written
        and fsynced on the same descriptor."""
        return self.write_datasets([ds], area)[0]

    def write_datasets(self, datasets: Iterable[Dataset], area: str = "results") -> list[str]:
        """Write several DICOM objects durably; their relpaths, in order. Each is encoded
        (:func:`encode_file`) as it comes and written to a temporary name and fsynced in a
        helper thread (write and fsync release the GIL): given a generator that builds the
        objects one after the other, each object's write overlaps the building of the next,
        and the disk flushes overlap instead of adding up. Then each is renamed and its
        directory fsynced. When this returns, every file and its directory entry is durable; on
        an error (also one raised by ``datasets`` itself) none of them is left behind."""
        dests: list[Path] = []
        parts: list[Path] = []
        fds: list[int] = []
        writers: list[_WriteSync] = []
        try:
            for ds in datasets:
                relpath = self._new_relpath(area)
                dest = self.root / relpath
                dest.parent.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
                part = dest.with_suffix(".part")
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                fds.append(fd)
                parts.append(part)
                dests.append(dest)
                writers.append(_WriteSync(fd, encode_file(ds)))
            for writer in writers:
                writer.wait()
        except BaseException:
            for writer in writers:  # no thread may still write to a descriptor closed below
                writer.join()
            for fd in fds:
                os.close(fd)
            for part in parts:
                with contextlib.suppress(OSError):
                    part.unlink()
            raise
        for fd in fds:
            os.close(fd)
        for part, dest in zip(parts, dests, strict=True):
            os.replace(part, dest)
        for folder in dict.fromkeys(dest.parent for dest in dests):
            _fsync_dir(folder)
        return [str(dest.relative_to(self.root)) for dest in dests]

    def remove(self, relpath: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / relpath).unlink()


class _WriteSync:
    """Write ``parts`` to a file descriptor and fsync it, in a helper thread; :meth:`wait`
    re-raises its error."""

    def __init__(self, fd: int, parts: Sequence[bytes | memoryview]) -> None:
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(fd, parts), daemon=True)
        self._thread.start()

    def _run(self, fd: int, parts: Sequence[bytes | memoryview]) -> None:
        try:
            _write_all(fd, parts)
            os.fsync(fd)
        except Exception as exc:  # noqa: BLE001 - re-raised by wait() in the caller's thread
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class _Fsync:
    """fsync a file descriptor in a helper thread; :meth:`wait` re-raises its error."""

    def __init__(self, fd: int) -> None:
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(fd,), daemon=True)
        self._thread.start()

    def _run(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            self._error = exc

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


_PIXEL_DATA = 0x7FE00010
#: Pixel Data values from this size on are written from their own buffer, not through pydicom
_DIRECT_PIXELS = 1 << 16


def encode_file(ds: Dataset) -> list[bytes | memoryview]:
    """The bytes ``ds.save_as(fp, enforce_file_format=True)`` writes, as a few parts.

    pydicom writes a Pixel Data value by copying it into an element buffer, copying that into
    the file buffer, and the caller's BytesIO copies it again (three 10 MB copies for an RGB
    Grad-CAM SC). Here pydicom encodes everything but the Pixel Data (the last element of the
    dataset), and the Pixel Data element follows as its header and the value itself. Only for
    native (not encapsulated) Pixel Data of an Explicit VR Little Endian dataset; anything else
    is pydicom's encoding as it is. tests/test_sc_document.py checks the bytes are the same."""
    elem = ds.get_item(_PIXEL_DATA) if _PIXEL_DATA in ds else None
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    direct = (
        elem is not None and not elem.is_raw and not elem.is_undefined_length
        and isinstance(elem.value, bytes | bytearray | memoryview)
        and len(elem.value) >= _DIRECT_PIXELS and syntax == ExplicitVRLittleEndian
        and max(ds.keys()) == _PIXEL_DATA
    )
    if not direct:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return [buf.getbuffer()]
    assert elem is not None
    if elem.VR not in ("OB", "OW"):  # 'OB or OW': resolved as pydicom's writer resolves it
        correct_ambiguous_vr_element(elem, ds, True)  # sets elem.VR in place
    value = memoryview(elem.value).cast("B")
    del ds[_PIXEL_DATA]
    try:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    finally:
        ds[_PIXEL_DATA] = elem
    length = len(value) + len(value) % 2
    header = struct.pack("<HH2sxxI", 0x7FE0, 0x0010, elem.VR.encode("ascii"), length)
    parts: list[bytes | memoryview] = [buf.getbuffer(), header, value]
    if len(value) % 2:
        parts.append(b"\0")
    return parts


def _write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """Write ``parts`` to ``fd`` in order (gathered writes; a short write is continued)."""
    pending = [memoryview(p) for p in parts if len(p)]
    while pending:
        n = os.writev(fd, pending)
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if pending and n:
            pending[0] = pending[0][n:]


def _sha256(fh: io.BufferedIOBase) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n := fh.readinto(buf):
        h.update(view[:n])
        size += n
    return size, h.hexdigest()


def write_bytes_durably(path: Path, data: bytes) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
