"""Deliver: send the result objects of each current result to every destination.

The bookkeeping (which deliveries are due, backoff, failed, ``mammo-node retry``) is the same for
every destination; how the objects travel is a :class:`Transport`: :class:`CStoreTransport`
(DICOM C-STORE, ``type = "dicom"``) or :class:`node.stow_client.StowTransport` (DICOMweb
STOW-RS, ``type = "dicomweb"``). A transport answers a :class:`SendOutcome`: ok, or failed and
whether retrying can help.

Each output kind (TID 1500 SR, CAD SR, SC, GSPS) of a (result, destination) is sent on its own
(C-STORE: its own association, proposing only its SOP class with Explicit/Implicit VR Little
Endian; no Deflate: it costs seconds per object) and recorded on its own (``delivery_kinds``): a
kind the destination refuses (a failure status 0xA7xx, 0xA9xx, 0xCxxx, an HTTP 4xx, or its SOP
class not accepted at negotiation) is marked failed at once, since repeating it will not change
the answer, and the other kinds are still sent; a kind already sent is never sent again. A
connection failure is retried with exponential backoff up to ``delivery.max_attempts``.
``mammo-node retry`` puts failed deliveries back (only their unsent kinds go).

A C-STORE of a file in its own transfer syntax over plain TCP goes through node.fastsend (the
file's bytes written to the socket as PDUs); TLS and converted datasets through pynetdicom's
send. The association is released after the last answer, in a thread of its own.

A result's kinds reach the deliverer one by one, as each is written (node.worker): the first
kind is on its way while the next is built; the delivery is ``done`` once the result is
complete and every kind went (node.queue.finish_delivery).
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, _config
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select

from node import fastsend, faults, metrics, queue
from node.config import DeliverySettings, Destination, NodeSettings, OutputSettings, Settings
from node.db import Database, Delivery, Result, ResultObject, utcnow
from node.kinds import kind_of, sop_classes_for
from node.log import event
from node.store import Spool

log = logging.getLogger("node.deliver")

OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
_MAX_PASSES = 8  # of run_due over the due deliveries (see there)
# A file path given to send_c_store is streamed from the file as it is (no decode, no
# re-encode: a 12 MB Secondary Capture costs a read, not a dcmread + encode); the node passes a
# path only when the accepted context has the file's own transfer syntax (_as_built).
_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class SendOutcome:
    ok: bool
    permanent: bool  # the destination refused: retrying will not help
    status: str
    error: str


class Transport(Protocol):
    """How result files reach one kind of destination."""

    def send(self, dest: Destination, paths: Sequence[Path]) -> SendOutcome: ...


@dataclass(frozen=True)
class DeliveryContext:
    """What the deliverer is handed that is not configuration."""

    db: Database
    spool: Spool
    holder: queue.Holder | None = None  # this node's name on its claims; None: "local"
    # The client TLS context built from [tls], when a destination has tls = true.
    tls_context: ssl.SSLContext | None = None
    transports: Mapping[str, Transport] | None = None  # None: C-STORE and STOW-RS


class Deliverer:
    """Sends results by its sections (checked when parsed, node.config): ``settings``
    (``[delivery]``: attempts, backoff), the ``destinations``, ``node`` (the calling AE title
    and PDU size of C-STORE) and ``output`` (the kinds for a destination without
    ``objects``)."""

    def __init__(self, settings: DeliverySettings, destinations: Sequence[Destination],
                 context: DeliveryContext, *, node: NodeSettings | None = None,
                 output: OutputSettings | None = None, timeout: float = 60) -> None:
        node = node or NodeSettings()
        self.db = context.db
        self._more = threading.Event()  # see wake()
        self.holder = context.holder or queue.Holder("local")  # this node's name on its claims
        # kinds for destinations without `objects`
        self.default_objects: list[str] = list((output or OutputSettings()).objects)
        self.spool = context.spool
        self.destinations = {d.name: d for d in destinations}
        self.settings = settings
        from node.stow_client import StowTransport

        self.transports: dict[str, Transport] = dict(context.transports or {
            "dicom": CStoreTransport(node.ae_title, node.max_pdu_size, timeout,
                                     context.tls_context),
            "dicomweb": StowTransport(),
        })

    @classmethod
    def from_settings(cls, settings: Settings, context: DeliveryContext) -> Deliverer:
        """The node's deliverer: every section it reads, from ``settings``."""
        return cls(settings.delivery, settings.destinations, context, node=settings.node,
                   output=settings.output)

    def recover(self) -> int:
        """Deliveries this node's previous run was sending (it was killed), and any whose
        lease expired, go back to pending: their unsent kinds go at the next attempt."""
        mine = queue.release_holder(self.db, self.holder.name).get("delivery", 0)
        expired = queue.reap_expired(self.db).get("delivery", 0)
        if mine or expired:
            event(log, "delivery.recovered", deliveries=mine + expired, own=mine,
                  expired=expired, reason="interrupted by a restart or a lost node")
        return mine + expired

    def backoff(self, attempts: int) -> float:
        s = self.settings
        return min(s.backoff_initial_seconds * (2 ** max(attempts - 1, 0)), s.backoff_max_seconds)

    def run_due(self) -> int:
        """Send every delivery that is due; returns how many were attempted."""
        n = 0
        # Oldest first, each claimed (under this node's lease) just before it is sent; a
        # delivery another node holds is skipped. Ids rise, so one pass ends. Another pass
        # follows when a result kind was recorded during this one (wake(): each kind is
        # queued as soon as it is written): it goes now, not at the next tick.
        for _ in range(_MAX_PASSES):
            self._more.clear()
            now, last = utcnow(), 0
            while (delivery_id := queue.claim_delivery(self.db, self.holder, now, last)
                   ) is not None:
                n, last = n + 1, delivery_id
                self._deliver(delivery_id)
            if not self._more.is_set():
                break
        return n

    def wake(self) -> None:
        """A result kind was just recorded (any thread): a :meth:`run_due` under way makes
        another pass for it."""
        self._more.set()

    def _deliver(self, delivery_id: int) -> None:
        with self.db.session() as s:
            d = s.get(Delivery, delivery_id)
            result = s.get(Result, d.result_id) if d is not None else None
            if d is None or result is None:  # pragma: no cover - claimed just now
                return
            objects = s.execute(select(ResultObject).where(
                ResultObject.result_id == result.id).order_by(ResultObject.id)).scalars().all()
            name, attempts = d.destination, d.attempts
            study_id = result.study_id
            seen = {o.id for o in objects}  # this attempt's snapshot of the result's objects
            settled = queue.settled_kinds(s, delivery_id)
        dest = self.destinations.get(name)
        if dest is not None:  # only the output kinds this destination takes
            wanted = sop_classes_for(dest.objects if dest.objects is not None
                                     else self.default_objects)
            objects = [o for o in objects if o.sop_class_uid in wanted]
        by_kind: dict[str, list] = {}
        for o in objects:
            kind = kind_of(o.sop_class_uid) or o.sop_class_uid
            if kind not in settled:  # sent before, or refused for good
                by_kind.setdefault(kind, []).append(self.spool.path(o.relpath))
        t0 = time.perf_counter()
        outcomes: dict[str, SendOutcome] = {}
        if dest is None:
            gone = SendOutcome(False, True, "", f"destination {name!r} is no longer in the "
                                                 "configuration")
            outcomes = {kind: gone for kind in by_kind} or {"*": gone}
        else:
            for kind, paths in by_kind.items():
                if outcomes and any(not o.ok and not o.permanent for o in outcomes.values()):
                    # the destination is unreachable: the rest waits for the next attempt
                    outcomes[kind] = SendOutcome(False, False, "", "not attempted")
                    continue
                outcomes[kind] = self.send(dest, paths)
            if by_kind:
                faults.hit("deliver.before_record")
        ms = round((time.perf_counter() - t0) * 1000, 1)
        sent = sum(len(by_kind.get(k, [])) for k, o in outcomes.items() if o.ok)
        transient = {k: o for k, o in outcomes.items() if not o.ok and not o.permanent}
        refused = {k: o for k, o in outcomes.items() if not o.ok and o.permanent}
        ok = not transient and not refused
        if outcomes:  # an attempt opened associations; a closing pass with nothing left to
            # send (each kind went as it was built) is no attempt
            metrics.delivery_attempt(name, ok, ms / 1000)
        for kind in refused:
            metrics.delivery_kind_failed(name, kind)
        errors = "; ".join(f"{k}: {o.error}" for k, o in outcomes.items()
                           if not o.ok and o.error != "not attempted")
        retry_at = utcnow() + dt.timedelta(seconds=self.backoff(attempts)) \
            if not ok and transient and attempts < self.settings.max_attempts else None
        with self.db.session() as s:
            state = queue.finish_delivery(
                s, delivery_id, self.holder.name,
                {k: queue.KindOutcome(o.ok, o.permanent, o.status, o.error)
                 for k, o in outcomes.items()}, ok, retry_at, errors, seen)
            d = s.get(Delivery, delivery_id)
            last_status = d.last_status if d is not None else None
            last_error = d.last_error if d is not None else None
        if state is None:
            event(log, "delivery.lease_lost", logging.WARNING, destination=name,
                  study_id=study_id, effect="another node took this delivery over; its "
                  "outcome is not recorded here")
            return
        for kind, out in refused.items():
            event(log, "delivery.kind_failed", logging.ERROR, destination=name,
                  study_id=study_id, kind=kind, status=out.status or None, error=out.error,
                  effect="the other kinds are delivered; `mammo-node retry` re-sends this one")
        if ok and state == "done":
            # objects/kinds: what this pass sent (0/none when every kind went as it was built);
            # total_*: the whole delivery, whichever passes sent it
            total = ",".join(dict.fromkeys(kind_of(o.sop_class_uid) or o.sop_class_uid
                                           for o in objects)) or "none"
            event(log, "delivery.sent", destination=name, study_id=study_id,
                  objects=sent, kinds=",".join(outcomes) or "none", status=last_status,
                  attempt=attempts, ms=ms, total_objects=len(objects), total_kinds=total)
        elif ok:  # pending: the result is still being built, or grew meanwhile
            event(log, "delivery.kinds_sent", destination=name, study_id=study_id,
                  objects=sent, kinds=",".join(outcomes) or "none", status=last_status,
                  ms=ms, next="the result's next kind")
        elif not transient and state == "pending":
            # a kind refused for good (logged above) while others are still to go: not a retry
            event(log, "delivery.kinds_sent", logging.WARNING, destination=name,
                  study_id=study_id, objects=sent, kinds=",".join(
                      k for k, o in outcomes.items() if o.ok) or "none",
                  refused=",".join(refused), status=last_status, ms=ms,
                  next="the result's other kinds")
        else:
            event(log, "delivery.failed", logging.WARNING if state == "pending" else logging.ERROR,
                  destination=name, study_id=study_id, attempt=attempts, state=state,
                  sent_objects=sent, status=last_status, error=errors or last_error,
                  next_retry_s=self.backoff(attempts) if state == "pending" else None)

    def send(self, dest: Destination, paths: Sequence[Path]) -> SendOutcome:
        """Every object to ``dest`` with the transport of its ``type``."""
        return self.transports[getattr(dest, "type", "dicom")].send(dest, paths)


class CStoreTransport:
    """DICOM C-STORE over one association per delivery."""

    def __init__(self, calling_aet: str, max_pdu_size: int = 131072, timeout: float = 60,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.calling_aet = calling_aet
        self.max_pdu_size = max_pdu_size
        self.timeout = timeout
        self.tls_context = tls_context

    def send(self, dest: Destination, paths: Sequence[Path]) -> SendOutcome:
        """One association, every object; stops at the first failure.

        Each object goes as it was built and written: the file's bytes after its meta header,
        streamed by pynetdicom, when the destination accepted the file's own transfer syntax
        (Explicit VR Little Endian, as the node writes them); read and converted only for a
        destination that accepted Implicit VR alone."""
        split = [split_dataset(p) for p in paths]  # (file meta, offset of the dataset)
        metas = [meta for meta, _ in split]
        ae = AE(ae_title=self.calling_aet)
        ae.maximum_pdu_size = self.max_pdu_size
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class in sorted({str(m.MediaStorageSOPClassUID) for m in metas}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        try:
            tls_args = None
            if getattr(dest, "tls", False):
                if self.tls_context is None:
                    return SendOutcome(False, True, "", "destination needs TLS but [tls] has "
                                                        "no client context")
                tls_args = (self.tls_context, dest.host)
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                                 tls_args=tls_args)
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - pynetdicom reports most failures below
            return SendOutcome(False, False, "", f"association failed: {exc}")
        if not assoc.is_established:
            if assoc.is_rejected:
                return SendOutcome(False, False, "", f"association rejected by {dest.ae_title}")
            return SendOutcome(False, False, "", f"cannot connect to {dest.host}:{dest.port} "
                                                 f"({dest.ae_title})")
        try:
            last = "0x0000"
            for n, (path, meta) in enumerate(zip(paths, metas, strict=True)):
                if n == 1 or len(paths) == 1:
                    faults.hit("deliver.mid_send")
                sop_class = str(meta.MediaStorageSOPClassUID)
                try:
                    status = _store(assoc, path, meta, split[n][1], n + 1, self.timeout)
                except ValueError as exc:  # the destination refused this SOP class's context
                    return SendOutcome(False, True, "", f"{dest.ae_title} did not accept "
                                                        f"{sop_class} at negotiation: {exc}"
                                                        [:300])
                if not status or "Status" not in status:
                    return SendOutcome(False, False, "", "no response to C-STORE (connection "
                                                         "lost or timed out)")
                code = int(status.Status)
                last = f"0x{code:04X}"
                if code not in OK_STATUSES:
                    comment = str(status.get("ErrorComment", "") or "")
                    return SendOutcome(False, True, last,
                                       f"C-STORE refused with {last} {comment}".strip())
            return SendOutcome(True, False, last, "")
        finally:
            if assoc.is_established:
                _release_soon(assoc)


def _release_soon(assoc: Association) -> None:
    """A-RELEASE in a short-lived thread: every object was answered already (the outcome
    stands whatever the release does), and pynetdicom's release (the RP, then its threads
    stopping with 10 ms sleeps) would hold the outcome's record 3-15 ms per kind."""
    threading.Thread(target=_release, args=(assoc,), name="c-store-release",
                     daemon=True).start()


def _release(assoc: Association) -> None:
    try:
        assoc.release()
    except Exception as exc:  # noqa: BLE001 - a failed release changes nothing recorded
        log.debug("delivery.release_failed error=%s", exc)


def _store(assoc: Association, path: Path, meta: Dataset, offset: int, message_id: int,
           timeout: float) -> Dataset:
    """One C-STORE of the file at ``path``: its bytes from ``offset`` written straight to the
    socket (node.fastsend) when the peer accepted its SOP class with the file's own transfer
    syntax and the association runs over plain TCP; else pynetdicom's send (TLS, a converted
    dataset). The status elements of the answer, empty when none came."""
    what = _as_built(assoc, path, meta)
    if isinstance(what, Path) and fastsend.usable(assoc):
        sop_class = str(meta.MediaStorageSOPClassUID)
        cx = next(cx for cx in assoc.accepted_contexts
                  if str(cx.abstract_syntax) == sop_class
                  and str(cx.transfer_syntax[0]) == str(meta.TransferSyntaxUID))
        return fastsend.send_file(assoc, path, offset, sop_class,
                                  str(meta.MediaStorageSOPInstanceUID), int(cx.context_id or 0),
                                  message_id, timeout)
    if message_id > 1:  # pynetdicom's pause has the same stale state (node.fastsend)
        fastsend.leave_previous_pause(assoc)
    return assoc.send_c_store(what, msg_id=message_id)


def _as_built(assoc: Association, path: Path, meta: Dataset) -> Path | Dataset:
    """What to hand ``send_c_store``: the file itself (its bytes go out unchanged, see
    ``STORE_SEND_CHUNKED_DATASET`` above) when a context of its SOP class was accepted with
    its own transfer syntax; else the decoded dataset, which pynetdicom converts."""
    sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    if any(str(cx.abstract_syntax) == sop_class and str(cx.transfer_syntax[0]) == syntax
           for cx in assoc.accepted_contexts):
        return path
    return pydicom.dcmread(path)

