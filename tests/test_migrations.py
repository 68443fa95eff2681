"""Schema migrations (node/migrations, node/migrate.py, `mammo-node db upgrade`)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select

from node import migrate, queue
from node.db import Base, Database, Delivery, Job, Study
from tests.netutil import write_config

REPO = Path(__file__).resolve().parents[1]
OLD_SCHEMA = REPO / "tests" / "data" / "schema-integrate.sql"


def _old_database(path: Path) -> Path:
    """A database made by the release before migrations (its SQL dump in tests/data)."""
    con = sqlite3.connect(path)
    con.executescript(OLD_SCHEMA.read_text(encoding="utf-8"))
    con.commit()
    con.close()
    return path


def _schema(engine) -> dict:  # type: ignore[no-untyped-def]
    insp = inspect(engine)
    out = {}
    for table in insp.get_table_names():
        if table == "alembic_version":
            continue
        out[table] = ({c["name"]: (str(c["type"]), c["nullable"])
                       for c in insp.get_columns(table)},
                      sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                             for i in insp.get_indexes(table)))
    return out


def test_the_revisions_build_exactly_the_models_schema(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'replayed.sqlite3'}")
    assert migrate.upgrade(db, replay=True) == (None, migrate.head_revision())
    models = create_engine(f"sqlite:///{tmp_path / 'models.sqlite3'}")
    Base.metadata.create_all(models)
    assert _schema(db.engine) == _schema(models)


def test_a_database_of_the_release_before_migrations_is_upgraded(tmp_path: Path) -> None:
    path = _old_database(tmp_path / "node.sqlite3")
    db = Database(f"sqlite:///{path}")
    assert migrate.current_revision(db) is None
    with pytest.raises(migrate.SchemaTooOld, match="mammo-node db upgrade"):
        migrate.require_current(db)  # [database] migrate = "off"
    assert migrate.upgrade(db) == (None, migrate.head_revision())
    migrate.require_current(db)
    assert migrate.upgrade(db)[0] == migrate.head_revision()  # idempotent
    with db.session() as s:  # the data is kept
        studies = dict(s.execute(select(Study.study_uid, Study.state)).all())
        job = s.execute(select(Job).where(Job.state == "running")).scalar_one()
        delivery = s.execute(select(Delivery)).scalar_one()
    assert studies == {"1.2.826.0.1.3680043.10.1919.1": "analysing",
                       "1.2.826.0.1.3680043.10.1919.2": "done"}
    assert job.holder is None and job.lease_until is None
    assert (delivery.state, delivery.holder) == ("sending", None)
    # The older node's claims have no lease: the first node to beat puts them back.
    assert queue.reap_expired(db) == {"job": 1, "delivery": 1}
    with db.session() as s:
        assert s.get(Job, job.id).state == "queued"
        assert s.execute(select(Study.state).where(
            Study.study_uid == "1.2.826.0.1.3680043.10.1919.1")).scalar_one() == "complete"
    models = create_engine(f"sqlite:///{tmp_path / 'models.sqlite3'}")
    Base.metadata.create_all(models)
    upgraded, fresh = _schema(db.engine), _schema(models)
    assert set(upgraded) == set(fresh)
    for table in fresh:  # same columns (types), same indexes
        assert {k: v[0] for k, v in upgraded[table][0].items()} == \
            {k: v[0] for k, v in fresh[table][0].items()}, table
        assert upgraded[table][1] == fresh[table][1], table


def test_db_upgrade_and_current_commands(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    _old_database(data / "node.sqlite3")
    config = write_config(tmp_path / "c.toml", {"node": {"data_dir": str(data)}})

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "node", "db", *args, "--config",
                               str(config)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    out = cli("current")
    assert out.returncode == 1 and "revision none" in out.stdout and "db upgrade" in out.stdout
    out = cli("upgrade")
    assert out.returncode == 0, out.stderr
    assert f"none -> {migrate.head_revision()}" in out.stdout
    out = cli("current")
    assert out.returncode == 0 and f"revision {migrate.head_revision()}" in out.stdout


def test_the_alembic_environment_without_a_database_says_so() -> None:
    """The alembic command line with neither a connection nor sqlalchemy.url: a clear error,
    not SQLAlchemy's failure on create_engine(None) (found by mypy, issue 20)."""
    from alembic import command

    with pytest.raises(RuntimeError, match="sqlalchemy.url"):
        command.upgrade(migrate.alembic_config(), "head")
