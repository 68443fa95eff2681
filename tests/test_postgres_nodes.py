"""Three node processes, one PostgreSQL queue, one shared data folder; one node SIGKILLed
during an analysis and another during a delivery.

* ``recv-a`` (all roles) is killed inside its first analysis (fault point
  ``analysis.running``), holding the job under its lease;
* ``recv-b`` (receive, deliver) and ``gpu-1`` (analyse only: no listener) start; ``gpu-1`` takes
  the dead node's job over once its lease expires; ``recv-b`` is killed in the middle of its
  first delivery (``deliver.mid_send``), with objects half sent;
* ``recv-a`` comes back (no fault) and takes the delivery over; ``recv-b`` comes back; studies
  are sent to either receiver throughout.

Then: every instance answered 0x0000 is stored; every study has exactly one SR and one SC per
image at the destination, with the UIDs of its recorded result (copies re-sent after the kill
carry the same UIDs); the claim history shows no job or delivery was ever held by two nodes at
once, and that the killed nodes' claims ended by expiry; ``status --json`` lists the nodes.
"""

from __future__ import annotations

import os
import signal
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.db import ClaimRecord, Database, Delivery, Instance, Result, ResultObject, Study
from tests.netutil import NodeProcess, storescu, wait_until
from tests.pgserver import PostgresServer
from tests.reliability import SC_CLASS, SR_CLASS, RecordingSCP
from tests.smallstudies import small_study

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

LEASE = {"lease_seconds": 3, "heartbeat_seconds": 0.5}


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()


def _node(tmp: Path, name: str, roles: list[str], url: str, shared: Path,
          dest: RecordingSCP) -> NodeProcess:
    node = NodeProcess(tmp / name, [dest.destination()],
                       node={"data_dir": str(shared)},
                       database={"url": url},
                       cluster={"node_name": name, "roles": roles, **LEASE},
                       study={"stable_seconds": 2, "complete_on_four_views": True},
                       delivery={"max_attempts": 50, "backoff_initial_seconds": 1,
                                 "backoff_max_seconds": 2},
                       log={"file": str(tmp / name / "node.log"), "level": "INFO"})
    node.log_path = tmp / name / "node.log"
    return node


def _start(node: NodeProcess, monkeypatch: pytest.MonkeyPatch, faults: str = "",
           listener: bool = True) -> None:
    if faults:
        monkeypatch.setenv("MAMMO_NODE_FAULTS", faults)
    else:
        monkeypatch.delenv("MAMMO_NODE_FAULTS", raising=False)
    if listener:
        node.start(timeout=240)
    else:  # no receive role, no port: wait for its start-up line
        import subprocess
        import sys

        from tests.netutil import REPO

        node.stderr = open(node.workdir / "node.stderr", "ab")  # noqa: SIM115
        node.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(node.config)], cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=node.stderr,
            stderr=subprocess.STDOUT)
        wait_until(lambda: "node.started" in node.log() or node.proc.poll() is not None, 240,
                   0.5, f"{node.workdir.name} started")
        assert node.proc.poll() is None, node.log()[-2000:]
    monkeypatch.delenv("MAMMO_NODE_FAULTS", raising=False)


def _send(node: NodeProcess, study: list[Path], acked: set[str]) -> None:
    out = storescu(node.port, study)
    assert out.returncode == 0, out.stdout + out.stderr
    acked.update(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                 for p in study)


def _killed(node: NodeProcess, what: str) -> None:
    wait_until(lambda: node.proc.poll() is not None, 240, 0.5, what)
    assert node.proc.returncode == -signal.SIGKILL, node.log()[-3000:]
    node.stop()


def test_three_nodes_one_queue_survive_kills_in_analysis_and_delivery(
        tmp_path: Path, pg: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg.create_database("nodes")
    shared = tmp_path / "shared"
    dest = RecordingSCP(tmp_path / "dest").start()
    studies = [small_study(tmp_path / "in" / f"s{i}", i, tag="pgnodes") for i in range(6)]
    uids = [str(pydicom.dcmread(s[0], stop_before_pixels=True).StudyInstanceUID)
            for s in studies]
    a = _node(tmp_path, "recv-a", ["receive", "analyse", "deliver"], url, shared, dest)
    b = _node(tmp_path, "recv-b", ["receive", "deliver"], url, shared, dest)
    gpu = _node(tmp_path, "gpu-1", ["analyse"], url, shared, dest)
    acked: set[str] = set()
    db = Database(url)
    try:
        # 1. recv-a dies inside its first analysis, holding the job.
        _start(a, monkeypatch, faults="analysis.running:1")
        _send(a, studies[0], acked)
        _killed(a, "recv-a killed during the analysis")
        # 2. recv-b receives and delivers, gpu-1 analyses (it takes recv-a's job over when
        #    the lease expires); recv-b dies in the middle of its first delivery.
        _start(b, monkeypatch, faults="deliver.mid_send:1")
        _start(gpu, monkeypatch, listener=False)
        _send(b, studies[1], acked)
        _send(b, studies[2], acked)
        _killed(b, "recv-b killed during a delivery")
        # 3. recv-a is back (it delivers what recv-b held), then recv-b.
        _start(a, monkeypatch)
        _send(a, studies[3], acked)
        _send(a, studies[4], acked)
        _start(b, monkeypatch)
        _send(b, studies[5], acked)

        def all_delivered() -> bool:
            with db.session() as s:
                states = s.execute(
                    select(Study.study_uid, Delivery.state)
                    .join(Result, Result.study_id == Study.id)
                    .join(Delivery, Delivery.result_id == Result.id)
                    .where(Result.current.is_(True))).all()
            done = {u for u, st in states if st == "done"}
            return done >= set(uids) and all(st == "done" for _, st in states)

        wait_until(all_delivered, 420, 1.0, "every study delivered")
        status = a.cli("status", "--json")
    finally:
        for n in (a, b, gpu):
            n.stop()
        dest.stop()
    assert status.returncode == 0, status.stderr
    import json

    nodes = {n["name"]: n for n in json.loads(status.stdout)["nodes"]}
    assert set(nodes) == {"recv-a", "recv-b", "gpu-1"}
    assert nodes["gpu-1"]["roles"] == ["analyse"]
    assert nodes["recv-b"]["roles"] == ["receive", "deliver"]

    with db.session() as s:
        stored = set(s.execute(select(Instance.sop_uid)).scalars())
        recorded: dict[str, set[str]] = defaultdict(set)
        for uid, sop in s.execute(
                select(Study.study_uid, ResultObject.sop_uid)
                .join(Result, Result.study_id == Study.id)
                .join(ResultObject, ResultObject.result_id == Result.id)
                .where(Result.current.is_(True))):
            recorded[uid].add(sop)
        claims = s.execute(select(ClaimRecord).order_by(ClaimRecord.id)).scalars().all()
    db.dispose()
    assert acked <= stored  # nothing acknowledged was lost

    # Exactly one SR and one SC per image per study, with the recorded result's UIDs.
    got: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for f in dest.files():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        got[str(ds.StudyInstanceUID)][str(ds.SOPClassUID)].add(str(ds.SOPInstanceUID))
    for uid in uids:
        assert len(got[uid][SR_CLASS]) == 1, uid
        assert len(got[uid][SC_CLASS]) == 4, uid
        assert got[uid][SR_CLASS] | got[uid][SC_CLASS] == recorded[uid], uid

    # No job or delivery was ever held by two nodes at once (claim history).
    by_row: dict[tuple[str, int], list[ClaimRecord]] = defaultdict(list)
    for c in claims:
        by_row[(c.kind, c.row_id)].append(c)
    for key, history in by_row.items():
        history.sort(key=lambda c: c.claimed_at)
        for earlier, later in zip(history, history[1:], strict=False):
            assert earlier.released_at is not None and \
                earlier.released_at <= later.claimed_at, (key, [(c.holder, c.claimed_at,
                                                               c.released_at, c.outcome)
                                                              for c in history])
        assert history[-1].released_at is not None, key
    lost = {(c.kind, c.holder) for c in claims if c.outcome in ("expired", "restarted")}
    assert ("job", "recv-a") in lost and ("delivery", "recv-b") in lost
    taken_over = [h for (kind, _), h in by_row.items() if kind == "job" and len(h) > 1
                  and h[0].holder == "recv-a"]
    assert taken_over and taken_over[0][-1].outcome == "done"
