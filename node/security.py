"""Who may talk to the node: peer-IP allow-list and DICOM TLS (PS3.15 B.1, mutual authentication).

The calling-AE allow-list (``node.allowed_calling_aets``) is checked by pynetdicom during
association negotiation. The peer-IP list is checked earlier, right after ``accept()``: a scanner
on the wrong network never gets as far as an A-ASSOCIATE. With ``[tls] enabled`` every incoming
connection must complete a TLS (>= 1.2) handshake, with a client certificate signed by
``tls.ca_certificates`` when ``require_client_certificate`` is on. The handshake runs in the
connection's own thread with a timeout, so a peer that connects and says nothing cannot stall the
listener. Destinations with ``tls = true`` are reached with a client context built from the same
files.

The same server applies the association admission policy (:mod:`node.admission`) at the accept,
keeps each connection's thread until its association has ended (so the slot is released exactly
then), removes the temp file of a C-STORE the association left unfinished, and can cut every
association off at shutdown.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from node import fastrecv, metrics
from node.admission import Admission, Ticket
from node.config import TLSSettings
from node.log import event

log = logging.getLogger("node.security")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Sequence[str]) -> list[IPNetwork]:
    """``["10.0.0.5", "192.168.1.0/24"]`` -> networks; raises ValueError on a bad entry."""
    return [ipaddress.ip_network(e.strip(), strict=False) for e in entries]


def peer_allowed(address: str, networks: Sequence[IPNetwork]) -> bool:
    """True when ``networks`` is empty (everyone) or contains ``address``."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The listener's context: our certificate, TLS >= 1.2, client certificates checked."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                     cafile=tls.ca_certificates or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return ctx


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """Context for delivering to a TLS destination: verify it, present our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=tls.ca_certificates or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate and tls.private_key:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    return ctx


#: A-ASSOCIATE-RJ: rejected-transient (2), service-provider presentation (3), local limit (2).
_RJ_LOCAL_LIMIT = struct.pack(">BBIBBBB", 0x03, 0, 4, 0, 0x02, 0x03, 0x02)


class _AssociationHandler(RequestHandler):
    """pynetdicom's handler, but the connection thread waits for its association to end."""

    server: GuardedServer

    def handle(self) -> None:
        assoc = self._create_association()
        # the node's own attribute on pynetdicom's Association (node.receive reads it back)
        assoc.admission_ticket = self.server.tickets.get(id(self.request))  # type: ignore[attr-defined]
        self.server.associations.add(assoc)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        try:
            assoc.start()
            started = time.monotonic()
            while assoc.is_alive():
                assoc.join(0.25)
                if (assoc.is_alive() and assoc.requestor.primitive is None
                        and time.monotonic() - started > 0.5
                        and assoc.dul.state_machine.current_state == "Sta1"):
                    # The peer closed before its A-ASSOCIATE-RQ (a port probe, a scanner):
                    # pynetdicom would wait node.acse_timeout for it; end it now, free the slot.
                    assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]  # ACSE reads None as "no primitive"
            assoc.dul.join(5.0)
        finally:
            self.server.associations.discard(assoc)
            removed = fastrecv.discard_partial(getattr(assoc.dimse, "message", None))
            if removed is not None:
                metrics.partial_transfer_removed()
                event(log, "transfer.partial_removed", logging.WARNING,
                      peer_aet=assoc.requestor.ae_title or None,
                      peer=f"{self.client_address[0]}:{self.client_address[1]}",
                      reason="association ended before the C-STORE was complete")


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the peer-IP check, a bounded TLS handshake and the
    admission policy; every association's slot is held until its thread has ended."""

    networks: Sequence[IPNetwork] = ()
    handshake_timeout: float = 10.0
    admission: Admission | None = None
    daemon_threads = True  # stopping must not wait for peers: node.service bounds it
    request_queue_size = 128  # listen backlog: a burst of connects is refused by us, not lost

    def service_actions(self) -> None:
        """pynetdicom runs a full ``gc.collect()`` every 60 loop turns here, in the accept loop:
        with torch loaded that is a pause per 60 connections a flood can trigger at will. The
        connection threads here end with their association, so there is nothing to collect."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = _AssociationHandler
        self.tickets: dict[int, Ticket | None] = {}
        self.associations: set[Any] = set()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self.socket is None:  # pynetdicom types it optional; it is bound in __init__
            raise OSError("the association server has no listening socket")
        sock, address = self.socket.accept()
        if not peer_allowed(str(address[0]), self.networks):
            event(log, "connection.refused", logging.WARNING, peer=f"{address[0]}:{address[1]}",
                  reason="peer IP not in node.allowed_peer_ips")
            metrics.connection_refused("peer_ip")
            _close(sock)
            raise OSError("peer IP not allowed")  # socketserver drops the request quietly
        ticket = None
        if self.admission is not None:
            ticket = self.admission.on_connect(str(address[0]), int(address[1]))
            if ticket is None:  # refused and logged; tell a DICOM peer why, then hang up
                _reject_and_close(sock, tls=self.ssl_context is not None)
                raise OSError("no association slot for this peer")
        if self.ssl_context:
            # No handshake here: this is the accept loop; it runs in the connection thread.
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        self.tickets[id(sock)] = ticket
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(self.handshake_timeout)
                    request.do_handshake()
                    request.settimeout(None)
                except (OSError, ValueError) as exc:  # ssl.SSLError, timeout, reset
                    event(log, "tls.handshake_failed", logging.WARNING,
                          peer=f"{client_address[0]}:{client_address[1]}",
                          reason=f"{type(exc).__name__}: {str(exc)[:160]}")
                    metrics.connection_refused("tls_handshake")
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            ticket = self.tickets.pop(id(request), None)
            if self.admission is not None:
                self.admission.release(ticket)

    def start_watchdog(self, period: float = 0.5) -> None:
        """One thread for all associations: a DIMSE message (a C-STORE's dataset) that pauses
        longer than ``node.pdu_timeout`` between PDUs, or arrives below the minimum rate, is cut
        off. (Inside a PDU the same limits are socket deadlines: node.fastrecv.)"""
        self._watch_stop = threading.Event()
        t = threading.Thread(target=self._watch, args=(period,), name="association-watchdog",
                             daemon=True)
        t.start()

    def stop_watchdog(self) -> None:
        stop = getattr(self, "_watch_stop", None)
        if stop is not None:
            stop.set()

    def _watch(self, period: float) -> None:
        progress: dict[int, tuple[int, float, int]] = {}  # assoc -> (message id, start, bytes)
        while not self._watch_stop.wait(period):
            now = time.monotonic()
            alive = set()
            for assoc in list(self.associations):
                sock = getattr(assoc.dul, "socket", None)
                message = getattr(assoc.dimse, "message", None)
                if sock is None or message is None:
                    continue
                key = id(assoc)
                alive.add(key)
                seen = progress.get(key)
                if seen is None or seen[0] != id(message):
                    seen = (id(message), getattr(sock, "rx_last", now) or now,
                            getattr(sock, "rx_bytes", 0))
                    progress[key] = seen
                verdict = fastrecv.message_verdict(sock, seen[1], seen[2], now)
                if verdict is not None:
                    fastrecv.cut_off(sock, verdict, getattr(sock, "rx_bytes", 0) - seen[2],
                                     now - seen[1])
                    progress.pop(key, None)
            for key in set(progress) - alive:
                progress.pop(key, None)

    def cut_all(self, reason: str = "shutdown") -> int:
        """Shut the socket of every association still open (they end at once); how many."""
        assocs = list(self.associations)
        for assoc in assocs:
            sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            metrics.association_aborted(reason)
        return len(assocs)


class GuardedAE(AE):
    """An AE whose listener is a :class:`GuardedServer`."""

    def __init__(self, ae_title: str, allowed_peer_ips: Sequence[str] = (),
                 handshake_timeout: float = 10.0, admission: Admission | None = None) -> None:
        super().__init__(ae_title=ae_title)
        self.networks = parse_networks(allowed_peer_ips)
        self.handshake_timeout = handshake_timeout
        self.admission = admission

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        networks, timeout, admission = self.networks, self.handshake_timeout, self.admission

        class _Server(GuardedServer):
            pass

        _Server.networks = networks
        _Server.handshake_timeout = timeout
        _Server.admission = admission
        kwargs["server_class"] = _Server
        return super().make_server(*args, **kwargs)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _reject_and_close(sock: socket.socket, tls: bool) -> None:
    """Answer A-ASSOCIATE-RJ (local limit exceeded) without waiting for anything, then close.

    Done in the accept loop, so nothing here may block: the socket is non-blocking, a peer
    whose buffer is full simply gets the FIN. Over TLS there is no handshake yet: just close.
    """
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        if not tls:
            sock.send(_RJ_LOCAL_LIMIT)
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):  # what the peer sent: read, so close sends FIN
                sock.recv(65536)
    with contextlib.suppress(OSError):
        sock.close()

