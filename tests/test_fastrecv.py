"""node/fastrecv.py: the PDU reader returns exactly what was sent and never trusts a declared
length for its allocation (a hostile peer declaring a 4 GiB PDU must not cost 4 GiB)."""

from __future__ import annotations

import socket
import threading
import tracemalloc
from pathlib import Path

from node import fastrecv


class _Assoc:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def _send_then_close(sock: socket.socket, data: bytes) -> threading.Thread:
    t = threading.Thread(target=lambda: (sock.sendall(data), sock.close()))
    t.start()
    return t


def test_reads_exactly_the_requested_bytes() -> None:
    a, b = socket.socketpair()
    data = bytes(range(256)) * 40_000  # 10 MB: several buffer doublings
    t = _send_then_close(a, data + b"next PDU")
    got = fastrecv._recv(_Assoc(b), len(data))
    t.join()
    assert bytes(got) == data
    assert fastrecv._recv(_Assoc(b), 8) == b"next PDU"
    b.close()


def test_declared_huge_length_allocates_only_what_arrives() -> None:
    a, b = socket.socketpair()
    t = _send_then_close(a, b"x" * 1000)
    tracemalloc.start()
    got = fastrecv._recv(_Assoc(b), 4 << 30)  # the peer declares 4 GiB, sends 1000 bytes
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t.join()
    b.close()
    assert bytes(got) == b"x" * 1000
    assert peak < 64 << 20, f"{peak} bytes allocated for a 1000-byte PDU"


def test_dataset_started_while_disk_is_low_is_not_written(tmp_path: Path) -> None:
    low = True
    fastrecv.set_space_guard(lambda: not low)
    try:
        refused = fastrecv._HashingTempFile(dir=tmp_path, delete=False)
        refused.write(b"y" * 5000)
        refused.file.flush()
        low = False
        accepted = fastrecv._HashingTempFile(dir=tmp_path, delete=False)
        accepted.write(b"z" * 3000)
        accepted.file.flush()
    finally:
        fastrecv.set_space_guard(None)
    assert Path(refused.name).stat().st_size == 0  # nothing partial on disk
    assert fastrecv.discarded(refused.name) == 5000
    assert fastrecv.discarded(accepted.name) is None
    assert Path(accepted.name).read_bytes() == b"z" * 3000
    assert fastrecv.take_digest(accepted.name)[0] == 3000
