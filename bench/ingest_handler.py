"""Where the C-STORE handler's time goes, per instance, without the network.

    .venv/bin/python -m bench.ingest_handler [--format small] [--studies 3] [--rounds 2]
                                             [--baseline TREE]

Runs the node's own ``Receiver.accept_file`` (the function the C-STORE handler calls once the
last fragment is in: header checks, fsync + rename, SQLite WAL commit) on copies of the bench
images, in a fresh process per round, and prints the median ms per stage: header checks
(``_check_header``), the durable write (``Spool.adopt``), the database part (``_store`` minus
``adopt``: the look-ups, the insert and the WAL commit) and the whole call, once in wall time and
once in the thread's CPU time. The first pass stores each file; the second sends the same files
again (the duplicate path). ``--baseline TREE`` runs the same probe from another source tree
(e.g. ``git worktree add /tmp/base <rev>``), alternating with this tree, so both are measured
under the same load. The wall-CPU gap of the database part is the wait for the WAL fsync.
The copies are written by ``shutil.copy`` (no writeback hints, unlike node.fastrecv), so
``adopt``'s fsync writes the whole file and costs more than in the real receive path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, shutil, statistics, sys, tempfile, time
from pathlib import Path
from pydicom import dcmread
from bench.studies import StudyFactory
from node.config import NodeSettings
from node.db import Database
from node.receive import ReceiveContext, Receiver
from node.store import Spool

fmt, studies = sys.argv[1], int(sys.argv[2])
work = Path(tempfile.mkdtemp(prefix="ingest-handler-"))
try:
    factory = StudyFactory(fmt, "raw", tag=f"handler-{fmt}")
    files = []
    for i in range(studies):
        files += factory.write_study(i, work / "files")
    root = work / "node"
    root.mkdir()
    spool = Spool(root)
    db = Database(f"sqlite:///{root / 'node.sqlite3'}")
    db.create_schema()
    r = Receiver(NodeSettings(host="127.0.0.1", port=11112, min_free_mb=64),
                 ReceiveContext(spool, db))
    times = {}

    def wrap(obj, name):
        orig = getattr(obj, name)

        def timed(*a, **k):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return orig(*a, **k)
            finally:
                times.setdefault(name, []).append(
                    ((time.perf_counter() - w) * 1000, (time.thread_time() - c) * 1000))
        setattr(obj, name, timed)

    wrap(r, "_check_header")
    wrap(r, "_store")
    wrap(spool, "adopt")
    total = []
    peer = {"peer_aet": "BENCH", "peer": "127.0.0.1"}
    (spool.root / "incoming").mkdir(exist_ok=True)
    for i, p in enumerate(files * 2):
        tmp = spool.root / "incoming" / f"probe-{i}"
        shutil.copy(p, tmp)
        ds = dcmread(p, stop_before_pixels=True)
        w, c = time.perf_counter(), time.thread_time()
        status = r.accept_file(tmp, peer, str(ds.SOPInstanceUID), str(ds.SOPClassUID))
        total.append(((time.perf_counter() - w) * 1000, (time.thread_time() - c) * 1000))
        assert status == 0, status
    n = len(files)

    def med(rows, k):
        return round(statistics.median(x[k] for x in rows), 2)
    db_part = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(times["_store"][:n], times["adopt"])]
    out = {}
    for k, label in ((0, "wall"), (1, "cpu")):
        out[label] = {"header": med(times["_check_header"][:n], k),
                      "adopt": med(times["adopt"], k), "database": med(db_part, k),
                      "accept_file": med(total[:n], k), "duplicate": med(total[n:], k)}
    print(json.dumps({"images": n, **out}))
finally:
    shutil.rmtree(work, ignore_errors=True)
"""

STAGES = ("header", "adopt", "database", "accept_file", "duplicate")


def probe(tree: Path, fmt: str, studies: int) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{REPO}")
    out = subprocess.run([sys.executable, "-c", PROBE, fmt, str(studies)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="small", choices=["big", "small", "tiny"])
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="also run the probe from this source tree, alternating")
    args = ap.parse_args()
    trees = {"node": REPO}
    if args.baseline is not None:
        trees["node-base"] = args.baseline.resolve()
    runs: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(probe(tree, args.format, args.studies))
    print(f"load average {os.getloadavg()}")
    print(f"{'':10s} {'':5s} " + " ".join(f"{s:>11s}" for s in STAGES))
    for name, rows in runs.items():
        for clock in ("wall", "cpu"):
            cells = [statistics.median(r[clock][s] for r in rows) for s in STAGES]
            print(f"{name:10s} {clock:5s} " + " ".join(f"{c:11.2f}" for c in cells))
    print("ms per instance, median of the rounds' medians; database = _store minus adopt")


if __name__ == "__main__":
    main()
