"""CPU and wall milliseconds of the per-image work, this tree against a baseline, alternating.

    .venv/bin/python -m bench.perimage [--baseline main] [--rounds 3] [--repeats 4]
        [--format big] [--syntax raw] [--parallel 1] [--out FILE.md]

The per-image work is :meth:`node.analysis.pipeline.AnalysisPipeline.prepare_one`: read,
decode, preparation (grey levels, breast mask), calcification candidates, clusters, display
copy, ROI crops, i.e. what node.preanalysis runs for each stored instance. The four views of one
bench study (bench/studies.py) are written once; each tree (this one, and ``--baseline``
checked out in a temporary ``git worktree``) runs in its own process (``python -c`` in that
tree, this venv), the trees taking turns ``--rounds`` times, each process timing every view
``--repeats`` times after one warm-up pass. CPU is the process's CPU time (every thread:
OpenCV's pool, the decoder's), the figure the node's throughput on a busy machine rests on;
wall is what one image waits. ``--parallel 2`` runs two images at once in two threads (the
pipeline's per-image pool on 2 cores), where OpenCV's own threads compete with each other.
Each process also prints a digest of every cluster it found (centre, members, outline,
features, score), so the table says whether the trees agree. The load average is printed with
every process: on a shared machine read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from node.analysis.pipeline import AnalysisPipeline
from node.analysis.result import ImageInput
from node.config import ModelSettings
files, repeats, parallel = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if int(sys.argv[4]) > 0:
    import cv2
    cv2.setNumThreads(int(sys.argv[4]))
pipe = AnalysisPipeline(ModelSettings(device="cpu"), max_workers=1)
items = [ImageInput(Path(f), f"1.2.{i}", "") for i, f in enumerate(files)]

def one(item):
    t0 = time.perf_counter()
    ia, crops, clusters = pipe.prepare_one(item)[:3]
    return time.perf_counter() - t0, clusters

digest = hashlib.sha256()
for item in items:  # warm-up (imports, first-call costs), and the clusters' digest
    for c in one(item)[1]:
        digest.update(repr((c.centre_rc, c.members, c.outline_xy, c.features, c.score)).encode())
walls = []
c0, t0, os0 = time.process_time(), time.perf_counter(), os.times()
work = [it for _ in range(repeats) for it in items]
if parallel > 1:
    with ThreadPoolExecutor(parallel) as pool:
        walls = [w for w, _ in pool.map(one, work)]
else:
    walls = [one(it)[0] for it in work]
cpu, elapsed, os1 = time.process_time() - c0, time.perf_counter() - t0, os.times()
print(json.dumps({"cpu_ms": 1000 * cpu / len(work),
                  "wall_ms": 1000 * sorted(walls)[len(walls) // 2],
                  "elapsed_ms": 1000 * elapsed / len(work), "images": len(work),
                  "sys_ms": 1000 * (os1.system - os0.system) / len(work),
                  "digest": digest.hexdigest()[:16], "load": os.getloadavg()[0]}))
"""


def _child(tree: Path, files: list[Path], repeats: int, parallel: int, cv_threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(f) for f in files]),
                          str(repeats), str(parallel), str(cv_threads)], cwd=tree, env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"per-image run in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(fmt: str, syntax: str, baseline: str, rounds: int, repeats: int, parallel: int,
            work: Path | None, cv_threads: int = 0) -> list[tuple[str, dict]]:
    from bench.studies import StudyFactory
    from bench.turnaround_baseline import baseline_tree

    factory = StudyFactory(fmt, syntax, tag=f"perimage-{fmt}-{syntax}")
    results: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="mammo-bench-pi-", dir=work) as tmp, \
            baseline_tree(baseline, Path(tmp)) as base:
        files = factory.write_study(0, Path(tmp) / "study")
        order = [("baseline", base), ("this tree", REPO)]
        for i in range(rounds):
            for name, tree in order if i % 2 == 0 else order[::-1]:
                r = _child(tree, files, repeats, parallel, cv_threads)
                print(f"round {i + 1} {name}: {r}", flush=True)
                results.append((name, r))
    return results


def table(results: list[tuple[str, dict]]) -> list[str]:
    rows = ["| round | tree | images | CPU ms/image | wall ms/image (median) | "
            "elapsed ms/image | load | cluster digest |", "|---|---|---|---|---|---|---|---|"]
    for i, (name, r) in enumerate(results):
        rows.append(f"| {i // 2 + 1} | {name} | {r['images']} | **{r['cpu_ms']:.0f}** | "
                    f"{r['wall_ms']:.0f} | {r['elapsed_ms']:.0f} | {r['load']:.1f} | "
                    f"`{r['digest']}` |")

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for n, r in results if n == name)

    same = len({r["digest"] for _, r in results}) == 1
    rows += ["", f"- CPU ms/image (median of rounds): this tree {med('this tree', 'cpu_ms'):.0f},"
             f" baseline {med('baseline', 'cpu_ms'):.0f}, ratio **"
             f"{med('this tree', 'cpu_ms') / med('baseline', 'cpu_ms'):.2f}**",
             f"- wall ms/image: this tree {med('this tree', 'wall_ms'):.0f}, baseline "
             f"{med('baseline', 'wall_ms'):.0f}, ratio "
             f"{med('this tree', 'wall_ms') / med('baseline', 'wall_ms'):.2f}",
             f"- clusters: {'identical in every run' if same else 'DIFFER between runs'}"]
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.report import publish
    from bench.turnaround_baseline import _rev

    ap = argparse.ArgumentParser(prog="python -m bench.perimage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=3, help="baseline + this tree pairs")
    ap.add_argument("--repeats", type=int, default=4, help="passes over the 4 views per run")
    ap.add_argument("--format", default="big", help="big, small or tiny (bench/studies.py)")
    ap.add_argument("--syntax", default="raw", help="raw or j2k")
    ap.add_argument("--parallel", type=int, default=1, help="images at once (threads)")
    ap.add_argument("--cv-threads", type=int, default=0,
                    help="cv2.setNumThreads in both trees (0: OpenCV's default)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    results = compare(args.format, args.syntax, args.baseline, args.rounds, args.repeats,
                      args.parallel, args.workdir, args.cv_threads)
    load1 = os.getloadavg()
    out = [f"## Per-image work (prepare_one), {args.format} {args.syntax}, "
           f"{args.parallel} at once, OpenCV threads {args.cv_threads or 'default'}: this tree vs "
           "baseline", "",
           f"- this tree: {_rev('HEAD')}; baseline: {args.baseline} ({_rev(args.baseline)}); "
           f"{args.rounds} rounds x {args.repeats} passes over 4 views; load "
           f"{' / '.join(f'{x:.1f}' for x in load0)} before, "
           f"{' / '.join(f'{x:.1f}' for x in load1)} after", "", *table(results)]
    publish(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
