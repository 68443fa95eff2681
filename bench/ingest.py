"""Ingest benchmark: the node's receiver vs dcmtk storescp, same files, same dcmtk storescu.

    .venv/bin/python bench/ingest.py [--images 16] [--rows 4096 --cols 3328] [--repeats 3]

Builds full-field MG images (12 bits stored, Explicit VR LE), then alternates runs of
``storescu -> storescp`` and ``storescu -> node receiver`` (a separate process running exactly
the node's Receiver: chunked receive, header checks, fsync + rename, SQLite WAL commit before the
0x0000). Prints median seconds, MB/s, images/s, the node/dcmtk time ratio and peak RSS of each
server. TCP_NODELAY=1 is set for dcmtk (it otherwise leaves Nagle on and stalls ~40 ms/C-STORE).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.testdata import mg_dataset, uid_from  # noqa: E402
from tests.netutil import free_port, wait_for_port  # noqa: E402

RECEIVER = """
import sys, signal, threading
from pathlib import Path
from node.db import Database
from node.receive import Receiver
from node.store import Spool
root = Path(sys.argv[1]); port = int(sys.argv[2])
spool = Spool(root); db = Database(f"sqlite:///{root / 'node.sqlite3'}"); db.create_schema()
r = Receiver(ae_title="MAMMO_AI", host="127.0.0.1", port=port, spool=spool, db=db,
             allowed_calling_aets=[], max_pdu_size=131072, max_associations=8,
             network_timeout=60, min_free_mb=64)
r.start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
r.stop()
"""


def make_files(out: Path, n: int, rows: int, cols: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16)
    files = []
    for i in range(n):
        study = uid_from("bench", str(i // 4))
        lat, view = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")][i % 4]
        ds = mg_dataset(np.roll(base, i, axis=1), patient_id=f"BENCH{i // 4}", study_uid=study,
                        sop_uid=uid_from("bench", str(i)), laterality=lat, view=view,
                        spacing_mm=0.07, bits_stored=12)
        path = out / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_once(kind: str, files: list[Path], work: Path) -> tuple[float, float]:
    port = free_port()
    out = work / f"{kind}-{port}"
    env = dict(os.environ, TCP_NODELAY="1")
    if kind == "storescp":
        out.mkdir(parents=True)
        server = subprocess.Popen(["storescp", "-aet", "MAMMO_AI", "-od", str(out),
                                   "-pdu", "131072", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        server = subprocess.Popen([sys.executable, "-c", RECEIVER, str(out), str(port)],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 60, server)
        t0 = time.perf_counter()
        subprocess.run(["storescu", "-aec", "MAMMO_AI", "-pdu", "131072", "127.0.0.1",
                        str(port), *map(str, files)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        rss = peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(out, ignore_errors=True)
    return seconds, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=3328)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} (dcmtk) is needed: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="mammo-bench-") as tmp:
        work = Path(tmp)
        files = make_files(work / "files", args.images, args.rows, args.cols)
        mb = sum(f.stat().st_size for f in files) / 1e6
        results: dict[str, list[tuple[float, float]]] = {"storescp": [], "node": []}
        run_once("node", files[:2], work)  # warm-up (imports, page cache)
        for _ in range(args.repeats):
            for kind in ("storescp", "node"):
                results[kind].append(run_once(kind, files, work))
    print(f"ingest: {args.images} images {args.rows}x{args.cols} uint16, {mb:.1f} MB, "
          f"{args.repeats} alternating runs, medians; machine: {os.cpu_count()} CPUs")
    print(f"{'server':<10} {'s':>7} {'MB/s':>8} {'img/s':>7} {'peak RSS MiB':>13}")
    med = {}
    for kind, runs in results.items():
        s = statistics.median(r[0] for r in runs)
        rss = max(r[1] for r in runs)
        med[kind] = s
        print(f"{kind:<10} {s:7.2f} {mb / s:8.1f} {args.images / s:7.1f} {rss:13.1f}")
    ratios = [n[0] / d[0] for n, d in zip(results["node"], results["storescp"], strict=True)]
    print(f"node/dcmtk time ratio: {statistics.median(ratios):.2f} (>1 = node slower); "
          f"throughput ratio node/dcmtk: {med['storescp'] / med['node']:.2f}")


if __name__ == "__main__":
    main()
