"""Send benchmark: the node's C-STORE transport sending one study's results (SR + 4 SC) to dcmtk
storescp, this tree against a baseline commit, in one run.

    .venv/bin/python -m bench.send [--baseline 667f167] [--repeats 5] [--pdus 16384,131072]

The TID 1500 SR and the four Grad-CAM Secondary Captures (RGB, long side 2048 px: ~10 MB each)
are built and written once by this tree's builders and spool. Each tree then sends them with its
own ``node.deliver.CStoreTransport`` (in a child process, ``PYTHONPATH`` = that tree, run from
outside the repositories so that the tree's ``node`` is the one imported): the SR in one call,
the four SCs in another, as the deliverer sends two kinds. storescp runs with its default PDU
(16 KiB) and with ``-pdu 131072``; the trees alternate, order reversed every other repeat.
Prints per-call wall ms (median, min) and the sending process's CPU ms, and the ratio to the
baseline. The baseline is checked out in a temporary ``git worktree`` (removed afterwards), or
given as a folder with ``--baseline-dir``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
from pathlib import Path
import node.deliver as d
from node.config import Destination
port, repeats, groups = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
t = d.CStoreTransport("MAMMO_AI", 131072, 60)
dest = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
out = {"module": d.__file__, "calls": {}}
for _ in range(repeats):
    for label, files in groups.items():
        w0, c0 = time.perf_counter(), time.process_time()
        r = t.send(dest, [Path(f) for f in files])
        w1, c1 = time.perf_counter(), time.process_time()
        if not r.ok:
            raise SystemExit(f"send failed: {r}")
        out["calls"].setdefault(label, []).append(((w1 - w0) * 1000, (c1 - c0) * 1000))
print(json.dumps(out))
"""


def _results(work: Path) -> dict[str, list[str]]:
    """SR + 4 SC of a four-view study with 3 ROIs per image, written by this tree's spool."""
    from bench.outputs import MODEL, study
    from node.reports import ReportContext, SeriesNumbers, build_reports
    from node.store import Spool

    analysis, sources = study(4096, 3328, 3)
    context = ReportContext(analysis_key="bench-send", created=dt.datetime(2026, 1, 1),
                            manufacturer="mammo-node", software_version="bench",
                            threshold=MODEL.threshold,
                            series=SeriesNumbers(tid1500=9901, sc=9902))
    spool = Spool(work / "spool")
    groups: dict[str, list[str]] = {}
    for kind in ("tid1500", "sc"):
        groups[kind] = [str(spool.root / spool.write_dataset(ds))
                        for ds in build_reports(analysis, sources, context, [kind])]
    return groups


class _StoreSCP:
    def __init__(self, out: Path, pdu: int) -> None:
        from tests.netutil import free_port, wait_for_port

        self.out, self.port = out, free_port()
        out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["storescp", "-aet", "PACS", "-pdu", str(pdu), "-od",
                                      str(out), "+xa", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        # (no TCP_NODELAY in its environment: as tests/netutil.StoreSCP and bench/harness)
        wait_for_port(self.port, 30, self.proc)

    def clear(self) -> None:
        for f in self.out.iterdir():
            f.unlink(missing_ok=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _run(tree: Path, port: int, repeats: int, groups: dict[str, list[str]]) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(port), str(repeats),
                          json.dumps(groups)], capture_output=True, text=True, timeout=600,
                         cwd=tempfile.gettempdir(), env=dict(os.environ, PYTHONPATH=str(tree)))
    if res.returncode != 0:
        raise RuntimeError(f"send child ({tree}) failed: {res.stderr[-1500:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if not out["module"].startswith(str(tree)):
        raise RuntimeError(f"the child imported {out['module']}, not {tree}'s node")
    return out["calls"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="667f167", help="git revision of the baseline")
    ap.add_argument("--baseline-dir", type=Path, help="a checked-out baseline tree instead")
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs per PDU size")
    ap.add_argument("--calls", type=int, default=2, help="sends of each kind per run")
    ap.add_argument("--pdus", default="16384,131072", help="storescp -pdu values")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-send-"))
    base, made = args.baseline_dir, None
    try:
        if base is None:
            made = base = work / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base),
                            args.baseline], check=True, capture_output=True)
        groups = _results(work)
        mb = sum(os.path.getsize(f) for f in groups["sc"]) / 1e6
        print(f"results: 1 SR ({os.path.getsize(groups['tid1500'][0]) / 1e3:.0f} kB), "
              f"{len(groups['sc'])} SC ({mb:.1f} MB); baseline {args.baseline_dir or args.baseline}"
              f"; load {os.getloadavg()[0]:.2f}")
        trees = {"this": REPO, "base": base}
        for pdu in (int(p) for p in args.pdus.split(",")):
            scp = _StoreSCP(work / f"dest-{pdu}", pdu)
            calls: dict[str, dict[str, list]] = {"this": {}, "base": {}}
            try:
                for r in range(args.repeats):
                    for name in (("this", "base") if r % 2 == 0 else ("base", "this")):
                        for label, v in _run(trees[name], scp.port, args.calls, groups).items():
                            calls[name].setdefault(label, []).extend(v)
                        scp.clear()
            finally:
                scp.stop()
            print(f"\nstorescp -pdu {pdu} ({args.repeats} x {args.calls} calls per tree; "
                  f"load {os.getloadavg()[0]:.2f})")
            print(f"{'kind':<8} {'base ms p50':>11} {'min':>7} {'cpu':>7} {'this ms p50':>11} "
                  f"{'min':>7} {'cpu':>7} {'ratio':>6} {'MB/s':>6}")
            for label in groups:
                b = calls["base"][label]
                t = calls["this"][label]
                bw, tw = statistics.median(x[0] for x in b), statistics.median(x[0] for x in t)
                size = sum(os.path.getsize(f) for f in groups[label]) / 1e6
                print(f"{label:<8} {bw:>11.1f} {min(x[0] for x in b):>7.1f} "
                      f"{statistics.median(x[1] for x in b):>7.1f} {tw:>11.1f} "
                      f"{min(x[0] for x in t):>7.1f} {statistics.median(x[1] for x in t):>7.1f} "
                      f"{tw / bw:>6.2f} {size / (tw / 1000):>6.0f}")
        print(f"\nload average {os.getloadavg()[0]:.2f} at {time.strftime('%H:%M:%S')}")
    finally:
        if made is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(made)],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
