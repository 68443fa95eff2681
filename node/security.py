"""Who may talk to the node: peer-IP allow-list and DICOM TLS (PS3.15 B.1, mutual authentication).

The calling-AE allow-list (``node.allowed_calling_aets``) is checked by pynetdicom during
association negotiation. The peer-IP list is checked earlier, right after ``accept()``: a scanner
on the wrong network never gets as far as an A-ASSOCIATE. With ``[tls] enabled`` every incoming
connection must complete a TLS (>= 1.2) handshake, with a client certificate signed by
``tls.ca_certificates`` when ``require_client_certificate`` is on. The handshake runs in the
connection's own thread with a timeout, so a peer that connects and says nothing cannot stall the
listener. Destinations with ``tls = true`` are reached with a client context built from the same
files.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from node import metrics
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


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the peer-IP check and a bounded TLS handshake."""

    networks: Sequence[IPNetwork] = ()
    handshake_timeout: float = 10.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()  # type: ignore[union-attr]
        if not peer_allowed(str(address[0]), self.networks):
            event(log, "connection.refused", logging.WARNING, peer=f"{address[0]}:{address[1]}",
                  reason="peer IP not in node.allowed_peer_ips")
            metrics.connection_refused("peer_ip")
            _close(sock)
            raise OSError("peer IP not allowed")  # socketserver drops the request quietly
        if self.ssl_context:
            # No handshake here: this is the accept loop; it runs in the connection thread.
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
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


class GuardedAE(AE):
    """An AE whose listener is a :class:`GuardedServer`."""

    def __init__(self, ae_title: str, allowed_peer_ips: Sequence[str] = (),
                 handshake_timeout: float = 10.0) -> None:
        super().__init__(ae_title=ae_title)
        self.networks = parse_networks(allowed_peer_ips)
        self.handshake_timeout = handshake_timeout

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        networks, timeout = self.networks, self.handshake_timeout

        class _Server(GuardedServer):
            pass

        _Server.networks = networks
        _Server.handshake_timeout = timeout
        kwargs["server_class"] = _Server
        return super().make_server(*args, **kwargs)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
