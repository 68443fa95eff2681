"""Fixtures shared by the test files: a fresh SQLite queue, a real dcmtk storescp destination,
the node as a process (stopped at teardown, even when the test fails) and the node in-process
(the real service object, with an analyser of the caller's choice)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from node.config import Settings, parse_settings
from node.db import Database
from tests.fakeanalyser import FakeAnalyser
from tests.netutil import NodeProcess, StoreSCP, free_port

if TYPE_CHECKING:
    from node.service import Node


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """A SQLite queue with the current schema, in the test's own folder."""
    database = Database(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    database.create_schema()
    yield database
    database.dispose()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """dcmtk storescp (AE ``DEST``) writing what it receives into ``tmp_path/dest``."""
    scp = StoreSCP(tmp_path / "dest").start()
    yield scp
    scp.stop()


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """``node_process(name, destinations, **sections)``: a started ``python -m node serve``
    under ``tmp_path/name``; every one started is stopped at teardown."""
    started: list[NodeProcess] = []

    def start(name: str = "node", destinations: list[dict[str, object]] = (),
              **sections: dict[str, object]) -> NodeProcess:
        proc = NodeProcess(tmp_path / name, destinations, **sections)
        started.append(proc)
        return proc.start()

    yield start
    for proc in reversed(started):
        proc.stop()


def inprocess_settings(root: Path, destinations: list[dict[str, object]] = (),
                       **sections: dict[str, object]) -> Settings:
    """Settings of a node listening on a free port with its data under ``root``: short
    completion and backoff times (the test's own values win)."""
    raw: dict[str, object] = {
        "node": {"ae_title": "MAMMO_AI", "host": "127.0.0.1", "port": free_port(),
                 "data_dir": str(root / "data"), "min_free_mb": 1},
        "study": {"stable_seconds": 1, "check_interval_seconds": 0.2},
        "delivery": {"backoff_initial_seconds": 0.5, "backoff_max_seconds": 1},
        "http": {"enabled": False},
        "analysis": {"preanalysis_workers": 0},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)  # type: ignore[attr-defined]
    raw["destinations"] = list(destinations)
    return parse_settings(raw, base_dir=root)


@pytest.fixture
def inprocess_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """``inprocess_node(analyser, destinations, **sections)``: the real service (receiver,
    completion, worker, report builders, deliverer) started in this process with the given
    analyser (a :class:`tests.fakeanalyser.FakeAnalyser` by default); stopped at teardown."""
    from node.service import Node

    started: list[Node] = []

    def start(analyser: object | None = None, destinations: list[dict[str, object]] = (),
              **sections: dict[str, object]) -> Node:
        settings = inprocess_settings(tmp_path / f"node{len(started)}", destinations, **sections)
        node = Node(settings, analyser=analyser or FakeAnalyser())  # type: ignore[arg-type]
        node.start()  # listening when it returns (the server socket is bound in start())
        started.append(node)
        return node

    yield start
    for node in reversed(started):
        if not node._stopped.is_set():
            node.stop(5)
