"""The queue (node/queue.py) in-process on SQLite: the one owner of state changes, leases,
heartbeats, the node registry and the claim history."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from sqlalchemy import select

from node import queue
from node.cluster import (
    STORAGE_MARKER,
    Membership,
    StartupRefused,
    check_shared_storage,
    describe_nodes,
)
from node.db import (
    ClaimRecord,
    Database,
    Delivery,
    Job,
    NodeRecord,
    Result,
    Study,
    utcnow,
)
from node.queue import DeliveryState, Holder, JobState, StudyState

REPO = Path(__file__).resolve().parents[1]
A, B = Holder("node-a", 30), Holder("node-b", 30)


def _queued_job(db: Database, uid: str = "1.2.3") -> int:
    with db.session() as s:
        study, _ = queue.receive_instance(s, uid, utcnow())
        done = queue.complete_study(s, study, "key-" + uid)
    assert done.job is not None
    return done.job


def _delivery(db: Database, uid: str = "1.2.9") -> int:
    job_id = _queued_job(db, uid)
    assert queue.claim_job(db, A) == job_id
    with db.session() as s:
        assert queue.finish_job(s, job_id, "key-" + uid, A.name)
        job = s.get(Job, job_id)
        r = Result(study_id=job.study_id, job_id=job_id, analysis_key="a-" + uid)
        s.add(r)
        s.flush()
        queue.queue_deliveries(s, r.id, ["pacs"])
        s.flush()
        return s.execute(select(Delivery.id).where(Delivery.result_id == r.id)).scalar_one()


def test_states_flow_top_down_through_the_queue(db: Database) -> None:
    job_id = _queued_job(db)
    with db.session() as s:
        study = s.execute(select(Study)).scalar_one()
        assert study.state == StudyState.COMPLETE
        # re-opened while queued: the job waits (not claimable while receiving)
        queue.receive_instance(s, "1.2.3", utcnow())
    assert queue.claim_job(db, A) is None
    with db.session() as s:
        study = s.execute(select(Study)).scalar_one()
        assert study.state == StudyState.RECEIVING and study.generation == 2
        absorbed = queue.complete_study(s, study, "key-2")
        assert absorbed.job == job_id and "new content" in absorbed.absorbed
    assert queue.claim_job(db, A) == job_id
    with db.session() as s:
        queue.begin_analysis(s, s.execute(select(Study)).scalar_one())
    assert queue.job_verdict(db, job_id, "key-2", A.name) is None
    assert queue.requeue_job(db, job_id, "study content changed", A.name) == "1.2.3"
    with db.session() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.attempts, job.holder) == (JobState.QUEUED, 0, None)
        assert s.execute(select(Study.state)).scalar_one() == StudyState.COMPLETE
    assert queue.claim_job(db, A) == job_id
    with db.session() as s:
        assert queue.finish_job(s, job_id, "key-2", A.name)
        queue.study_analysed(s, s.execute(select(Study)).scalar_one())
    with db.session() as s:
        assert s.get(Job, job_id).state == JobState.DONE
        assert s.execute(select(Study.state)).scalar_one() == StudyState.DONE


def test_a_claim_is_held_by_one_node_under_a_lease_and_recorded(db: Database) -> None:
    job_id = _queued_job(db)
    assert queue.claim_job(db, A) == job_id
    assert queue.claim_job(db, B) is None  # held
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.holder == "node-a" and job.lease_until > utcnow() + dt.timedelta(seconds=25)
        claims = s.execute(select(ClaimRecord)).scalars().all()
    assert [(c.kind, c.row_id, c.holder, c.released_at) for c in claims] == \
        [("job", job_id, "node-a", None)]


def test_only_expired_leases_go_back_and_a_lost_lease_records_nothing(db: Database) -> None:
    j1, j2 = _queued_job(db, "1.2.1"), _queued_job(db, "1.2.2")
    assert queue.claim_job(db, A) == j1
    assert queue.claim_job(db, B) == j2
    # node-b starts again elsewhere, or any node beats: node-a's live claim is not touched
    assert queue.reap_expired(db) == {}
    assert queue.release_holder(db, "node-b") == {"job": 1}
    with db.session() as s:
        assert s.get(Job, j1).state == JobState.RUNNING
        s.get(Job, j1).lease_until = utcnow() - dt.timedelta(seconds=1)  # node-a went silent
    assert queue.reap_expired(db) == {"job": 1}
    with db.session() as s:
        job = s.get(Job, j1)
        assert (job.state, job.holder, job.attempts) == (JobState.QUEUED, None, 1)  # counted
    assert queue.claim_job(db, B) == j1
    # node-a comes back: its checkpoint sees the loss, its finish records nothing
    assert "lease lost" in queue.job_verdict(db, j1, "key-1.2.1", "node-a")
    with db.session() as s:
        assert not queue.finish_job(s, j1, "key-1.2.1", "node-a")
    assert queue.requeue_job(db, j1, "x", "node-a") is None
    with db.session() as s:
        assert queue.finish_job(s, j1, "key-1.2.1", "node-b")
        history = s.execute(select(ClaimRecord.holder, ClaimRecord.outcome)
                            .where(ClaimRecord.row_id == j1, ClaimRecord.kind == "job")
                            .order_by(ClaimRecord.id)).all()
    assert history == [("node-a", "expired"), ("node-b", "done")]


def test_renewal_keeps_a_lease_alive(db: Database) -> None:
    job_id = _queued_job(db)
    short = Holder("node-a", 2)
    assert queue.claim_job(db, short) == job_id
    with db.session() as s:
        before = s.get(Job, job_id).lease_until
    assert queue.renew_leases(db, Holder("node-a", 60)) == 1
    with db.session() as s:
        assert s.get(Job, job_id).lease_until > before + dt.timedelta(seconds=50)
    assert queue.reap_expired(db, utcnow() + dt.timedelta(seconds=10)) == {}


def test_delivery_claim_finish_and_lost_lease(db: Database) -> None:
    d_id = _delivery(db)
    assert queue.claim_delivery(db, A) == d_id
    assert queue.claim_delivery(db, B) is None
    ok = {"tid1500": queue.KindOutcome(True, False, "0x0000", "")}
    with db.session() as s:
        assert queue.finish_delivery(s, d_id, "node-b", ok, True, None, "") is None  # not its
        assert queue.finish_delivery(s, d_id, "node-a", ok, True, None, "") == "done"
    with db.session() as s:
        d = s.get(Delivery, d_id)
        assert (d.state, d.holder) == (DeliveryState.DONE, None)


def test_a_worker_restart_takes_only_its_own_jobs_not_another_nodes(db: Database) -> None:
    """The bug of issue 19: Worker.recover() re-queued every running job at each start."""
    from node.store import Spool
    from node.worker import AnalysisWorker, ReportOptions

    j1, j2 = _queued_job(db, "1.2.1"), _queued_job(db, "1.2.2")
    assert queue.claim_job(db, A) == j1
    assert queue.claim_job(db, B) == j2

    class NoAnalyser:
        model = None

    worker = AnalysisWorker(db, Spool(db.url.split("///")[1] + ".spool"), NoAnalyser(),
                            lambda *a, **k: [], ReportOptions("x", 1, 2, 0.5, "t"), [],
                            holder=B)
    assert worker.recover() == 1
    with db.session() as s:
        assert s.get(Job, j1).state == JobState.RUNNING and s.get(Job, j1).holder == "node-a"
        assert s.get(Job, j2).state == JobState.QUEUED


def test_node_registry_heartbeat_and_unique_names(db: Database) -> None:
    a = Membership(db, A, ["receive", "deliver"], 1.0, "0.1")
    a.join()
    with db.session() as s:
        s.get(NodeRecord, "node-a").heartbeat_at = utcnow() - dt.timedelta(seconds=5)
    a.beat()
    twin = Membership(db, A, ["analyse"], 1.0, "0.1")
    twin.host = "elsewhere"
    with pytest.raises(StartupRefused, match="names must be unique"):
        twin.join()
    job_id = _queued_job(db)
    assert queue.claim_job(db, A) == job_id
    with db.session() as s:
        nodes = describe_nodes(s)
    assert [(n["name"], n["roles"], n["state"], n["holds"]) for n in nodes] == \
        [("node-a", ["receive", "deliver"], "running", {"job": 1})]
    assert nodes[0]["heartbeat_age_s"] < 2
    a.leave()
    with db.session() as s:
        assert s.get(NodeRecord, "node-a").state == "stopped"
    twin.join()  # a stopped node's name is free again; recover() releases its old claims
    assert queue.release_holder(db, A.name) == {"job": 1}
    with db.session() as s:
        assert s.get(Job, job_id).state == JobState.QUEUED


def test_shared_storage_identity_is_checked(db: Database, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    sid = check_shared_storage(db, shared)
    assert (shared / STORAGE_MARKER).read_text().strip() == sid
    assert check_shared_storage(db, shared) == sid  # a second node on the same mount
    with pytest.raises(StartupRefused, match="not the storage this queue's database uses"):
        check_shared_storage(db, tmp_path / "local-empty")  # the mount is missing
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / STORAGE_MARKER).write_text("something-else\n")
    with pytest.raises(StartupRefused, match="found storage id something-else"):
        check_shared_storage(db, tmp_path / "other")


def test_no_module_but_the_queue_writes_a_state_column() -> None:
    """Studies, jobs, deliveries, their kinds and shadow runs change state in node/queue.py
    only (node/cluster.py writes the node registry's own state)."""
    models = "Study|Job|Delivery|DeliveryKind|ResultKind|ShadowRun"
    patterns = [re.compile(r"\.state\s*(,[^=]*)?=(?!=)"),
                re.compile(r"values\([^)]*\bstate\s*="),
                re.compile(rf"\b({models})\([^)]*\bstate\s*=")]
    offenders = []
    for path in sorted((REPO / "node").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in ("node/queue.py", "node/db.py", "node/cluster.py") or "/migrations/" in rel:
            continue
        text = path.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in patterns):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []


def test_serve_refuses_unknown_roles_and_config_checks_cluster_keys(tmp_path: Path) -> None:
    import subprocess
    import sys

    from node.config import ConfigError, parse_settings
    from tests.netutil import write_config

    config = write_config(tmp_path / "c.toml", {"node": {"data_dir": str(tmp_path / "d")}})
    out = subprocess.run([sys.executable, "-m", "node", "serve", "--roles", "receive,gpu",
                          "--config", str(config)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--roles: gpu" in out.stderr
    with pytest.raises(ConfigError, match="cluster.roles"):
        parse_settings({"cluster": {"roles": ["analyze"]}}, tmp_path)
    with pytest.raises(ConfigError, match="cluster.lease_seconds"):
        parse_settings({"cluster": {"lease_seconds": 5, "heartbeat_seconds": 5}}, tmp_path)
    s = parse_settings({"cluster": {"roles": ["analyse"]}}, tmp_path)
    assert s.cluster.roles == ["analyse"] and s.database.migrate == "auto"


def test_status_page_and_metrics_show_every_node(db: Database) -> None:
    from prometheus_client import generate_latest

    from node import metrics, status_page

    Membership(db, A, ["analyse"], 1.0, "0.1").join()
    Membership(db, B, ["receive", "deliver"], 1.0, "0.1").join()
    job_id = _queued_job(db)
    assert queue.claim_job(db, A) == job_id
    page = status_page.render(db, ae_title="MAMMO_AI", version="t")
    nodes = page[page.index('id="nodes"'):]
    nodes = nodes[:nodes.index("</table>")]
    assert "node-a</td><td>analyse</td>" in nodes and "1 job</td>" in nodes
    assert "node-b</td><td>receive,deliver</td>" in nodes and "nothing</td>" in nodes
    metrics.bind(db, Path(db.url.split("///")[1]).parent, [])
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'mammo_claims_held{kind="job",node="node-a"} 1.0' in text
    assert 'mammo_node_heartbeat_age_seconds{node="node-b",state="running"}' in text
