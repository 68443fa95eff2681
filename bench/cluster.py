"""Scale-out: studies/hour with one analyser node vs two, on one PostgreSQL queue.

    .venv/bin/python -m bench.cluster [--studies 8] [--format small|tiny] [--rounds 2]
                                      [--out FILE.md]

Per run: a private PostgreSQL server (tests/pgserver.py), a fresh database and shared data
folder, one node with roles receive+deliver, and 1 or 2 nodes with the analyse role only, a
dcmtk storescp destination. Every study is received first (the receiver does not complete
studies by itself: four-view rule off, a long quiet timer), then the bench completes them all at
once: the figure is studies/hour from that moment to the last delivery acknowledged, read from
the database, i.e. the analysis + delivery capacity, not the sender's speed. ``small`` studies
are four 1914 x 2294 images (bench/studies.py); ``tiny`` the tests' small studies. The
baseline, in the same run, is one node with every role on SQLite (the single box of today's
main). The three topologies run in turn, ``--rounds`` times (a shared machine's
load drifts, and the very first run pays for cold caches); the table shows every round and the
best of each. Analysers on one machine split its cores (``OMP_NUM_THREADS`` = cores /
analysers), so on one box "two analysers" measures the queue's overhead, not more hardware; on
a site each analyser is its own box (or GPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _studies(work: Path, n: int, fmt: str) -> list[list[Path]]:
    if fmt == "tiny":
        from tests.smallstudies import small_study

        return [small_study(work / "in" / f"s{i:03d}", i, tag="bench-cluster")
                for i in range(n)]
    from bench.studies import StudyFactory

    factory = StudyFactory(fmt, "raw", tag="bench-cluster")
    factory.warm()
    return [factory.write_study(i, work / "in" / f"s{i:03d}") for i in range(n)]


def _node(work: Path, name: str, roles: list[str], url: str, shared: Path, dest):  # type: ignore[no-untyped-def]
    from tests.netutil import NodeProcess

    sections = {"node": {"data_dir": str(shared)},
                "cluster": {"node_name": name, "roles": roles},
                "study": {"stable_seconds": 3600, "complete_on_four_views": False},
                "log": {"file": str(work / name / "node.log"), "level": "INFO"}}
    if url:
        sections["database"] = {"url": url}
    node = NodeProcess(work / name, [dest.destination()], **sections)
    node.log_path = work / name / "node.log"
    return node


def _start_headless(node, threads: int) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from tests.netutil import wait_until

    node.stderr = open(node.workdir / "node.stderr", "ab")  # noqa: SIM115
    node.proc = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(node.config)], cwd=REPO,
        # the machine's cores split between the analysers (torch and OpenCV read these)
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
                 MKL_NUM_THREADS=str(threads)), stdout=node.stderr,
        stderr=subprocess.STDOUT)
    wait_until(lambda: "node.started" in node.log(), 300, 0.5, "analyser started")


def run(work: Path, analysers: int, studies: list[list[Path]], pg) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(seconds from the first C-STORE to the last delivery, studies/hour)."""
    from sqlalchemy import func, select

    from node.completion import complete_ready_studies
    from node.db import Database, Delivery, utcnow
    from tests.netutil import StoreSCP, storescu, wait_until

    work.mkdir(parents=True)
    dest = StoreSCP(work / "dest").start()
    url = pg.create_database(f"bench{analysers}_{work.name}") if analysers else ""
    shared = work / "shared"
    if analysers:
        receiver = _node(work, "recv", ["receive", "deliver"], url, shared, dest)
        workers = [_node(work, f"gpu-{i}", ["analyse"], url, shared, dest)
                   for i in range(analysers)]
    else:  # baseline: one box, every role, SQLite
        receiver = _node(work, "single", ["receive", "analyse", "deliver"], "", shared, dest)
        workers = []
    nodes = [receiver, *workers]
    try:
        receiver.start(timeout=300)
        for w in workers:
            _start_headless(w, max(1, (os.cpu_count() or 1) // len(workers)))
        db = Database(url or f"sqlite:///{shared / 'node.sqlite3'}")
        for s in studies:
            out = storescu(receiver.port, s)
            assert out.returncode == 0, out.stderr
        first = utcnow()  # every study received; all complete (and queued) now
        assert len(complete_ready_studies(db, 0, False)) == len(studies)

        def finished() -> bool:
            with db.session() as s:
                return s.execute(select(func.count()).select_from(Delivery)
                                 .where(Delivery.state == "done")).scalar() >= len(studies)

        wait_until(finished, 3600, 0.5, "every study delivered")
        with db.session() as s:
            last = s.execute(select(func.max(Delivery.sent_at))).scalar()
        db.dispose()
    finally:
        for n in nodes:
            n.stop()
        dest.stop()
    seconds = (last - first).total_seconds()
    return seconds, len(studies) / seconds * 3600


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    p.add_argument("--studies", type=int, default=8)
    p.add_argument("--format", choices=("small", "tiny"), default="small")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from tests.pgserver import PostgresServer

    pg = PostgresServer().start()
    labels = {0: "single node, all roles, SQLite (baseline)",
              1: "receive+deliver node + 1 analyse node, PostgreSQL",
              2: "receive+deliver node + 2 analyse nodes, PostgreSQL"}
    runs: dict[int, list[float]] = {k: [] for k in labels}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
            work = Path(tmp)
            studies = _studies(work, args.studies, args.format)
            for r in range(args.rounds):
                for analysers in labels:
                    t0 = time.perf_counter()
                    seconds, per_hour = run(work / f"r{r}-a{analysers}", analysers, studies, pg)
                    runs[analysers].append(seconds)
                    print(f"round {r + 1}: {labels[analysers]}: {args.studies} studies in "
                          f"{seconds:.1f} s = {per_hour:.0f} studies/h (run "
                          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        pg.stop()
    best = {k: min(v) for k, v in runs.items()}
    per_hour = {k: args.studies / s * 3600 for k, s in best.items()}
    lines = [f"# bench.cluster {dt.date.today()} ({args.studies} {args.format} four-view "
             f"studies, {args.rounds} rounds)", "",
             "| topology | seconds per round | best: studies/h | vs baseline |",
             "|---|---|---|---|"]
    lines += [f"| {labels[k]} | {', '.join(f'{s:.1f}' for s in runs[k])} | {per_hour[k]:.0f} | "
              f"{per_hour[k] / per_hour[0]:.2f} |" for k in labels]
    lines.append(f"\ntwo analysers vs one: {per_hour[2] / per_hour[1]:.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
