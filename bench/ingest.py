"""Ingest: the node's receiver vs dcmtk storescp, same files, same dcmtk storescu.

    .venv/bin/python -m bench --only ingest          (part of the suite)
    .venv/bin/python -m bench.ingest [--studies 4] [--format big] [--syntax raw] [--repeats 3]

Alternates runs of ``storescu -> storescp`` and ``storescu -> node receiver`` (a separate process
running exactly the node's Receiver: chunked receive, header checks, fsync + rename, SQLite WAL
commit before the 0x0000). Reports median seconds, MB/s, images/s, the node/dcmtk throughput
ratio and the peak RSS (VmHWM) of each receiving process. storescp writes without fsync; the node
fsyncs every instance and its directory before acknowledging. TCP_NODELAY=1 is set for dcmtk (it
otherwise leaves Nagle on and stalls ~40 ms per C-STORE).
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
from dataclasses import dataclass
from pathlib import Path

from bench.proc import peak_rss_mib
from bench.studies import StudyFactory, storescu_args
from tests.netutil import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
PDU = 131072

RECEIVER = """
import sys, signal, threading
from pathlib import Path
from node.db import Database
from node.receive import Receiver
from node.store import Spool
root = Path(sys.argv[1]); port = int(sys.argv[2]); pdu = int(sys.argv[3])
spool = Spool(root); db = Database(f"sqlite:///{root / 'node.sqlite3'}"); db.create_schema()
kwargs = {}
try:  # the node's read deadlines and admission, where this version of the node has them
    from node.admission import Admission
    kwargs = dict(admission=Admission(max_associations=16, reserved=4, per_ip=8, per_ae=8),
                  acse_timeout=10, pdu_timeout=10, min_receive_rate=8 * 1024)
except ImportError:
    pass
r = Receiver(ae_title="MAMMO_AI", host="127.0.0.1", port=port, spool=spool, db=db,
             allowed_calling_aets=[], max_pdu_size=pdu, max_associations=8,
             network_timeout=60, min_free_mb=64, **kwargs)
r.start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
r.stop()
"""


@dataclass
class IngestResult:
    label: str
    images: int
    mb: float
    seconds: dict[str, float]  # median per server
    peak_rss_mib: dict[str, float]
    ratio: float  # node/dcmtk throughput, median of per-pair ratios (>1 = node faster)

    def rate(self, server: str) -> tuple[float, float]:
        s = self.seconds[server]
        return self.mb / s, self.images / s


def run_once(kind: str, files: list[Path], work: Path, pdu: int = PDU) -> tuple[float, float]:
    """One storescu association with every file; (seconds, server peak RSS MiB)."""
    port = free_port()
    out = work / f"{kind}-{port}"
    env = dict(os.environ, TCP_NODELAY="1")
    if kind == "storescp":
        out.mkdir(parents=True)
        server = subprocess.Popen(["storescp", "-aet", "MAMMO_AI", "-od", str(out), "+xa",
                                   "-pdu", str(PDU), str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        server = subprocess.Popen([sys.executable, "-c", RECEIVER, str(out), str(port), str(pdu)],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 60, server)
        t0 = time.perf_counter()
        subprocess.run(["storescu", "-aec", "MAMMO_AI", "-pdu", str(PDU),
                        *storescu_args(files), "127.0.0.1",
                        str(port), *map(str, files)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        rss = peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(out, ignore_errors=True)
    return seconds, rss


def compare(files: list[Path], work: Path, repeats: int, label: str, pdu: int = PDU
            ) -> IngestResult:
    """Alternating storescp / node runs over ``files``; medians and the paired ratio."""
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} (dcmtk) is needed: apt-get install dcmtk")
    mb = sum(f.stat().st_size for f in files) / 1e6
    runs: dict[str, list[tuple[float, float]]] = {"storescp": [], "node": []}
    run_once("node", files[:1], work, pdu)  # warm-up (imports, page cache)
    for _ in range(repeats):
        for kind in ("storescp", "node"):
            runs[kind].append(run_once(kind, files, work, pdu))
    ratios = [d[0] / n[0] for n, d in zip(runs["node"], runs["storescp"], strict=True)]
    return IngestResult(
        label=label, images=len(files), mb=mb,
        seconds={k: statistics.median(r[0] for r in v) for k, v in runs.items()},
        peak_rss_mib={k: max(r[1] for r in v) for k, v in runs.items()},
        ratio=statistics.median(ratios),
    )


def build_files(work: Path, fmt: str, syntax: str, studies: int) -> list[Path]:
    factory = StudyFactory(fmt, syntax, tag=f"ingest-{fmt}-{syntax}")
    files: list[Path] = []
    for i in range(studies):
        files += factory.write_study(i, work / f"files-{fmt}-{syntax}")
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--format", default="big", choices=["big", "small", "tiny"])
    ap.add_argument("--syntax", default="raw", choices=["raw", "j2k"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pdu", type=int, default=PDU, help="the node's max PDU size")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mammo-bench-") as tmp:
        files = build_files(Path(tmp), args.format, args.syntax, args.studies)
        r = compare(files, Path(tmp), args.repeats, f"{args.format} {args.syntax}", args.pdu)
    print(f"ingest {r.label}: {r.images} images, {r.mb:.1f} MB, {args.repeats} alternating runs")
    for kind in ("storescp", "node"):
        mbs, ips = r.rate(kind)
        print(f"{kind:<10} {r.seconds[kind]:7.2f} s {mbs:8.1f} MB/s {ips:7.1f} img/s "
              f"peak RSS {r.peak_rss_mib[kind]:7.1f} MiB")
    print(f"node/dcmtk throughput ratio: {r.ratio:.2f}")


if __name__ == "__main__":
    main()
