"""A private PostgreSQL server for the tests: Debian's ``postgresql`` binaries (initdb, pg_ctl)
run as the current user in a temporary folder, on a loopback port and a private socket folder.
PostgreSQL refuses to run as root: as root (CI containers) the server runs as the ``postgres``
system user that Debian's package creates (``runuser``), in a folder it owns.

Missing binaries (or psycopg): the test FAILS when ``CI`` is set (scripts/test installs
postgresql) and is skipped otherwise, with the reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.netutil import free_port


def pg_bin_dir() -> Path | None:
    """Where initdb/pg_ctl are: PATH, else the newest /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parents[1].name)
                      if Path(p).parents[1].name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def require_postgres() -> Path:
    bin_dir = pg_bin_dir()
    missing = None
    if bin_dir is None:
        missing = "PostgreSQL server binaries (initdb, pg_ctl) not found (Debian: postgresql)"
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            missing = "psycopg is not installed (pip install -e '.[test]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing + " (CI is set, so this is an error)")
        pytest.skip(missing)
    return bin_dir  # type: ignore[return-value]


class PostgresServer:
    """initdb + pg_ctl start in ``root``; :meth:`create_database` gives a fresh database URL."""

    def __init__(self) -> None:
        self.bin = require_postgres()
        self.run_as: list[str] = []
        # The system's temp folder, which the postgres user can enter (a test's tmp_path, where
        # the node's data_dir lives, may not be).
        system_tmp = os.environ.get("TMPDIR") or "/tmp"
        self.root = Path(tempfile.mkdtemp(prefix="mammo-pg-", dir=system_tmp))
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root and there is no 'postgres' user to run the "
                            "PostgreSQL server as (Debian's postgresql package creates it)")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.run_as = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]
        self.data = self.root / "pgdata"
        self.sockets = self.root / "sock"
        self.port = free_port()
        self.user = "mammo"

    def _run(self, *args: str, timeout: float = 120) -> None:
        env = dict(os.environ, LC_ALL="C", LANG="C")
        out = subprocess.run([*self.run_as, str(self.bin / args[0]), *args[1:]],
                             capture_output=True, cwd=self.root,
                             text=True, timeout=timeout, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stdout}{out.stderr}")

    def start(self) -> PostgresServer:
        if self.run_as:
            subprocess.run([*self.run_as, "mkdir", "-p", str(self.sockets)], check=True)
        else:
            self.sockets.mkdir(parents=True, exist_ok=True)
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust",
                  "-E", "UTF8", "--no-instructions")
        opts = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                "-c max_connections=200 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"),
                  "-o", opts, "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URL (psycopg 3, over loopback TCP)."""
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user,
                                     dbname="postgres", autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"
