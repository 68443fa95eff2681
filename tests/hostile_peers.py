"""Misbehaving DICOM and HTTP peers for the red-team tests, built from raw sockets.

Everything here talks to 127.0.0.0/8 only. On Linux the whole /8 is routed to the loopback
interface, so a peer can bind another source address (127.0.0.2, 127.0.0.3, ...) and look like
another host to the node's per-IP limits.

The PDUs are written by hand (PS3.8 9.3) so that nothing on the sending side repairs or
completes them: an association that stops in the middle of a P-DATA PDU, a sender that drips
bytes below any sensible rate, a C-STORE that is aborted half way.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

VERIFICATION = "1.2.840.10008.1.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + (b"\x00" if len(raw) % 2 else b"")


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(called: str = "MAMMO_AI", calling: str = "HOSTILE",
                 abstract_syntax: str = VERIFICATION,
                 transfer_syntax: str = ExplicitVRLittleEndian,
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing one presentation context (id 1)."""
    called_b = called.encode("latin-1")[:16].ljust(16)
    calling_b = calling.encode("latin-1")[:16].ljust(16)
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, _uid_bytes(abstract_syntax))
                    + _item(0x40, _uid_bytes(transfer_syntax)))
    user_info = _item(0x50, _item(0x51, struct.pack(">I", max_pdu)))
    body = (struct.pack(">HH", 1, 0) + called_b + calling_b + bytes(32)
            + _item(0x10, _uid_bytes(APPLICATION_CONTEXT)) + context + user_info)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF PDU from (context id, message control header, data) items."""
    body = b"".join(struct.pack(">IBB", len(data) + 2, cx, mch) + data
                    for cx, mch, data in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def a_abort() -> bytes:
    return struct.pack(">BBI", 0x07, 0, 4) + bytes([0, 0, 0, 0])


def c_store_command(sop_class: str, sop_uid: str, message_id: int = 1) -> bytes:
    """The command set of a C-STORE-RQ (implicit VR little endian, with its group length)."""
    cs = Dataset()
    cs.AffectedSOPClassUID = sop_class
    cs.CommandField = 0x0001
    cs.MessageID = message_id
    cs.Priority = 0
    cs.CommandDataSetType = 0x0000
    cs.AffectedSOPInstanceUID = sop_uid
    body = encode(cs, True, True)
    assert body is not None
    return encode(_group_length(len(body)), True, True) + body  # type: ignore[operator]


def c_echo_command(message_id: int = 1) -> bytes:
    cs = Dataset()
    cs.AffectedSOPClassUID = VERIFICATION
    cs.CommandField = 0x0030
    cs.MessageID = message_id
    cs.CommandDataSetType = 0x0101
    body = encode(cs, True, True)
    assert body is not None
    return encode(_group_length(len(body)), True, True) + body  # type: ignore[operator]


def _group_length(n: int) -> Dataset:
    g = Dataset()
    g.CommandGroupLength = n
    return g


def dataset_body(path: Path) -> bytes:
    """The dataset of a Part 10 file without preamble and File Meta (as sent in P-DATA)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    group_len = struct.unpack_from("<I", raw, 132 + 8)[0]
    return raw[132 + 12 + group_len:]


class RawPeer:
    """One TCP connection to the node, optionally from another loopback source address."""

    def __init__(self, port: int, source_ip: str = "127.0.0.1", host: str = "127.0.0.1",
                 timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source_ip != "127.0.0.1":
            self.sock.bind((source_ip, 0))
        self.sock.connect((host, port))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int, bytes] | None:
        """(PDU type, body) of the next PDU, None when the node closed the connection."""
        head = self._read(6)
        if head is None:
            return None
        pdu_type, _, length = struct.unpack(">BBI", head)
        body = self._read(length)
        return None if body is None else (pdu_type, body)

    def _read(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (ConnectionError, TimeoutError, OSError):
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def associate(self, called: str = "MAMMO_AI", calling: str = "HOSTILE",
                  abstract_syntax: str = VERIFICATION) -> int | None:
        """Send an A-ASSOCIATE-RQ: 0x02 (accepted), 0x03 (rejected), None (closed)."""
        self.send(associate_rq(called, calling, abstract_syntax))
        pdu = self.read_pdu()
        return None if pdu is None else pdu[0]

    def closed_by_node(self, within: float) -> bool:
        """True when the node closes (or aborts) the connection within ``within`` seconds."""
        self.sock.settimeout(within)
        deadline = time.monotonic() + within
        try:
            while time.monotonic() < deadline:
                data = self.sock.recv(65536)
                if not data:
                    return True
                if data[:1] == b"\x07":  # A-ABORT: the node gives up on us
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True
        return False

    def close(self, reset: bool = False) -> None:
        if reset:  # RST instead of FIN: the way a crashed sender disappears
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.sock.close()


def stalled_association(port: int, source_ip: str = "127.0.0.1",
                        calling: str = "STALLER") -> RawPeer | None:
    """An accepted association that then sends only the first bytes of a P-DATA PDU."""
    peer = RawPeer(port, source_ip)
    if peer.associate(calling=calling) != 0x02:
        peer.close()
        return None
    pdu = p_data([(1, 0x03, c_echo_command())])
    peer.send(pdu[:10])  # PDU header and part of the first PDV: never the rest
    return peer


def idle_association(port: int, source_ip: str = "127.0.0.1",
                     calling: str = "IDLER") -> RawPeer | None:
    """An accepted association that then says nothing at all."""
    peer = RawPeer(port, source_ip)
    if peer.associate(calling=calling) != 0x02:
        peer.close()
        return None
    return peer


def silent_connection(port: int, source_ip: str = "127.0.0.1") -> RawPeer:
    """A TCP connection that never sends an A-ASSOCIATE-RQ."""
    return RawPeer(port, source_ip)


def drip(peer: RawPeer, data: bytes, bytes_per_second: float, until: float) -> int:
    """Send ``data`` at ``bytes_per_second`` until done or ``until`` (monotonic); bytes sent.

    Stops as soon as the node closes the connection.
    """
    sent = 0
    step = max(1, int(bytes_per_second / 4))
    while sent < len(data) and time.monotonic() < until:
        try:
            peer.sock.sendall(data[sent:sent + step])
        except OSError:
            break
        sent += step
        time.sleep(step / bytes_per_second)
    return min(sent, len(data))


def start_store(port: int, path: Path, sop_class: str, sop_uid: str,
                source_ip: str = "127.0.0.1", calling: str = "ABORTER",
                fraction: float = 0.5, max_pdu: int = 16384) -> RawPeer | None:
    """Associate and send ``fraction`` of the C-STORE of ``path``, then stop (no last PDV)."""
    peer = RawPeer(port, source_ip)
    if peer.associate(calling=calling, abstract_syntax=sop_class) != 0x02:
        peer.close()
        return None
    peer.send(p_data([(1, 0x03, c_store_command(sop_class, sop_uid))]))
    body = dataset_body(path)
    upto = int(len(body) * fraction)
    chunk = max_pdu - 12
    for start in range(0, upto, chunk):
        peer.send(p_data([(1, 0x00, body[start:min(start + chunk, upto)])]))
    return peer


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


@contextlib.contextmanager
def many(factory, n: int) -> Iterator[list]:  # type: ignore[no-untyped-def]
    """Open ``n`` peers with ``factory(i)``; close all of them afterwards."""
    peers = []
    try:
        for i in range(n):
            with contextlib.suppress(OSError):
                peers.append(factory(i))
        yield peers
    finally:
        for p in peers:
            if p is not None:
                p.close()


def http_slowloris(port: int, n: int, source_ip: str = "127.0.0.1") -> list[socket.socket]:
    """``n`` HTTP connections that send a partial request line and then wait."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        if source_ip != "127.0.0.1":
            s.bind((source_ip, 0))
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def scrape(http_port: int) -> str:
    """The node's /metrics text."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of ``name`` with exactly ``labels`` from a /metrics text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    head = f"{name}{{{want}}}" if want else name
    return next((float(ln.split()[-1]) for ln in text.splitlines()
                 if ln.startswith(head + " ")), 0.0)
