"""Output build benchmark: build, encode and durable write of each output kind for one study.

    .venv/bin/python -m bench.outputs [--rows 4096 --cols 3328] [--rois 3] [--repeats 5]
        [--baseline /tmp/base-worktree] [--rounds 3]

A four-view study (L/R x CC/MLO MG For Presentation headers, 3328 x 4096 by default) with
``--rois`` calcification clusters per image; the display image and Grad-CAM map are what the
analysis stage hands over (long side 2048 px). Each kind is built alone with
``node.reports.build_reports(kinds=[kind])`` (the whole study: 1 SR, or 4 SC / 4 GSPS), then
encoded to memory as the spool encodes it (``node.store.encode_file``; pydicom's ``save_as`` in
a tree without it), then written durably the way the worker writes a kind
(``Spool.write_datasets``: written, fsynced, renamed, folder fsynced; one ``write_dataset`` per
object in a tree without it) into a temporary folder beside the current directory (the same
disk as a node's data). ``write`` includes the spool's own encoding: ``build + write`` is what
the worker spends on a kind; ``cpu b+e`` is the process CPU time of build + encode (on a
shared machine the wall time also counts the waits for a core). Medians over ``--repeats``
builds per round.

``--baseline PATH`` (a ``git worktree add PATH <commit>`` checkout, e.g. 667f167) measures that
tree's code with the same script in the same run: the two trees alternate, one child process
per tree and round (``PYTHONPATH=PATH``), and the ratios this tree / baseline are printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from node.analysis.result import Finding, ImageAnalysis, ModelInfo, StudyAnalysis
from tests.testdata import mg_dataset, uid_from

MODEL = ModelInfo("calc-cluster-lite0", "0.1.0", "tf_efficientnet_lite0", 0.41)
KIND_ORDER = ("tid1500", "mammo_cad", "sc", "gsps")
DEFAULT = ("tid1500", "sc")  # node.kinds.DEFAULT_KINDS


def study(rows: int, cols: int, rois: int) -> tuple[StudyAnalysis, dict]:
    study_uid = uid_from("bench-outputs")
    rng = np.random.default_rng(0)
    sources, images, index = {}, [], 1
    scale = 2048 / max(rows, cols)
    dh, dw = round(rows * scale), round(cols * scale)
    for n, (lat, view) in enumerate([("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]):
        ds = mg_dataset(np.zeros((8, 8), np.uint16), patient_id="BENCH", study_uid=study_uid,
                        sop_uid=uid_from("bench", lat, view), laterality=lat, view=view,
                        spacing_mm=0.07, bits_stored=12, instance_number=n + 1)
        ds.Rows, ds.Columns = rows, cols
        del ds.PixelData
        sources[ds.SOPInstanceUID] = ds
        findings = []
        for _ in range(rois):
            cx, cy = rng.uniform(300, cols - 300), rng.uniform(300, rows - 300)
            r = rng.uniform(40, 150)
            pts = tuple((round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2))
                        for a in np.linspace(0, 2 * math.pi, 32, endpoint=False))
            findings.append(Finding(index, ds.SOPInstanceUID, lat, view, (cx, cy),
                                    (*pts, pts[0]), r * 0.07, 6, float(rng.uniform(0, 1))))
            index += 1
        display = rng.integers(0, 255, (dh, dw), dtype=np.uint8)
        cam = np.zeros((dh, dw), np.float32)
        for f in findings:
            y, x = int(f.centre_xy[1] * scale), int(f.centre_xy[0] * scale)
            cam[max(0, y - 20):y + 20, max(0, x - 20):x + 20] = 1.0
        images.append(ImageAnalysis(ds.SOPInstanceUID, ds.SOPClassUID, lat, view, rows, cols,
                                    0.07, "ImagerPixelSpacing", True, findings, display, cam,
                                    scale))
    return StudyAnalysis(study_uid, MODEL, images), sources


def _encoder() -> Any:
    """The spool's encoder of this tree (node.store.encode_file), else pydicom's save_as."""
    import node.store as store

    encode = getattr(store, "encode_file", None)
    if encode is not None:
        return encode

    def save_as(ds: Any) -> list[bytes]:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return [buf.getvalue()]

    return save_as


def _writer(spool: Any) -> Any:
    """How the worker writes one kind's objects in this tree."""
    if hasattr(spool, "write_datasets"):
        return spool.write_datasets
    return lambda datasets: [spool.write_dataset(ds) for ds in datasets]


def measure(rows: int, cols: int, rois: int, repeats: int, kinds: list[str]) -> dict:
    """{kind: {objects, MB, build, encode, write: [ms per repeat]}} for the tree on sys.path."""
    from node.reports import ReportContext, SeriesNumbers, build_reports
    from node.store import Spool

    analysis, sources = study(rows, cols, rois)
    context = ReportContext(analysis_key="bench", created=dt.datetime(2026, 1, 1, 12),
                            manufacturer="mammo-node", software_version="bench",
                            threshold=MODEL.threshold,
                            series=SeriesNumbers(tid1500=9901, sc=9902))
    encode = _encoder()
    out: dict[str, dict[str, Any]] = {}
    folder = Path(tempfile.mkdtemp(prefix=".bench-outputs-", dir="."))
    try:
        spool = Spool(folder)
        write = _writer(spool)
        build_reports(analysis, sources, context, list(kinds))  # warm-up (imports, caches)
        for kind in kinds:
            row: dict[str, Any] = {"build": [], "encode": [], "write": [], "cpu": []}
            for _ in range(repeats):
                c0 = time.process_time()
                t0 = time.perf_counter()
                objs = build_reports(analysis, sources, context, [kind])
                t1 = time.perf_counter()
                size = sum(sum(len(p) for p in encode(ds)) for ds in objs)
                t2 = time.perf_counter()
                row["cpu"].append((time.process_time() - c0) * 1e3)
                for rel in write(objs):
                    spool.remove(rel)
                t3 = time.perf_counter()
                row["build"].append((t1 - t0) * 1e3)
                row["encode"].append((t2 - t1) * 1e3)
                row["write"].append((t3 - t2) * 1e3)
                del objs
            row["objects"] = 1 if kind in ("tid1500", "mammo_cad") else len(analysis.images)
            row["MB"] = size / 1e6
            out[kind] = row
        if all(k in kinds for k in DEFAULT):
            out["as_worker"] = {"ms": _as_worker(analysis, sources, context, spool, repeats)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def _as_worker(analysis: Any, sources: dict, context: Any, spool: Any, repeats: int
               ) -> list[float]:
    """ms per study for the default kinds built and written the way the tree's worker does
    it: the heap handed back to the OS first (the worker does after each study,
    node.memory.release_free_memory), then each kind built and written durably in turn, with
    ``node.reports.iter_reports`` where the tree has it (each SC written while the next one is
    rendered), else ``build_reports`` then the write."""
    import node.reports as reports

    try:
        from node.memory import release_free_memory
    except ImportError:  # a tree without it
        def release_free_memory() -> bool:
            return False
    build = getattr(reports, "iter_reports", reports.build_reports)
    write = _writer(spool)
    times = []
    for _ in range(repeats):
        release_free_memory()
        t0 = time.perf_counter()
        written = [rel for kind in DEFAULT
                   for rel in write(build(analysis, sources, context, [kind]))]
        times.append((time.perf_counter() - t0) * 1e3)
        for rel in written:
            spool.remove(rel)
    return times


def _child(tree: Path | None, args: argparse.Namespace) -> dict:
    """Run :func:`measure` in a child process with ``tree`` (None: this one) on sys.path."""
    here = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(tree if tree is not None else here))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--rows", str(args.rows),
           "--cols", str(args.cols), "--rois", str(args.rois), "--repeats", str(args.repeats),
           "--kinds", ",".join(args.kinds)]
    done = subprocess.run(cmd, env=env, cwd=str(tree or here), capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tree or here}: the measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _merge(into: dict, part: dict) -> None:
    for kind, row in part.items():
        if kind == "as_worker":
            into.setdefault(kind, {"ms": []})["ms"] += row["ms"]
            continue
        dest = into.setdefault(kind, {"build": [], "encode": [], "write": [], "cpu": []})
        for key in ("build", "encode", "write", "cpu"):
            dest[key] += row[key]
        dest["objects"], dest["MB"] = row["objects"], row["MB"]


def _med(row: dict, key: str) -> float:
    return statistics.median(row[key])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=3328)
    ap.add_argument("--rois", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternations with --baseline")
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=list(KIND_ORDER))
    ap.add_argument("--baseline", type=Path, help="a checkout of the baseline commit")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.rows, args.cols, args.rois, args.repeats, args.kinds)))
        return
    trees: dict[str, Path | None] = {"this tree": None}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    results: dict[str, dict] = {name: {} for name in trees}
    for _ in range(args.rounds if args.baseline is not None else 1):
        for name, tree in trees.items():
            _merge(results[name], _child(tree, args))
    load = os.getloadavg()
    n = len(next(iter(next(iter(results.values())).values()))["build"])
    print(f"study: 4 views {args.cols}x{args.rows}, {args.rois} ROIs/image; medians of {n} "
          f"builds per kind; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.baseline is not None:
        print(f"baseline: {args.baseline}")
    print(f"{'tree':<10} {'kind':<10} {'objects':>7} {'MB':>6} {'build ms':>9} "
          f"{'encode ms':>10} {'write ms':>9} {'build+write':>12} {'cpu b+e':>8}")
    totals: dict[str, float] = {}
    for name, rows in results.items():
        default_total = 0.0
        for kind in args.kinds:
            row = rows[kind]
            b, e, w = _med(row, "build"), _med(row, "encode"), _med(row, "write")
            print(f"{name:<10} {kind:<10} {row['objects']:>7} {row['MB']:>6.2f} {b:>9.1f} "
                  f"{e:>10.1f} {w:>9.1f} {b + w:>12.1f} {_med(row, 'cpu'):>8.1f}")
            if kind in DEFAULT:
                default_total += b + w
        if all(k in args.kinds for k in DEFAULT):
            build_only = sum(_med(rows[k], "build") + _med(rows[k], "encode") for k in DEFAULT)
            cpu = sum(_med(rows[k], "cpu") for k in DEFAULT)
            print(f"{name:<10} default kinds (tid1500 + sc): build+encode {build_only:.1f} ms "
                  f"(CPU {cpu:.1f} ms), build+write {default_total:.1f} ms")
            totals[name] = default_total
        if "as_worker" in rows:
            print(f"{name:<10} default kinds as the worker builds and writes them (heap handed "
                  f"back first): {_med(rows['as_worker'], 'ms'):.1f} ms")
    if "baseline" in results:
        base, this = results["baseline"], results["this tree"]
        print("ratios this tree / baseline (build, encode, write, build+write):")
        for kind in args.kinds:
            r = [_med(this[kind], k) / _med(base[kind], k) for k in ("build", "encode", "write")]
            tot = ((_med(this[kind], "build") + _med(this[kind], "write"))
                   / (_med(base[kind], "build") + _med(base[kind], "write")))
            print(f"  {kind:<10} {r[0]:.2f} {r[1]:.2f} {r[2]:.2f} {tot:.2f}")
        if totals:
            print(f"  default kinds build+write: {totals['this tree'] / totals['baseline']:.2f}")
        if "as_worker" in this and "as_worker" in base:
            print("  default kinds as the worker builds and writes them: "
                  f"{_med(this['as_worker'], 'ms') / _med(base['as_worker'], 'ms'):.2f}")


if __name__ == "__main__":
    main()
