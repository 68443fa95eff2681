"""Receive: the pynetdicom SCP (C-ECHO, C-STORE) and its association policy.

The C-STORE handler is thin: check the header, make the file durable in the spool, record it in
the database, answer. It never decodes pixels and never analyses. pynetdicom's chunked receive
writes each dataset straight to a temporary file under ``data_dir/incoming`` (same filesystem as
the spool, so adopting it is a rename), so a 60 MB mammogram is never held in memory.

DIMSE statuses answered (also listed in the conformance statement):
0x0000 stored (or already stored with identical content); 0xA700 out of resources (disk below
``node.min_free_mb`` or the database unavailable; nothing kept, the sender should retry);
0xC001 not a mammogram (a Digital X-Ray whose Modality is not MG, or a SOP class not accepted);
0xC002 invalid or inconsistent UIDs; 0xC003 unreadable dataset (truncated, a value length past
the end or impossible for its VR, a bad VR or value, an undecodable Specific Character Set);
0xC004 no usable pixel data (missing, short, or over ``[limits]``: declared size, frames, decoded
bytes, a codestream whose own header declares other dimensions); 0xC005 SOP Instance UID already
stored with different content. Every 0xCxxx object is kept in ``data_dir/quarantine`` with its
reason.

Objects a PACS sends with a mammography study that the node does not analyse (tomosynthesis,
synthesized 2D, vendor Secondary Captures, dose reports, presentation states, other CAD SRs:
:mod:`node.intake`) are answered 0x0000 and kept in ``other_objects`` or discarded
(``[study] other_objects``), with one ``instance.not_analysed`` log line each.

Association admission (per-IP / per-AE limits, the trusted-peer reserve: node.admission) is
decided at the TCP accept and again when the A-ASSOCIATE-RQ names the calling AE title
(:meth:`Receiver._on_requested`); reads inside a PDU have deadlines (node.fastrecv).
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from node import decode_limits, fastrecv, faults, metrics, queue
from node.admission import Admission
from node.charset import charset_problem
from node.config import (
    AnalysisSettings,
    LimitsSettings,
    NodeSettings,
    Settings,
    StudySettings,
    TLSSettings,
)
from node.db import Database, Instance, OtherObject, Series, utcnow
from node.dicom_header import is_for_processing, laterality_and_view
from node.intake import ANALYSE, ANALYSED_SOP_CLASSES, REFUSE, Intake, IntakePolicy, decide
from node.log import event, patient_fields
from node.security import GuardedAE, GuardedServer
from node.store import Spool

log = logging.getLogger("node.receive")

#: SOP classes whose images are analysed (node.intake decides per instance; SC and DX only when
#: they hold a mammogram). The not-analysed ones come from ``[study] other_sop_classes``.
STORAGE_SOP_CLASSES: dict[str, str] = dict(ANALYSED_SOP_CLASSES)

#: Transfer syntaxes accepted for every storage SOP class; each one decodes in the analysis.
TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-Hierarchical (Process 14)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 Image Compression",
    # decoded by imagecodecs (OpenJPH; node.analysis.jpeg2000)
    "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.202": "High-Throughput JPEG 2000 with RPCL Options Image Compression "
                               "(Lossless Only)",
    "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000 Image Compression",
}
#: Transfer syntaxes accepted for the SOP classes that are never analysed: never decoded, so
#: also those the analysis has no decoder for.
OTHER_TRANSFER_SYNTAXES: dict[str, str] = {
    **TRANSFER_SYNTAXES,
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian (retired)",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
}

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_NOT_MAMMOGRAM = 0xC001
STATUS_BAD_UIDS = 0xC002
STATUS_UNREADABLE = 0xC003
STATUS_NO_PIXELS = 0xC004
STATUS_CONFLICT = 0xC005

PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True)
class StoredInstance:
    """What the receiver tells the rest of the node after an instance became durable."""

    study_uid: str
    sop_uid: str
    laterality: str
    view: str
    relpath: str = ""  # the stored file, relative to data_dir (node.preanalysis reads it)
    sop_class_uid: str = ""


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and UID(text).is_valid


@dataclass(frozen=True)
class ReceiveContext:
    """What the receiver is handed that is not configuration: where it stores, what it tells
    when an instance is durable, and the TLS context built from ``[tls]`` (None: plain)."""

    spool: Spool
    db: Database
    on_stored: Callable[[StoredInstance], None] | None = None
    ssl_context: ssl.SSLContext | None = None


class Receiver:
    """Builds the AE, owns the store handler, and runs the listener.

    Configured by its sections, checked when they were parsed (node.config): ``node`` (AE
    title, address, association policy, deadlines, ``min_free_mb``), ``study`` (which objects
    besides the analysed ones are accepted and whether they are kept), ``analysis``
    (``synthesized_2d``), ``limits`` (image sizes accepted at C-STORE) and ``tls``
    (``handshake_timeout_seconds``); the ones not given have their defaults."""

    def __init__(
        self,
        node: NodeSettings,
        context: ReceiveContext,
        *,
        study: StudySettings | None = None,
        analysis: AnalysisSettings | None = None,
        limits: LimitsSettings | None = None,
        tls: TLSSettings | None = None,
    ) -> None:
        study = study or StudySettings()
        analysis = analysis or AnalysisSettings()
        tls = tls or TLSSettings()
        self.spool, self.db = context.spool, context.db
        self.intake = IntakePolicy.of(study.other_sop_classes, analysis.synthesized_2d)
        self.keep_other_objects = study.other_objects == "keep"
        self.host, self.port = node.host, node.port
        self.min_free_mb = node.min_free_mb
        self.on_stored = context.on_stored
        self.allowed = {a.strip() for a in node.allowed_calling_aets}
        self._record_lock = threading.Lock()
        self._server: GuardedServer | None = None
        self.ssl_context = context.ssl_context
        self.admission = Admission(
            max_associations=node.max_associations, reserved=node.reserved_associations,
            per_ip=node.max_associations_per_ip, per_ae=node.max_associations_per_ae,
            trusted_peers=node.trusted_peers)
        self.limits = limits or LimitsSettings()
        spool = self.spool
        # Chunked receive: datasets stream to a temp file; put it on the spool's filesystem.
        _config.STORE_RECV_CHUNKED_DATASET = True
        fastrecv.install()  # recv_into + SHA-256 while receiving (see node/fastrecv.py)
        # Disk below the limit when a C-STORE starts: its bytes are not even written to incoming/.
        fastrecv.set_space_guard(lambda: spool.free_mb() >= node.min_free_mb)
        # Inside a PDU: at most pdu_timeout s of silence, then at least min_receive_rate B/s.
        fastrecv.set_read_limits(node.pdu_timeout, node.min_receive_rate_kib * 1024)
        fastrecv.set_incoming_dir(spool.incoming)  # the datasets' temp files, nothing else
        ae = GuardedAE(node.ae_title, node.allowed_peer_ips, tls.handshake_timeout_seconds,
                       self.admission)
        ae.maximum_pdu_size = node.max_pdu_size
        # node.admission enforces the pool (and the reserve); pynetdicom's own count is only a
        # bound on threads, well above it: it counts association threads that are still ending
        # after their slot was released (a burst of port probes), and must not reject the next
        # peer with "local limit exceeded" when the node has room.
        ae.maximum_associations = 2 * self.admission.capacity + 16
        ae.network_timeout = node.network_timeout
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.network_timeout
        ae.require_called_aet = True
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        for uid in sorted(self.intake.other_sop_classes):
            ae.add_supported_context(uid, list(OTHER_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        if self.allowed:
            ae.require_calling_aet = sorted(self.allowed)
        self.ae = ae

    @classmethod
    def from_settings(cls, settings: Settings, context: ReceiveContext) -> Receiver:
        """The node's receiver: every section it reads, from ``settings``."""
        return cls(settings.node, context, study=settings.study, analysis=settings.analysis,
                   limits=settings.limits, tls=settings.tls)

    # -- listener ---------------------------------------------------------------------------
    def start(self) -> None:
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._counted_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        # GuardedAE serves with a GuardedServer (node.security): watchdog, cut_all.
        server = cast(GuardedServer, self.ae.start_server(
            (self.host, self.port), block=False, evt_handlers=handlers,
            ssl_context=self.ssl_context,
        ))
        self._server = server
        if fastrecv.read_limits() is not None:
            server.start_watchdog()
        event(log, "listener.started", ae_title=self.ae.ae_title, host=self.host,
              port=self.port, allowed_calling_aets=",".join(sorted(self.allowed)) or "any",
              allowed_peer_ips=",".join(map(str, self.ae.networks)) or "any",
              tls="mutual" if self.ssl_context is not None and
              self.ssl_context.verify_mode == ssl.CERT_REQUIRED else
              "on" if self.ssl_context is not None else "off")

    def stop(self, grace: float = 0.0) -> None:
        """Stop accepting at once; give associations in progress up to ``grace`` seconds to
        finish (a C-STORE in flight is answered), then cut the rest off."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.shutdown()  # closes the listening socket: new connections are refused now
        server.stop_watchdog()
        deadline = time.monotonic() + grace
        while server.associations and time.monotonic() < deadline:
            time.sleep(0.05)
        cut = server.cut_all("shutdown")
        end = time.monotonic() + 2.0
        while server.associations and time.monotonic() < end:
            time.sleep(0.02)
        event(log, "listener.stopped", associations_cut=cut or None)

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def listening(self) -> bool:
        """The server socket is open and its accept thread alive (for /health)."""
        server = self._server
        if server is None or server.socket is None or server.socket.fileno() < 0:
            return False
        return any(t.is_alive() and t.name.startswith("AcceptorServer")
                   for t in threading.enumerate())

    # -- association events -------------------------------------------------------------------
    @staticmethod
    def _peer(ev: evt.Event) -> dict[str, Any]:
        r = ev.assoc.requestor
        return {"peer_aet": r.ae_title, "peer": f"{r.address}:{r.port}"}

    def _on_requested(self, ev: evt.Event) -> None:
        """The A-ASSOCIATE-RQ is in: per-AE limit, pool and reserve (node.admission)."""
        assoc = ev.assoc
        ticket = getattr(assoc, "admission_ticket", None)
        calling = getattr(assoc.requestor.primitive, "calling_ae_title", "") or ""
        reason = self.admission.on_request(ticket, str(calling), int(assoc.requestor.port or 0))
        if reason is not None:
            assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, local limit exceeded
            assoc.kill()

    def _on_accepted(self, ev: evt.Event) -> None:
        event(log, "association.accepted", **self._peer(ev))

    def _on_rejected(self, ev: evt.Event) -> None:
        event(log, "association.rejected", logging.WARNING, **self._peer(ev),
              reason="calling AE title not allowed, called AE title wrong, or too many "
                     "associations")
        metrics.connection_refused("association")

    def _on_released(self, ev: evt.Event) -> None:
        event(log, "association.released", logging.DEBUG, **self._peer(ev))

    def _on_aborted(self, ev: evt.Event) -> None:
        event(log, "association.aborted", logging.WARNING, **self._peer(ev))

    def handle_echo(self, ev: evt.Event) -> int:
        event(log, "echo", **self._peer(ev))
        return STATUS_SUCCESS

    # -- C-STORE ----------------------------------------------------------------------------
    def handle_store(self, ev: evt.Event) -> int | Dataset:
        request = cast(C_STORE, ev.request)  # an EVT_C_STORE event carries a C-STORE
        return self.accept_file(
            Path(ev.dataset_path), self._peer(ev),
            str(request.AffectedSOPInstanceUID or ""),
            str(request.AffectedSOPClassUID or ""),
            not_written=fastrecv.discarded(Path(ev.dataset_path)))

    def accept_file(self, tmp: Path, peer: dict[str, Any], affected: str | None,
                    affected_class: str | None, *, not_written: int | None = None
                    ) -> int | Dataset:
        """Check, store durably and record one received file (C-STORE, or a STOW-RS part with
        ``affected`` = None); the status to answer. The file is adopted or quarantined."""
        t0 = time.perf_counter()
        if not_written is not None or self.spool.free_mb() < self.min_free_mb:
            event(log, "instance.refused", logging.ERROR, **peer, status="0xA700",
                  reason=f"less than {self.min_free_mb} MiB free in data_dir",
                  bytes_not_written=not_written or 0)
            _unlink(tmp)
            return STATUS_OUT_OF_RESOURCES
        try:
            ds, intake = self._check_header(tmp, affected, affected_class)
        except Refused as refusal:
            relpath = self._quarantine(tmp, f"{refusal.reason} (from {peer['peer_aet']})")
            event(log, "instance.quarantined", logging.WARNING, **peer,
                  status=f"0x{refusal.status:04X}", reason=refusal.reason, file=relpath)
            return _status(refusal.status, refusal.reason)
        sop_uid = str(ds.SOPInstanceUID)
        if intake.action != ANALYSE:
            return self._not_analysed(tmp, ds, intake, peer, t0)
        try:
            stored = self._store(tmp, ds, calling_aet=str(peer["peer_aet"]))
        except Refused as refusal:
            relpath = self._quarantine(tmp, refusal.reason)
            event(log, "instance.quarantined", logging.WARNING, **peer, sop=sop_uid,
                  status=f"0x{refusal.status:04X}", reason=refusal.reason, file=relpath)
            return _status(refusal.status, refusal.reason)
        except Exception as exc:  # database down, disk error...: the sender must retry
            log.exception("instance.failed sop=%s", sop_uid)
            event(log, "instance.refused", logging.ERROR, **peer, sop=sop_uid,
                  status="0xA700", reason=f"{type(exc).__name__}: {exc}")
            return _status(STATUS_OUT_OF_RESOURCES, "could not store the instance durably")
        if stored is None:
            event(log, "instance.duplicate", **peer, sop=sop_uid,
                  reason="already stored with identical content")
        else:
            patient: dict[str, Any] = patient_fields(ds.get("PatientID"), ds.get("PatientName"))
            event(log, "instance.stored", **peer, sop=sop_uid, study=stored.study_uid,
                  laterality=stored.laterality or "?", view=stored.view or "?",
                  ms=round((time.perf_counter() - t0) * 1000, 1),
                  **patient)
            if self.on_stored is not None:
                self.on_stored(stored)
        faults.hit("store.before_ack")
        return STATUS_SUCCESS

    def _counted_store(self, ev: evt.Event) -> int | Dataset:
        """:meth:`handle_store` plus the received/rejected counters of /metrics."""
        result = self.handle_store(ev)
        code = result if isinstance(result, int) else int(result.Status)
        if code == STATUS_SUCCESS:
            metrics.instance_received()
        else:
            metrics.instance_rejected(code)
        return result
    def _quarantine(self, tmp: Path, reason: str) -> str:
        """Keep a refused object; a failure here (disk full...) must not fail the answer."""
        try:
            return self.spool.quarantine(tmp, reason)
        except Exception as exc:  # noqa: BLE001 - logged; the refusal stands
            event(log, "quarantine.failed", logging.ERROR, reason=reason,
                  error=f"{type(exc).__name__}: {exc}")
            _unlink(tmp)
            return "(not kept)"

    def _check_header(self, path: Path, affected_sop: str | None,
                      affected_class: str | None) -> tuple[Dataset, Intake]:
        try:
            if _transfer_syntax(path) == DEFLATED:  # inflated in memory to be read: cap it
                decode_limits.check_inflated_size(path, self.limits)
        except decode_limits.LimitExceeded as exc:
            raise Refused(STATUS_NO_PIXELS, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any parse error is a refusal
            raise Refused(STATUS_UNREADABLE, f"unreadable dataset: {type(exc).__name__}: "
                                             f"{str(exc)[:200]}") from None
        try:
            # defer_size keeps bulk values (pixel data, huge private elements) on disk.
            ds = pydicom.dcmread(path, defer_size=4096)
            deflated = ds.file_meta.get("TransferSyntaxUID") == DEFLATED
            # A deflated dataset is parsed from its inflated copy: offsets are not file offsets.
            problem = _structure_problem(ds, None if deflated else path.stat().st_size)
        except Exception as exc:  # noqa: BLE001 - any parse error is a refusal
            raise Refused(STATUS_UNREADABLE, f"unreadable dataset: {type(exc).__name__}: "
                                             f"{str(exc)[:200]}") from None
        if problem:
            raise Refused(STATUS_UNREADABLE, f"unreadable dataset: {problem}")
        try:
            problem = charset_problem(ds)
        except Exception as exc:  # noqa: BLE001 - reported below
            problem = f"text values unreadable: {type(exc).__name__}: {str(exc)[:160]}"
        if problem:
            raise Refused(STATUS_UNREADABLE, problem)
        try:
            return self._check_attributes(ds, affected_sop, affected_class, path)
        except Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - a value pydicom cannot interpret
            raise Refused(STATUS_UNREADABLE, f"unreadable dataset: {type(exc).__name__}: "
                                             f"{str(exc)[:200]}") from None

    def _check_attributes(self, ds: Dataset, affected_sop: str | None,
                          affected_class: str | None, path: Path | None = None
                          ) -> tuple[Dataset, Intake]:
        try:
            sop_class = str(ds.SOPClassUID)
            sop_uid = str(ds.SOPInstanceUID)
            study_uid = str(ds.StudyInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
        except AttributeError as exc:
            raise Refused(STATUS_BAD_UIDS, f"missing UID attribute: {exc}") from None
        for name, value in (("SOPInstanceUID", sop_uid), ("StudyInstanceUID", study_uid),
                            ("SeriesInstanceUID", series_uid), ("SOPClassUID", sop_class)):
            if not _valid_uid(value):
                raise Refused(STATUS_BAD_UIDS, f"{name} is not a valid UID: {value[:80]!r}")
        if affected_sop is not None and (sop_uid != affected_sop
                                         or sop_class != affected_class):
            raise Refused(STATUS_BAD_UIDS, "SOP Instance/Class UID in the dataset differ from "
                                           "the C-STORE request")
        intake = decide(ds, self.intake)
        if intake.action == REFUSE:
            raise Refused(STATUS_NOT_MAMMOGRAM, intake.reason)
        if intake.action != ANALYSE:
            return ds, intake  # never decoded: no pixel checks
        if "PixelData" not in ds:
            raise Refused(STATUS_NO_PIXELS, "no Pixel Data")
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            bits = int(ds.BitsAllocated)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
        except (AttributeError, TypeError, ValueError) as exc:
            raise Refused(STATUS_NO_PIXELS, f"image attributes missing or bad: {exc}") from None
        if rows <= 0 or cols <= 0 or bits not in (8, 16) or frames < 1:
            raise Refused(STATUS_NO_PIXELS, f"bad image geometry {rows}x{cols}, "
                                            f"{bits} bits, {frames} frames")
        g = decode_limits.Geometry(rows, cols, frames, samples, bits)
        try:
            decode_limits.check_declared(g, self.limits)
            if path is not None:
                decode_limits.check_codestream(str(ds.file_meta.TransferSyntaxUID),
                                               decode_limits.first_frame_bytes(path, ds), g)
        except decode_limits.LimitExceeded as exc:
            raise Refused(STATUS_NO_PIXELS, str(exc)) from None
        if not ds.file_meta.TransferSyntaxUID.is_compressed:
            expected = rows * cols * frames * samples * (bits // 8)
            actual = _element_length(ds)
            if actual is not None and actual < expected:
                raise Refused(STATUS_NO_PIXELS, f"Pixel Data has {actual} bytes, "
                                                f"{rows}x{cols} needs {expected}")
        return ds, intake

    def _not_analysed(self, tmp: Path, ds: Dataset, intake: Intake, peer: dict[str, Any],
                      t0: float) -> int | Dataset:
        """Acknowledge an object the node accepts but does not analyse; keep or discard it.

        It never touches the study's row: no re-opening, no later completion, no change of the
        analysis input (node.intake)."""
        sop_uid = str(ds.SOPInstanceUID)
        action = "discarded"
        if self.keep_other_objects:
            try:
                action = self._keep_other(tmp, ds, intake, str(peer["peer_aet"]))
            except Exception as exc:  # database down, disk error...: the sender must retry
                log.exception("instance.failed sop=%s", sop_uid)
                event(log, "instance.refused", logging.ERROR, **peer, sop=sop_uid,
                      status="0xA700", reason=f"{type(exc).__name__}: {exc}")
                return _status(STATUS_OUT_OF_RESOURCES, "could not store the instance durably")
        else:
            _unlink(tmp)
        metrics.instance_not_analysed(intake.kind, action)
        event(log, "instance.not_analysed", **peer, sop=sop_uid,
              study=str(ds.get("StudyInstanceUID", "")), kind=intake.kind, action=action,
              reason=intake.reason, ms=round((time.perf_counter() - t0) * 1000, 1))
        faults.hit("store.before_ack")
        return STATUS_SUCCESS

    def _keep_other(self, tmp: Path, ds: Dataset, intake: Intake, calling_aet: str) -> str:
        """Make durable and record in ``other_objects``; "kept" or "duplicate"."""
        sop_uid = str(ds.SOPInstanceUID)
        with self.db.session() as s:
            if s.execute(select(OtherObject.id).where(OtherObject.sop_uid == sop_uid)).scalar():
                _unlink(tmp)  # already kept (the first copy stays)
                return "duplicate"
        relpath, size, sha = self.spool.adopt(tmp)
        try:
            with self._record_lock, self.db.session() as s:
                s.add(OtherObject(
                    study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                    sop_uid=sop_uid, sop_class_uid=str(ds.SOPClassUID), kind=intake.kind,
                    relpath=relpath, size=size, sha256=sha, calling_aet=calling_aet,
                    received_at=utcnow()))
        except IntegrityError:
            self.spool.remove(relpath)  # the same object kept concurrently
            return "duplicate"
        except Exception:
            self.spool.remove(relpath)
            raise
        return "kept"

    def _store(self, tmp: Path, ds: Dataset, calling_aet: str) -> StoredInstance | None:
        """Make durable and record; None when the same content was already stored."""
        sop_uid = str(ds.SOPInstanceUID)
        existing = self._stored_digest(sop_uid)
        if existing is not None:
            self._duplicate(tmp, sop_uid, existing)
            return None
        relpath, size, sha = self.spool.adopt(tmp)
        faults.hit("store.after_write")
        laterality, view = laterality_and_view(ds)
        study_uid = str(ds.StudyInstanceUID)
        # One writer at a time from this process keeps SQLite from "database is locked" storms.
        try:
            with self._record_lock, self.db.session() as s:
                now = utcnow()
                study, reopened_from = queue.receive_instance(s, study_uid, now)
                if reopened_from is not None:
                    event(log, "study.reopened", study=study_uid, previous_state=reopened_from,
                          generation=study.generation)
                if not study.accession_number:  # outcomes are matched by it (node/outcomes.py)
                    study.accession_number = str(ds.get("AccessionNumber", "") or "")[:64] or None
                series_uid = str(ds.SeriesInstanceUID)
                series = s.execute(
                    select(Series).where(Series.series_uid == series_uid)
                ).scalar()
                if series is None:
                    series = Series(study_id=study.id, series_uid=series_uid,
                                    modality=str(ds.get("Modality", "") or "")[:16])
                    s.add(series)
                    s.flush()
                s.add(Instance(
                    study_id=study.id, series_id=series.id, sop_uid=sop_uid,
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                    relpath=relpath, size=size, sha256=sha, laterality=laterality,
                    view=view, for_processing=is_for_processing(ds), calling_aet=calling_aet,
                    received_at=now,
                ))
        except IntegrityError:
            # Another association stored the same SOP Instance UID a moment ago.
            self.spool.remove(relpath)
            if self._stored_digest(sop_uid) == sha:
                return None
            raise Refused(STATUS_CONFLICT, "SOP Instance UID stored concurrently with "
                                           "different content") from None
        except Exception:
            self.spool.remove(relpath)  # not recorded: do not leave an orphan behind
            raise
        return StoredInstance(study_uid, sop_uid, laterality, view, relpath,
                              str(ds.SOPClassUID))

    def _stored_digest(self, sop_uid: str) -> str | None:
        """The SHA-256 of the instance already stored under ``sop_uid``, None if there is none.
        One column on a plain connection: no ORM session for the question every C-STORE asks."""
        with self.db.engine.connect() as conn:
            return conn.execute(select(Instance.sha256).where(
                Instance.sop_uid == sop_uid)).scalar()

    def _duplicate(self, tmp: Path, sop_uid: str, stored_sha256: str) -> None:
        """The same content again: forget the new copy; other content: :class:`Refused`."""
        import hashlib

        streamed = fastrecv.take_digest(tmp)  # hashed while it was received
        if streamed is not None and streamed[0] == tmp.stat().st_size:
            digest = streamed[1]
        else:
            h = hashlib.sha256()
            with open(tmp, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
        if digest == stored_sha256:
            _unlink(tmp)
            return
        raise Refused(STATUS_CONFLICT, f"SOP Instance UID {sop_uid} already stored "
                                       "with different content")


def _structure_problem(ds: Dataset, file_size: int | None) -> str | None:
    """Why the top level of ``ds`` is not a complete, decodable dataset (None when it is).

    pydicom stops quietly at the end of a truncated file and converts values lazily, so check
    here: every element's declared length fits in the file and was read in full, and every value
    that was read (the deferred bulk values are not) converts under its VR.
    """
    last_end = 0
    for tag, elem in list(ds._dict.items()):
        if not isinstance(elem, RawDataElement):
            continue
        if elem.length != UNDEFINED_LENGTH:
            end = elem.value_tell + elem.length
            if (elem.value is not None and len(elem.value) < elem.length) or (
                    file_size is not None and end > file_size):
                return (f"element {elem.tag} declares {elem.length} bytes, more than the "
                        "dataset holds (truncated)")
            last_end = max(last_end, end)
        else:
            last_end = file_size or 0  # undefined length: the reader found its delimiter
        if elem.value is not None:
            bad = _length_problem(elem)
            if bad:
                return bad
            ds[tag]
    if file_size is not None and 0 < file_size - last_end < 8:
        return f"{file_size - last_end} stray bytes at the end (truncated element header)"
    return None


#: Binary VRs: bytes per value.
_BINARY_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "UV": 8,
                "SV": 8}
#: String VRs whose values may hold no control character (ESC excepted, for ISO 2022).
_STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI", "UC"}
#: Free-text VRs: also CR, LF, FF and TAB.
_TEXT_VRS = {"LT", "ST", "UT"}
_TEXT_CONTROLS = {0x09, 0x0A, 0x0C, 0x0D, 0x1B}


def _length_problem(elem: RawDataElement) -> str | None:
    """Why the value length of ``elem`` cannot be right for its VR (None when it can be).

    A value length that is wrong by a few bytes makes the element swallow the next element's
    header (or leave part of its value to be read as one); the parse may then go on, aligned by
    chance. The swallowed bytes show: a binary value whose length is not a multiple of its size,
    or not the count its dictionary VM fixes; a string value with control characters (NULs
    only as trailing padding). Such a dataset is unreadable (0xC003), not a bad-UID (0xC002) or
    no-pixel (0xC004) case.
    """
    vr, value = str(elem.VR), elem.value
    if not isinstance(value, bytes | bytearray) or not value:
        return None
    size = _BINARY_SIZE.get(vr)
    if size is not None:
        if len(value) % size:
            return (f"element {elem.tag} ({vr}) has value length {len(value)}, not a multiple "
                    f"of {size}")
        try:
            vm = dictionary_VM(elem.tag) if not elem.tag.is_private else ""
        except KeyError:
            vm = ""
        if vm.isdigit() and len(value) != int(vm) * size:
            return (f"element {elem.tag} ({vr}, VM {vm}) has value length {len(value)}, "
                    f"not {int(vm) * size}")
        return None
    allowed = _TEXT_CONTROLS if vr in _TEXT_VRS else ({0x1B} if vr in _STRING_VRS else None)
    if allowed is None:
        return None
    body = bytes(value).rstrip(b"\x00 ") if vr == "UI" else bytes(value).rstrip(b"\x00")
    bad = next((b for b in body if (b < 0x20 or b == 0x7F) and b not in allowed), None)
    if bad is not None:
        return (f"element {elem.tag} ({vr}) holds byte 0x{bad:02X}: its value length "
                f"({len(value)}) runs into other data")
    return None


def _transfer_syntax(path: Path) -> str:
    """The Transfer Syntax UID of a Part 10 file (its File Meta only)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    return str(meta.get("TransferSyntaxUID", ""))


def _element_length(ds: Dataset) -> int | None:
    """Declared Pixel Data length without loading it (get_item would read a deferred value)."""
    elem = ds._dict.get(PIXEL_DATA_TAG)
    if elem is None:
        return None
    length = getattr(elem, "length", None)
    if length is None or length == UNDEFINED_LENGTH:
        value = getattr(elem, "value", None)
        if value is None:
            return 0 if length is None else None
        return len(value) if isinstance(value, bytes | bytearray) else None
    return int(length)


def _status(code: int, comment: str) -> Dataset:
    """A failure answer: pynetdicom sends a handler's Dataset as the status with its comment."""
    rsp = Dataset()
    rsp.Status = code
    rsp.ErrorComment = comment[:64]
    return rsp


def _unlink(path: Path) -> None:
    fastrecv.take_digest(path)  # forget its streaming digest too
    with contextlib.suppress(OSError):
        os.unlink(path)
