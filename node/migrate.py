"""Schema migrations (Alembic, node/migrations): ``mammo-node db upgrade``, and at start-up
when ``[database] migrate = "auto"``.

Revisions: 0001 is the schema of the release before migrations, applied idempotently (an older
node's database gets what it lacks, an empty one the whole schema); later revisions are plain
Alembic steps. On PostgreSQL the upgrade holds an advisory lock, so nodes starting together
migrate one after the other (the later ones find nothing to do).
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import TYPE_CHECKING

from sqlalchemy import inspect

from node.db import Base, Database
from node.log import event

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy import Connection

_LOCK_KEY = 1919_0019  # pg_advisory_lock key of the node's schema migrations
log = logging.getLogger("node.migrate")
# Alembic's own INFO lines (plugins at import, "Context impl ..." at every start) say nothing an
# admin needs; the node logs one schema.upgraded line when a revision was applied. Set before
# alembic is imported (its modules are imported where used, below).
logging.getLogger("alembic").setLevel(logging.WARNING)


def alembic_config(url: str = "") -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(files("node") / "migrations"))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def current_revision(db: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head", *, replay: bool = False
            ) -> tuple[str | None, str | None]:
    """Migrate the database to ``revision``; (revision before, revision after). ``replay``:
    run every revision even on an empty database (the test that they build the models')."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    cfg = alembic_config()
    with db.engine.connect() as conn:
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK_KEY})")
        try:
            before = MigrationContext.configure(conn).get_current_revision()
            cfg.attributes["connection"] = conn
            if not replay and revision == "head" and not inspect(conn).get_table_names():
                # An empty database: the models' schema, stamped at head (the same schema the
                # revisions build, tests/test_migrations.py checks; much faster to create).
                Base.metadata.create_all(conn)
                command.stamp(cfg, "head")
            else:
                command.upgrade(cfg, revision)
                if revision == "head":
                    _add_missing(conn)
            conn.commit()
            after = MigrationContext.configure(conn).get_current_revision()
        finally:
            if postgres:
                conn.rollback()
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK_KEY})")
                conn.commit()
    if before != after:
        event(log, "schema.upgraded", before=before or "none", after=after)
    return before, after


def _add_missing(conn: Connection) -> None:
    """A safety net after the revisions: columns and indexes the models have and the database
    lacks (a hand-repaired or partly restored database) are added, nullable with their scalar
    default, as the node did before migrations. Nothing is ever dropped or altered."""
    insp = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} " \
                  f"{column.type.compile(conn.dialect)}"
            default = getattr(column.default, "arg", None)
            if isinstance(default, bool | int | float | str):
                ddl += f" DEFAULT {_sql_literal(default, conn.dialect.name)}"
            conn.exec_driver_sql(ddl)
        for index in table.indexes:
            index.create(conn, checkfirst=True)
    conn.commit()


def _sql_literal(value: object, dialect: str) -> str:
    if isinstance(value, bool):
        if dialect == "postgresql":
            return "true" if value else "false"
        return "1" if value else "0"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


class SchemaTooOld(RuntimeError):
    pass


def require_current(db: Database) -> None:
    """Raise :class:`SchemaTooOld` unless the database is at this release's head revision."""
    current, head = current_revision(db), head_revision()
    if current != head:
        raise SchemaTooOld(f"the database schema is at revision {current or 'none'}, this "
                           f"release needs {head}: run `mammo-node db upgrade` (or set "
                           "[database] migrate = \"auto\")")
