"""Several nodes, one queue: this node's name, its heartbeat, and the shared-storage check.

Each node registers itself in ``nodes`` (name, roles, host, pid, version) and beats every
``cluster.heartbeat_seconds``: the beat updates ``heartbeat_at``, renews the leases of the jobs,
deliveries and shadow runs it holds (node.queue.renew_leases) and puts back in the queue what
other nodes held and stopped renewing (node.queue.reap_expired). A node killed mid-work thus
loses its claims ``cluster.lease_seconds`` after its last beat, and whichever node beats next
takes them over; a node that restarts under the same name releases its previous run's claims at
once. Names are unique: a node refuses to start while another live node has its name.

Shared storage: instances and results are files under ``node.data_dir``, referenced from the
database by relative path, so every node sharing a queue must see the same folder at the same
path (an NFS or SMB mount, a cluster filesystem). The first node writes a storage identity
(``.mammo-node-storage`` in data_dir, and ``storage_id`` in the database); every node checks at
start-up that the folder it sees carries the identity the database names, and that it can write
and fsync there, and refuses to start otherwise (a node on an empty local folder would accept
studies that no other node can read, and analyse nothing it was given).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from node import queue
from node.db import ClusterSetting, Database, NodeRecord, utcnow
from node.log import event

log = logging.getLogger("node.cluster")

STORAGE_MARKER = ".mammo-node-storage"
_PLURAL = {"job": "jobs", "delivery": "deliveries", "shadow": "shadow_runs"}


class StartupRefused(RuntimeError):
    """The node must not start (the message says why and what to do)."""


def node_name(configured: str, port: int) -> str:
    return configured or f"{socket.gethostname()}:{port}"[:64]


# -- shared storage ----------------------------------------------------------------------------
def check_shared_storage(db: Database, data_dir: Path) -> str:
    """The storage identity of ``data_dir``, checked against the database's; raises
    :class:`StartupRefused` when this node does not see the queue's storage or cannot write it.
    """
    data_dir = Path(data_dir)
    marker = data_dir / STORAGE_MARKER
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".write-probe-{uuid.uuid4().hex}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise StartupRefused(f"data_dir {data_dir} is not writable ({exc}); nothing could be "
                             "stored durably") from None
    seen = marker.read_text(encoding="ascii").strip() if marker.is_file() else None
    with db.session() as s:
        row = s.get(ClusterSetting, "storage_id")
        if row is None:
            if seen is None:
                seen = uuid.uuid4().hex
                _write_durably(marker, seen)
            s.add(ClusterSetting(key="storage_id", value=seen))
            event(log, "storage.registered", data_dir=str(data_dir), storage_id=seen)
            return seen
        expected = row.value
    if seen != expected:
        found = "no storage marker" if seen is None else f"storage id {seen}"
        raise StartupRefused(
            f"data_dir {data_dir} is not the storage this queue's database uses (it expects "
            f"storage id {expected} in {marker}; found {found}). Every node sharing a queue "
            "must see the same shared folder at the same path: mount it (NFS, SMB, a cluster "
            "filesystem) before starting the node")
    return expected


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- membership --------------------------------------------------------------------------------
class Membership:
    """This node's row in ``nodes`` and its heartbeat thread."""

    def __init__(self, db: Database, holder: queue.Holder, roles: Sequence[str],
                 heartbeat_seconds: float, version: str) -> None:
        self.db, self.holder, self.roles = db, holder, list(roles)
        self.heartbeat_seconds, self.version = heartbeat_seconds, version
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.host, self.pid = socket.gethostname(), os.getpid()

    def join(self) -> None:
        """Register (refused while another live node has this name). What this node's previous
        run held is released by the worker's, deliverer's and shadow runner's ``recover()``
        (node.queue.release_holder), right after."""
        now = utcnow()
        fresh = now - dt.timedelta(seconds=self.holder.lease_seconds)
        with self.db.session() as s:
            row = s.get(NodeRecord, self.holder.name, with_for_update=True)
            if row is not None and row.state != "stopped" and row.heartbeat_at > fresh \
                    and (row.host, row.pid) != (self.host, self.pid) \
                    and not (row.host == self.host and not _pid_alive(row.pid)):
                raise StartupRefused(
                    f"another node named {self.holder.name!r} (host {row.host}, pid {row.pid}) "
                    f"beat {(now - row.heartbeat_at).total_seconds():.0f} s ago; node names "
                    "must be unique: set [cluster] node_name")
            if row is None:
                row = NodeRecord(name=self.holder.name)
                s.add(row)
            row.roles, row.host, row.pid = ",".join(self.roles), self.host, self.pid
            row.version, row.started_at, row.heartbeat_at, row.state = \
                self.version, now, now, "running"
        event(log, "node.joined", node=self.holder.name, roles=",".join(self.roles),
              lease_seconds=self.holder.lease_seconds)

    def beat(self) -> None:
        """One heartbeat: mark alive, renew this node's leases, reap expired ones."""
        with self.db.session() as s:
            row = s.get(NodeRecord, self.holder.name)
            if row is not None:
                row.heartbeat_at = utcnow()
        queue.renew_leases(self.db, self.holder)
        reaped = queue.reap_expired(self.db)
        if reaped:
            event(log, "queue.leases_expired", logging.WARNING, by=self.holder.name,
                  **{_PLURAL[k]: v for k, v in reaped.items()},
                  effect="back in the queue: their node stopped renewing its leases")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - the database may be away a while
                event(log, "node.heartbeat_failed", logging.WARNING, node=self.holder.name,
                      error=f"{type(exc).__name__}: {exc}"[:300])

    def leave(self) -> None:
        """Stop beating and mark this node stopped (its claims were released by the stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        try:
            with self.db.session() as s:
                row = s.get(NodeRecord, self.holder.name)
                if row is not None:
                    row.state, row.heartbeat_at = "stopped", utcnow()
        except Exception:  # leaving anyway: the row's age tells the rest
            log.debug("could not mark the node stopped", exc_info=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_nodes(s: Session, now: dt.datetime | None = None) -> list[dict]:
    """Every registered node with its roles, last heartbeat (seconds ago) and holdings."""
    now = now or utcnow()
    held = queue.holdings(s)
    out = []
    for n in s.execute(select(NodeRecord).order_by(NodeRecord.name)).scalars():
        out.append({"name": n.name, "roles": n.roles.split(","), "host": n.host, "pid": n.pid,
                    "version": n.version, "state": n.state,
                    "started_at": n.started_at.isoformat() + "Z",
                    "heartbeat_age_s": round((now - n.heartbeat_at).total_seconds(), 1),
                    "holds": held.get(n.name, {})})
    return out
