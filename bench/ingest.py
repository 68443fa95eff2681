"""Ingest: the node's receiver vs dcmtk storescp, same files, same dcmtk storescu.

    .venv/bin/python -m bench --only ingest          (part of the suite)
    .venv/bin/python -m bench.ingest [--studies 4] [--format big] [--syntax raw] [--repeats 3]

Alternates runs of ``storescu -> storescp`` and ``storescu -> node receiver`` (a separate process
running exactly the node's Receiver: chunked receive, header checks, fsync + rename, SQLite WAL
commit before the 0x0000). Reports median seconds, MB/s, images/s, the node/dcmtk throughput
ratio and the peak RSS (VmHWM) of each receiving process. storescp writes without fsync; the node
fsyncs every instance and its directory before acknowledging. The native durable ceiling is
``storescp+fsync``: the same storescp with bench/native/fsync_on_close.c preloaded (each file it
saves is fsynced, and its directory, before the C-STORE answer), built with ``cc`` when one is
installed (else that column is left out). ``storescp+fsync+sha256`` also takes the SHA-256 of
each file before its fsync (the digest the node records for duplicate detection): a native
receiver that keeps both of the node's promises, so node/that ratio is Python against C++ for
the same work (the node's SQLite commit aside). TCP_NODELAY=1 is set for dcmtk (it
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
from node.config import NodeSettings
from node.db import Database
from node.receive import ReceiveContext, Receiver
from node.store import Spool
root = Path(sys.argv[1]); port = int(sys.argv[2]); pdu = int(sys.argv[3])
spool = Spool(root); db = Database(f"sqlite:///{root / 'node.sqlite3'}"); db.create_schema()
# The node's [node] defaults (admission, read deadlines), on loopback with this PDU size.
node = NodeSettings(host="127.0.0.1", port=port, max_pdu_size=pdu, min_free_mb=64)
r = Receiver(node, ReceiveContext(spool, db))
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
    durable_ratio: float | None = None  # node / (storescp + fsync per file), likewise
    hashed_ratio: float | None = None  # node / (storescp + SHA-256 + fsync per file), likewise
    base_ratios: dict[str, float] | None = None  # node-base / storescp, storescp+fsync, node
    cpu_ms_per_image: dict[str, float] | None = None  # receiver CPU (user+sys), median run
    best_seconds: dict[str, float] | None = None  # fastest run per server ("at its best")

    def rate(self, server: str) -> tuple[float, float]:
        s = self.seconds[server]
        return self.mb / s, self.images / s


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"  # installed in the venv
    return str(beside) if beside.exists() else shutil.which("py-spy")


def fsync_shim(work: Path) -> Path | None:
    """bench/native/fsync_on_close.c built into ``work`` (None without a C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = work / "fsync_on_close.so"
    if not out.exists():
        res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out),
                              str(REPO / "bench/native/fsync_on_close.c"), "-ldl"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            return None
    return out


def run_once(kind: str, files: list[Path], work: Path, pdu: int = PDU,
             profile: Path | None = None, baseline: Path | None = None,
             warm: Path | None = None) -> tuple[float, float, float]:
    """One storescu association with every file; (seconds, server peak RSS MiB, server CPU
    seconds during the transfer: the receive cost, start-up excluded). ``profile``:
    py-spy samples the node's receiver during the transfer (collapsed stacks written there).
    ``kind`` "node-base" runs the node's receiver from the source tree ``baseline``. ``warm``:
    one file sent in an association of its own before the timed one (lazy imports, database
    mappers, first-use caches: what a running node has paid long before), not timed."""
    port = free_port()
    out = work / f"{kind}-{port}"
    env = dict(os.environ, TCP_NODELAY="1")
    if kind.startswith("storescp"):
        out.mkdir(parents=True)
        server_env = dict(env)
        if kind in ("storescp+fsync", "storescp+fsync+sha256"):
            shim = fsync_shim(work)
            assert shim is not None
            server_env["LD_PRELOAD"] = str(shim)
            if kind.endswith("+sha256"):  # the node's digest too (bench/native/fsync_on_close.c)
                server_env["MAMMO_SHIM_SHA256"] = "1"
        server = subprocess.Popen(["storescp", "-aet", "MAMMO_AI", "-od", str(out), "+xa",
                                   "-pdu", str(PDU), str(port)], env=server_env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        tree = baseline if kind == "node-base" else REPO
        assert tree is not None, "node-base needs a baseline tree"
        server = subprocess.Popen([sys.executable, "-c", RECEIVER, str(out), str(port), str(pdu)],
                                  cwd=tree, env=dict(env, PYTHONPATH=str(tree)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spy = None
    try:
        wait_for_port(port, 60, server)
        if profile is not None and kind == "node":
            spy = subprocess.Popen([_py_spy() or "py-spy", "record", "-p",
                                    str(server.pid), "-f", "raw", "-r", "250", "--threads",
                                    "-o", str(profile)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
        if warm is not None:
            subprocess.run(["storescu", "-aec", "MAMMO_AI", "-pdu", str(PDU),
                            *storescu_args([warm]), "127.0.0.1", str(port), str(warm)],
                           check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        cpu0 = cpu_seconds(server.pid)
        t0 = time.perf_counter()
        subprocess.run(["storescu", "-aec", "MAMMO_AI", "-pdu", str(PDU),
                        *storescu_args(files), "127.0.0.1",
                        str(port), *map(str, files)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds(server.pid) - cpu0
        rss = peak_rss_mib(server.pid)
        if spy is not None:
            import signal

            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(60)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(out, ignore_errors=True)
    return seconds, rss, cpu


def _paired(runs: dict[str, list[tuple[float, float, float]]], fast: str,
            slow: str) -> float | None:
    """Median over the repeats of ``slow`` seconds / ``fast`` seconds (>1: ``fast`` faster)."""
    pairs = [d[0] / n[0] for n, d in zip(runs.get(fast, []), runs.get(slow, []), strict=False)]
    return statistics.median(pairs) if pairs else None


def compare(files: list[Path], work: Path, repeats: int, label: str, pdu: int = PDU,
            baseline: Path | None = None, warm: Path | None = None) -> IngestResult:
    """Alternating storescp / node (/ node-base) runs over ``files``; medians and the paired
    ratios (each node run against the dcmtk runs of the same repeat)."""
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} (dcmtk) is needed: apt-get install dcmtk")
    mb = sum(f.stat().st_size for f in files) / 1e6
    kinds = ["storescp", "node"] + (["node-base"] if baseline else []) + (
        ["storescp+fsync", "storescp+fsync+sha256"] if fsync_shim(work) else [])
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    run_once("node", files[:1], work, pdu)  # warm-up (imports, page cache)
    if baseline:
        run_once("node-base", files[:1], work, pdu, baseline=baseline)
    for i in range(repeats):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            runs[kind].append(run_once(kind, files, work, pdu, baseline=baseline, warm=warm))
    base = None
    if baseline:
        base = {k: r for k in ("storescp", "storescp+fsync", "node")
                if (r := _paired(runs, "node-base", k)) is not None}
    return IngestResult(
        label=label, images=len(files), mb=mb,
        seconds={k: statistics.median(r[0] for r in v) for k, v in runs.items()},
        best_seconds={k: min(r[0] for r in v) for k, v in runs.items()},
        peak_rss_mib={k: max(r[1] for r in v) for k, v in runs.items()},
        cpu_ms_per_image={k: 1000 * statistics.median(r[2] for r in v) / len(files)
                          for k, v in runs.items()},
        ratio=_paired(runs, "node", "storescp") or 0.0,
        durable_ratio=_paired(runs, "node", "storescp+fsync"),
        hashed_ratio=_paired(runs, "node", "storescp+fsync+sha256"),
        base_ratios=base,
    )


def profile_table(collapsed: Path, top: int = 18) -> list[str]:
    """Where the receiver's threads spend the transfer, from py-spy's collapsed stacks:
    inclusive and self share of the samples of the threads that did any work (idle waits in
    ``select``/``accept``/``wait`` of idle threads dominate otherwise and are left out)."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    idle = ("select", "accept", "wait (threading.py", "_wait_for_tstate_lock", "poll",
            "epoll_wait", "sleep", "_wait_readable")
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        if not frames or any(k in frames[-1] for k in idle):
            continue
        n = int(count)
        total += n
        names = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")"
                 if " (" in f else f for f in frames]
        for name in set(names):
            inclusive[name] = inclusive.get(name, 0) + n
        own[names[-1]] = own.get(names[-1], 0) + n
    rows = [f"busy samples: {total}", "", "| function (file) | inclusive % | self % |",
            "|---|---|---|"]
    for name, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(f"| `{name}` | {100 * n / max(1, total):.1f} | "
                    f"{100 * own.get(name, 0) / max(1, total):.1f} |")
    rows += ["", "| self-time leaders | self % |", "|---|---|"]
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(f"| `{name}` | {100 * n / max(1, total):.1f} |")
    return rows


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
    ap.add_argument("--profile", action="store_true",
                    help="after the comparison, one more node run sampled by py-spy: where "
                         "the receiver's time goes")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="also run the node's receiver from this source tree (e.g. a "
                         "`git worktree add /tmp/base <rev>`), alternating with the others")
    args = ap.parse_args()
    baseline = args.baseline.resolve() if args.baseline else None
    with tempfile.TemporaryDirectory(prefix="mammo-bench-") as tmp:
        files = build_files(Path(tmp), args.format, args.syntax, args.studies + 1)
        per_study = len(files) // (args.studies + 1)  # the last study only warms each receiver
        warm, files = files[-per_study], files[:-per_study]
        r = compare(files, Path(tmp), args.repeats, f"{args.format} {args.syntax}", args.pdu,
                    baseline, warm)
        prof = None
        if args.profile:
            if _py_spy() is None:
                raise SystemExit("--profile needs py-spy (pip install py-spy)")
            collapsed = Path(tmp) / "ingest.collapsed"
            run_once("node", files, Path(tmp), args.pdu, profile=collapsed, warm=warm)
            prof = profile_table(collapsed)
    print(f"ingest {r.label}: {r.images} images, {r.mb:.1f} MB, {args.repeats} alternating runs"
          " (each receiver warmed by one other image first)")
    for kind in r.seconds:
        mbs, ips = r.rate(kind)
        print(f"{kind:<21} {r.seconds[kind]:7.2f} s {mbs:8.1f} MB/s {ips:7.1f} img/s "
              f"peak RSS {r.peak_rss_mib[kind]:7.1f} MiB"
              + (f" CPU {r.cpu_ms_per_image[kind]:6.1f} ms/img" if r.cpu_ms_per_image else "")
              + (f" best {r.best_seconds[kind]:5.2f} s" if r.best_seconds else ""))
    print(f"node/dcmtk throughput ratio: {r.ratio:.2f}")
    if r.best_seconds:  # the "storescp at its best": fastest run against fastest run
        print("best run against best run: " + ", ".join(
            f"node/{k} {r.best_seconds[k] / r.best_seconds['node']:.2f}"
            for k in r.best_seconds if k.startswith("storescp")))
    if r.durable_ratio is not None:
        print(f"node/(dcmtk + fsync per file) throughput ratio: {r.durable_ratio:.2f}")
    if r.hashed_ratio is not None:
        print(f"node/(dcmtk + SHA-256 + fsync per file) throughput ratio: {r.hashed_ratio:.2f}")
    if r.base_ratios:
        print(f"baseline tree: {baseline}")
        for k, v in r.base_ratios.items():
            print(f"node-base/{k} throughput ratio: {v:.2f}")
        print(f"node/node-base throughput ratio: {1 / r.base_ratios['node']:.2f}")
    print(f"load average: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f}")
    if prof:
        print("\n".join(["", "Node receiver profile (py-spy, one more run):", *prof]))


if __name__ == "__main__":
    main()
