"""Spool.adopt: the digest it records is the SHA-256 of the stored bytes, whether computed while
the instance was received (node.fastrecv) or by reading the file back; fsync errors surface."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.studies import StudyFactory
from node import fastrecv
from node.db import Database, Instance
from node.store import Spool
from tests.netutil import free_port, storescu
from tests.receivers import local_receiver


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_adopt_hashes_a_plain_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    tmp = spool.incoming / "x.dcm"
    data = os.urandom(3 * (1 << 20) + 17)
    tmp.write_bytes(data)
    relpath, size, digest = spool.adopt(tmp)
    assert not tmp.exists()
    assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
    assert spool.path(relpath).read_bytes() == data


def test_streamed_digest_is_used_only_when_it_covers_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    data = os.urandom(9 * (1 << 20))  # crosses the 4 MiB writeback step twice
    f = fastrecv._HashingTempFile(delete=False, mode="wb", suffix=".dcm", dir=spool.incoming)
    for i in range(0, len(data), 1 << 17):
        f.write(data[i : i + (1 << 17)])
        f.file.flush()
    f.close()
    relpath, size, digest = spool.adopt(Path(f.name))
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert fastrecv.take_digest(f.name) is None  # taken once
    # A write that bypassed the wrapper: the byte count differs, the file is hashed instead.
    g = fastrecv._HashingTempFile(delete=False, mode="wb", suffix=".dcm", dir=spool.incoming)
    g.write(b"abc")
    g.file.write(b"def")  # not seen by the hash
    g.close()
    relpath, size, digest = spool.adopt(Path(g.name))
    assert (size, digest) == (6, hashlib.sha256(b"abcdef").hexdigest())
    assert spool.path(relpath).read_bytes() == b"abcdef"


def test_fsync_error_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "data")
    tmp = spool.incoming / "y.dcm"
    tmp.write_bytes(b"data")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output"):
        spool.adopt(tmp)


@pytest.mark.dcmtk
def test_received_instances_record_the_hash_of_the_stored_file(tmp_path: Path) -> None:
    files = StudyFactory("tiny", tag="adopt").write_study(0, tmp_path / "send")
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    port = free_port()
    r = local_receiver(spool, db, port=port, max_pdu_size=16384,
                       max_associations=4)
    r.start()
    try:
        res = storescu(port, files)
    finally:
        r.stop()
    assert res.returncode == 0, res.stderr
    with db.session() as s:
        rows = s.execute(select(Instance)).scalars().all()
    assert len(rows) == 4
    for row in rows:
        stored = spool.path(row.relpath)
        assert row.size == stored.stat().st_size and row.sha256 == _sha(stored)
    assert not list(spool.incoming.iterdir())
    # the digests were taken from the receive path, none is left pending
    assert fastrecv._installed and not [p for p in fastrecv._pending if "incoming" in p and
                                        str(spool.incoming) in p]
    db.dispose()
