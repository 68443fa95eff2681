"""Output build benchmark: milliseconds to build each output kind for one study.

    .venv/bin/python -m bench.outputs [--rows 4096 --cols 3328] [--rois 5] [--repeats 5]

A four-view study (L/R x CC/MLO MG For Presentation headers, 3328 x 4096 by default) with
``--rois`` calcification clusters per image; the display image and Grad-CAM map are what the
analysis stage hands over (long side 2048 px). Each kind is built alone with
``node.reports.build_reports(kinds=[kind])`` (the whole study: 1 SR, or 4 SC / 4 GSPS) and then
encoded to bytes as the spool would write it. Prints the median build and encode time per kind;
the row ``tid1500/hd`` builds the TID 1500 SR through highdicom's own ``ComprehensiveSR``
constructor (the baseline of :mod:`node.reports.sr_document`, measured in the same run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import math
import statistics
import time

import highdicom as hd
import numpy as np

import node.reports.sr as sr_module
from node.analysis.result import Finding, ImageAnalysis, ModelInfo, StudyAnalysis
from node.kinds import KINDS, TID1500
from node.reports import ReportContext, SeriesNumbers, build_reports
from node.reports.sr_document import comprehensive_sr
from tests.testdata import mg_dataset, uid_from

MODEL = ModelInfo("calc-cluster-lite0", "0.1.0", "tf_efficientnet_lite0", 0.41)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=3328)
    ap.add_argument("--rois", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", metavar="KIND", help="then profile building KIND (cProfile, "
                    "3 builds): where highdicom spends the time")
    args = ap.parse_args()
    analysis, sources = study(args.rows, args.cols, args.rois)
    created = dt.datetime(2026, 1, 1, 12, 0, 0)
    context = ReportContext(analysis_key="bench", created=created, manufacturer="mammo-node",
                            software_version="bench", threshold=MODEL.threshold,
                            series=SeriesNumbers(tid1500=9901, sc=9902))
    print(f"study: 4 views {args.cols}x{args.rows}, {args.rois} ROIs/image, "
          f"median of {args.repeats} runs")
    print(f"{'kind':<10} {'objects':>7} {'build ms':>9} {'encode ms':>10} {'MB':>7}")
    rows = [(kind, kind) for kind in KINDS]
    # the baseline in the same run: the TID 1500 SR through highdicom's own SOP constructor
    rows.insert(1, ("tid1500/hd", TID1500))
    medians: dict[str, float] = {}
    for label, kind in rows:
        build, encode = [], []
        constructor = hd.sr.ComprehensiveSR if label.endswith("/hd") else comprehensive_sr
        sr_module.comprehensive_sr = constructor  # type: ignore[assignment]
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            objs = build_reports(analysis, sources, context, [kind])
            t1 = time.perf_counter()
            size = 0
            for ds in objs:
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                size += buf.tell()
            t2 = time.perf_counter()
            build.append((t1 - t0) * 1000)
            encode.append((t2 - t1) * 1000)
        print(f"{label:<10} {len(objs):>7} {statistics.median(build):>9.1f} "
              f"{statistics.median(encode):>10.1f} {size / 1e6:>7.2f}")
        medians[label] = statistics.median(build)
        sr_module.comprehensive_sr = comprehensive_sr
    ratio = medians[TID1500] / medians[TID1500 + "/hd"]
    print(f"tid1500 build: sr_document / highdicom constructor = {ratio:.2f}")
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            build_reports(analysis, sources, context, [args.profile])
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
