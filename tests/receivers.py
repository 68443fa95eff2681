"""An in-process :class:`node.receive.Receiver` on 127.0.0.1 for tests, built the way the node
builds its own: from a checked ``[node]`` section and a :class:`ReceiveContext`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from node.config import NodeSettings, StudySettings
from node.db import Database
from node.receive import ReceiveContext, Receiver, StoredInstance
from node.store import Spool
from tests.netutil import free_port


def local_receiver(spool: Spool, db: Database, *, port: int | None = None,
                   on_stored: Callable[[StoredInstance], None] | None = None,
                   study: StudySettings | None = None, **node: Any) -> Receiver:
    """A receiver called MAMMO_AI on ``port`` (a free one by default); ``node`` overrides
    ``[node]`` keys (defaults here: any calling AE title, 30 s network timeout, 1 MiB free)."""
    section = NodeSettings(**{"ae_title": "MAMMO_AI", "host": "127.0.0.1",
                              "port": port or free_port(), "network_timeout": 30,
                              "min_free_mb": 1, **node})
    return Receiver(section, ReceiveContext(spool, db, on_stored=on_stored), study=study)
