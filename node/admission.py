"""Association admission: who gets one of the listener's slots, so that nobody can lock it out.

Two checks, both cheap and both under one lock:

* **At the TCP accept** (listener thread, before any thread is started for the peer): the total
  number of open connections is at most ``max_associations + reserved_associations``; a peer
  that no trusted-peer entry could match gets no slot when the general pool
  (``max_associations``) is full, nor more than ``max_associations_per_ip`` at once.
* **At the A-ASSOCIATE-RQ** (association thread, when the calling AE title is known): a trusted
  peer (``trusted_peers``: ``"AE@address"``, ``"AE@network"``, ``"*@address"``; ``"AE@*"``
  trusts the AE title alone, which anyone can claim) may use the reserve; any other peer needs a
  slot in the general pool and at most ``max_associations_per_ae`` associations with its calling
  AE title.

A connection holds its slot from the accept until its association thread has ended (see
:mod:`node.security`), whatever ended it: release, abort, a timeout, a stalled PDU. Refusals are
counted by reason (``mammo_connections_refused_total``) and logged, at most one line per peer
address and reason every few seconds (with the count in between), so that a flood cannot fill
the disk with log lines either.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from node import metrics
from node.config import parse_trusted_peer
from node.log import event

log = logging.getLogger("node.admission")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOG_EVERY_SECONDS = 10.0


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class TrustedPeer:
    """One ``trusted_peers`` entry: an AE title and/or an address or network."""

    ae_title: str | None
    network: IPNetwork | None

    @classmethod
    def parse(cls, entry: str) -> TrustedPeer:
        aet, address = parse_trusted_peer(entry)
        return cls(aet, None if address is None else ipaddress.ip_network(address, strict=False))

    def address_matches(self, address: str) -> bool:
        if self.network is None:
            return True
        ip = _ip(address)
        return ip is not None and ip in self.network

    def matches(self, ae_title: str, address: str) -> bool:
        return (self.ae_title is None or self.ae_title == ae_title.strip()) and \
            self.address_matches(address)


@dataclass
class Ticket:
    """One admitted connection; released when its association thread has ended."""

    id: int
    address: str
    ae_title: str | None = None
    trusted: bool = False
    opened: float = field(default_factory=time.monotonic)


class Admission:
    """Counts the open connections and decides on each new one (thread-safe)."""

    def __init__(self, *, max_associations: int, reserved: int = 0, per_ip: int = 1 << 30,
                 per_ae: int = 1 << 30, trusted_peers: Sequence[str] = ()) -> None:
        self.max_associations = max_associations
        self.reserved = reserved
        self.per_ip = per_ip
        self.per_ae = per_ae
        self.trusted = [TrustedPeer.parse(e) for e in trusted_peers]
        self._lock = threading.Lock()
        self._open: dict[int, Ticket] = {}
        self._ids = itertools.count(1)
        self._last_logged: dict[tuple[str, str], tuple[float, int]] = {}

    @property
    def capacity(self) -> int:
        return self.max_associations + (self.reserved if self.trusted else 0)

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def snapshot(self) -> list[Ticket]:
        with self._lock:
            return list(self._open.values())

    # -- the two checks ---------------------------------------------------------------------
    def on_connect(self, address: str, port: int = 0) -> Ticket | None:
        """A new TCP connection from ``address``: its ticket, or None (refused and logged)."""
        exempt = any(t.network is not None and t.address_matches(address) for t in self.trusted)
        may_be_trusted = exempt or any(t.network is None for t in self.trusted)
        with self._lock:
            general = sum(1 for t in self._open.values() if not t.trusted)
            full = general >= self.max_associations and not may_be_trusted
            if full or len(self._open) >= self.capacity:
                reason = "pool_full"
            elif not exempt and sum(1 for t in self._open.values()
                                    if t.address == address) >= self.per_ip:
                reason = "per_ip"
            else:
                ticket = Ticket(next(self._ids), address)
                self._open[ticket.id] = ticket
                return ticket
        self._refused(reason, address, port, None)
        return None

    def on_request(self, ticket: Ticket | None, ae_title: str, port: int = 0) -> str | None:
        """The A-ASSOCIATE-RQ arrived: None to go on, or the reason to reject it (logged)."""
        if ticket is None:  # not admitted through on_connect (should not happen): no limit
            return None
        ae_title = ae_title.strip()
        trusted = any(t.matches(ae_title, ticket.address) for t in self.trusted)
        with self._lock:
            ticket.ae_title = ae_title
            reason = None
            if trusted:
                ticket.trusted = True
            else:
                general = sum(1 for t in self._open.values() if not t.trusted)
                same_ae = sum(1 for t in self._open.values()
                              if t.ae_title == ae_title and t.id != ticket.id)
                if general > self.max_associations:
                    reason = "pool_full"
                elif same_ae >= self.per_ae:
                    reason = "per_ae"
        if reason is not None:
            self._refused(reason, ticket.address, port, ae_title)
        return reason

    def release(self, ticket: Ticket | None) -> None:
        if ticket is not None:
            with self._lock:
                self._open.pop(ticket.id, None)

    # -- accounting -----------------------------------------------------------------------------
    def _refused(self, reason: str, address: str, port: int, ae_title: str | None) -> None:
        metrics.connection_refused(reason)
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last_logged.get((reason, address), (-1e9, 0))
            if now - last < LOG_EVERY_SECONDS:
                self._last_logged[(reason, address)] = (last, suppressed + 1)
                return
            self._last_logged[(reason, address)] = (now, 0)
            if len(self._last_logged) > 4096:  # forget old entries; they only limit logging
                self._last_logged = {k: v for k, v in self._last_logged.items()
                                     if now - v[0] < LOG_EVERY_SECONDS}
            open_now = len(self._open)
        event(log, "connection.refused" if ae_title is None else "association.refused",
              logging.WARNING, peer=f"{address}:{port}", peer_aet=ae_title, reason=reason,
              detail=_DETAIL[reason].format(self), open=open_now,
              refused_since_last_line=suppressed or None)


_DETAIL = {
    "pool_full": "all {0.max_associations} associations in use (reserve of "
                 "{0.reserved} for node.trusted_peers)",
    "per_ip": "node.max_associations_per_ip = {0.per_ip} already open from this address",
    "per_ae": "node.max_associations_per_ae = {0.per_ae} already open with this AE title",
}
