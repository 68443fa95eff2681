"""What the in-process tests read back from a running :class:`node.service.Node`: its jobs,
results and deliveries from its database, and C-STORE into it with dcmtk's storescu."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select

from node.db import Database, Delivery, Job, Result, ResultObject, Study
from node.service import Node
from tests.netutil import storescu, wait_until


def send(node: Node, files: list[Path]) -> None:
    """C-STORE ``files`` into the node over a real association (dcmtk storescu)."""
    run = storescu(node.settings.node.port, files, aet=node.settings.node.ae_title)
    assert run.returncode == 0, run.stdout + run.stderr


def jobs(node: Node, study_uid: str) -> list[tuple[str, int]]:
    """(state, attempts) of every job of the study, oldest first."""
    with node.db.session() as s:
        return [(j.state, j.attempts) for j in s.execute(
            select(Job).join(Study, Study.id == Job.study_id)
            .where(Study.study_uid == study_uid).order_by(Job.id)).scalars()]


def results(node: Node, study_uid: str) -> list[tuple[bool, int, float | None, int]]:
    """(current, roi_count, max_probability, object count) of every result of the study."""
    with node.db.session() as s:
        rows = s.execute(select(Result).join(Study, Study.id == Result.study_id)
                         .where(Study.study_uid == study_uid).order_by(Result.id)).scalars()
        return [(r.current, r.roi_count, r.max_probability, len(r.objects)) for r in rows]


def deliveries(node: Node) -> dict[str, tuple[str, int, str | None]]:
    """destination -> (state, attempts, last error) of the current result's delivery."""
    with node.db.session() as s:
        rows = s.execute(select(Delivery).join(Result, Result.id == Delivery.result_id)
                         .where(Result.current.is_(True)).order_by(Delivery.id)).scalars()
        return {d.destination: (d.state, d.attempts, d.last_error) for d in rows}


def wait_done(node: Node, study_uid: str, timeout: float = 60) -> None:
    """Until the study's last job finished (done or failed)."""
    wait_until(lambda: (j := jobs(node, study_uid)) and j[-1][0] in ("done", "failed"),
               timeout, 0.1, f"a finished job for {study_uid}")


def result_with_one_sc(db: Database, destination: str = "pacs") -> int:
    """A finished job's result holding one SC (relpath ``r/sc.dcm``), its delivery to
    ``destination`` due; returns the result's id."""
    with db.session() as s:
        study = Study(study_uid="1.2.3", state="complete")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, generation=1, input_key="k", state="done")
        s.add(job)
        s.flush()
        result = Result(study_id=study.id, job_id=job.id, analysis_key="a")
        s.add(result)
        s.flush()
        s.add(ResultObject(result_id=result.id, sop_class_uid=SecondaryCaptureImageStorage,
                           sop_uid="1.2.3.8", relpath="r/sc.dcm"))
        s.add(Delivery(result_id=result.id, destination=destination))
        return result.id
