"""Helpers for the reliability tests: a raw C-STORE sender for hostile bytes, C-ECHO, and
readers of what the node and the destination hold."""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from node.fastsend import leave_previous_pause
from tests.netutil import StoreSCP, wait_for_port
from tests.tools import require_binary

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
NO_RESPONSE = -1  # association aborted or no answer


def file_meta_bytes(sop_class: str, sop_uid: str, transfer_syntax: str = ExplicitVRLittleEndian
                    ) -> bytes:
    """Preamble + DICM + a valid File Meta group, to put in front of a hostile dataset body."""
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


class RawSender:
    """A pynetdicom SCU that sends files as they are on disk (pynetdicom does not decode a
    dataset given as a path), reconnecting when the node aborts the association."""

    def __init__(self, port: int, calling: str = "FUZZER", called: str = "MAMMO_AI",
                 sop_classes: Iterable[str] = (MG_FOR_PRESENTATION,)) -> None:
        # Send the file's bytes as they are; without this pynetdicom decodes and re-encodes.
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.port, self.called = port, called
        self.ae = AE(ae_title=calling)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 60
        for uid in sop_classes:
            self.ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.assoc = None

    def _connect(self):  # type: ignore[no-untyped-def]
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title=self.called)
            if not self.assoc.is_established:
                raise ConnectionError(f"no association with 127.0.0.1:{self.port}")
        return self.assoc

    def send(self, path: Path) -> int:
        """The DIMSE status of one C-STORE of ``path`` (NO_RESPONSE when none came)."""
        assoc = self._connect()
        # back to back on one association, pynetdicom's reactor may still read as paused from
        # the last request and take this answer first (node.fastsend.leave_previous_pause)
        leave_previous_pause(assoc)
        try:
            rsp = assoc.send_c_store(path)
        except (ValueError, AttributeError, RuntimeError):
            # pynetdicom could not even build the request (e.g. no matching context)
            return NO_RESPONSE
        if not rsp or "Status" not in rsp:
            self.close()
            return NO_RESPONSE
        return int(rsp.Status)

    def close(self) -> None:
        if self.assoc is not None:
            if self.assoc.is_established:
                self.assoc.release()
            self.assoc = None


def echo(port: int, calling: str = "ECHOER", called: str = "MAMMO_AI") -> int:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return NO_RESPONSE
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if rsp and "Status" in rsp else NO_RESPONSE
    finally:
        assoc.release()


def node_db(data_dir: Path) -> sqlite3.Connection:
    """A connection to the node's SQLite database (the tests only read through it)."""
    return sqlite3.connect(data_dir / "node.sqlite3", timeout=60)


def delivered_studies(data_dir: Path) -> set[str]:
    """Study UIDs whose current result has been delivered to every destination."""
    if not (data_dir / "node.sqlite3").exists():
        return set()
    with node_db(data_dir) as con:
        rows = con.execute(
            "SELECT s.study_uid, SUM(d.state = 'done'), COUNT(d.id) FROM studies s "
            "JOIN results r ON r.study_id = s.id AND r.current "
            "JOIN deliveries d ON d.result_id = r.id GROUP BY s.id").fetchall()
    return {uid for uid, done, total in rows if total and done == total}


class RecordingSCP(StoreSCP):
    """dcmtk storescp that keeps every received copy (+uf: unique file names), so that a
    re-sent object shows up twice and duplicates can be counted."""

    def start(self) -> RecordingSCP:
        exe = require_binary("storescp")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out_dir.parent / f"storescp-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, "-aet", self.ae_title, "-od", str(self.out_dir), "+xa", "+uf", *self.extra,
             str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 30, self.proc)
        return self

    extra: list[str] = []


def stored_sop_uids(data_dir: Path) -> set[str]:
    with node_db(data_dir) as con:
        return {r[0] for r in con.execute("SELECT sop_uid FROM instances")}


def received_objects(files: Iterable[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set size) of a live process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def own_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quarantine_reasons(data_dir: Path) -> list[str]:
    return [p.read_text() for p in (data_dir / "quarantine").rglob("*.reason.txt")]


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
