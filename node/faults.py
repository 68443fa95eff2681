"""Fault injection for the crash-safety tests: SIGKILL the node at a named point.

``MAMMO_NODE_FAULTS="store.after_write:3,deliver.mid_send:1"`` kills the process (SIGKILL, no
clean-up of any kind) on the 3rd time the receiver passes ``store.after_write`` and on the 1st time
the deliverer passes ``deliver.mid_send``. Points:

* ``store.after_write``     instance durable in the spool, not yet recorded in the database
* ``store.before_ack``      recorded and committed, C-STORE response not yet sent
* ``analysis.running``      job claimed, analysis under way
* ``analysis.before_record`` one output kind's objects written to disk, not yet recorded
* ``deliver.mid_send``      association open, part of the objects sent
* ``deliver.before_record`` everything sent, delivery not yet marked done

Planted failures (not kills) for the per-kind isolation tests: ``build.tid1500``,
``build.mammo_cad``, ``build.sc``, ``build.gsps`` make :func:`fail` raise
:class:`InjectedFault` from the n-th build of that output kind on (every later one too), as a
builder bug would, e.g. ``MAMMO_NODE_FAULTS="build.sc:1"``.

Unset (production), :func:`hit` and :func:`fail` are one dictionary lookup on an empty dict.
"""

from __future__ import annotations

import os
import signal
import threading

KILL_POINTS = ("store.after_write", "store.before_ack", "analysis.running",
               "analysis.before_record", "deliver.mid_send", "deliver.before_record")
POINTS = KILL_POINTS  # the SIGKILL points (tests/test_crash.py kills at each)
FAIL_POINTS = ("build.tid1500", "build.mammo_cad", "build.sc", "build.gsps")
ALL_POINTS = KILL_POINTS + FAIL_POINTS
ENV = "MAMMO_NODE_FAULTS"


def _parse(spec: str) -> dict[str, int]:
    plan: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, n = part.partition(":")
        if name not in ALL_POINTS:
            raise ValueError(f"{ENV}: unknown fault point {name!r} "
                             f"(known: {', '.join(ALL_POINTS)})")
        plan[name] = int(n or 1)
    return plan


_PLAN: dict[str, int] = _parse(os.environ.get(ENV, ""))
_HITS: dict[str, int] = {}
_LOCK = threading.Lock()


class InjectedFault(RuntimeError):
    """Raised by :func:`fail` at a planted failure point."""


def fail(point: str) -> None:
    """Count a pass through ``point``; raise :class:`InjectedFault` from the planned pass on."""
    if point not in _PLAN:
        return
    with _LOCK:
        _HITS[point] = _HITS.get(point, 0) + 1
        planned = _HITS[point] >= _PLAN[point]
    if planned:
        raise InjectedFault(f"planted failure at {point} ({ENV})")


def hit(point: str) -> None:
    """Count a pass through ``point``; SIGKILL this process on the planned pass."""
    if point not in _PLAN:
        return
    with _LOCK:
        _HITS[point] = _HITS.get(point, 0) + 1
        if _HITS[point] == _PLAN[point]:
            os.kill(os.getpid(), signal.SIGKILL)
