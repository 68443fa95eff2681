"""Through the node: mini-MIAS in over DICOM, SRs out, scored against the ground truth.

``.venv/bin/python -m bench.evaluate_mias``:

1. the 22 mini-MIAS images with located clusters and the held-out normal images of the
   detector's split (women never used to train it), one study per woman, are written as MG For
   Presentation DICOM (0.2 mm) and sent by dcmtk ``storescu`` to the node, a real process with
   the shipped model card, over real associations;
2. the node's TID 1500 SR and Mammography CAD SR arrive at a dcmtk ``storescp``;
3. every reported mark (the CAD SR's Center and Certainty of Finding, i.e. the cluster score)
   is matched to the ground truth (centre within the annotated radius + 2 mm): FROC with 95 %
   bootstrap intervals over women, the default operating point's sensitivity and false marks
   per normal image, and what the SRs say about benign/malignant;
4. the figures are written to ``models/reports/node-eval/`` and into the model card (JSON and
   MODEL_CARD.md), docs/analysis-evaluation.md and README.md (between ``node-eval`` markers).

The node runs with ``detector_operating_point = 0`` so that one pass yields the whole FROC; the
default operating point's figures are the marks at or above it, which is exactly what the node
reports with the default configuration. ``--retrain`` first re-runs ``python -m models
detector`` and ``python -m models classify`` (the whole chain, one command).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ComprehensiveSRStorage, MammographyCADSRStorage

from models.card import ModelCard, classification_validated
from models.detector.froc import (
    FP_RATES,
    best_hit_scores,
    bootstrap_froc,
    sensitivity_at,
)
from models.detector.model import DetectorModel
from models.detector.train import mias_patient, read_truths, split

REPO = Path(__file__).resolve().parents[1]
CARD = REPO / "models" / "weights" / "calc-cluster-lite0.json"
DEFAULT_MIAS = REPO.parent / "shared" / "data" / "mini-mias"
PATHOLOGY_CALLS = ("21594007", "30807003")  # SCT Malignant, Benign


def _codes(ds: pydicom.Dataset) -> list[str]:
    out = []
    for item in ds.get("ContentSequence", []):
        for seq in ("ConceptCodeSequence",):
            for code in item.get(seq, []):
                out.append(str(code.CodeValue))
        out += _codes(item)
    return out


def run_node(studies: dict[str, list[Path]], work: Path, log=print) -> tuple[list[Path], dict]:
    """Send every study to a node process; return the SR files received and timings."""
    from tests.netutil import NodeProcess, StoreSCP, storescu, wait_until

    dest = StoreSCP(work / "dest", ae_title="PACS").start()
    node = NodeProcess(
        work / "node", [dest.destination("pacs")],
        study={"stable_seconds": 2, "complete_on_four_views": False,
               "check_interval_seconds": 0.5},
        analysis={"detector_operating_point": 0.0, "max_rois_per_image": 50},
        output={"objects": ["tid1500", "mammo_cad"]}, log={"level": "INFO"},
    )
    t0 = time.perf_counter()
    node.start()
    try:
        t_start = time.perf_counter()
        for files in studies.values():
            res = storescu(node.port, files)
            if res.returncode != 0:
                raise RuntimeError(f"storescu failed: {res.stderr[-400:]}")
        sent = time.perf_counter() - t_start
        log(f"  sent {sum(len(v) for v in studies.values())} images in {len(studies)} studies "
            f"({sent:.0f} s)")

        def srs() -> list[Path]:
            return [f for f in dest.files() if f.name.startswith("SR")]

        wait_until(lambda: len(srs()) >= 2 * len(studies), 1800, 1.0,
                   f"SRs of {len(studies)} studies")
        wall = time.perf_counter() - t_start
        analysis_ms = [float(m) for m in re.findall(r"analysis\.done .*? ms=([0-9.]+)",
                                                    node.log())]
    finally:
        node.stop()
        dest.stop()
    return srs(), {"studies": len(studies), "send_s": round(sent, 1),
                   "until_last_sr_s": round(wall, 1), "with_start_s":
                   round(time.perf_counter() - t0, 1),
                   "analysis_ms_median": float(np.median(analysis_ms)) if analysis_ms else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.evaluate_mias", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mias-dir", type=Path, default=DEFAULT_MIAS,
                    help="mini-MIAS (default: ../shared/data/mini-mias beside the repository)")
    ap.add_argument("--out", type=Path, default=REPO / "models" / "reports" / "node-eval")
    ap.add_argument("--card", type=Path, default=CARD)
    ap.add_argument("--retrain", action="store_true",
                    help="first run `python -m models detector` and `python -m models classify`")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite card/docs/README")
    a = ap.parse_args(argv)
    if not (a.mias_dir / "calc_annotations.csv").is_file():
        raise SystemExit(f"mini-MIAS not found in {a.mias_dir} (png/, Info.txt, "
                         "calc_annotations.csv): pass --mias-dir")
    t_all = time.perf_counter()
    command = "python -m bench.evaluate_mias" + (" --retrain" if a.retrain else "")
    if a.retrain:
        # paths relative to the repository in the recorded commands (no machine paths in cards)
        mias = [] if a.mias_dir == DEFAULT_MIAS else ["--mias-dir", str(a.mias_dir)]
        card = str(a.card.resolve().relative_to(REPO)) if a.card.resolve().is_relative_to(REPO) \
            else str(a.card)
        for cmd in (["detector", *mias], ["classify", *mias, "--card", card]):
            print("$ python -m models " + " ".join(cmd), flush=True)
            subprocess.run([sys.executable, "-m", "models", *cmd], cwd=REPO, check=True)
    card = ModelCard.load(a.card)
    det_path = card.detector_path(a.card)
    assert det_path is not None, "the card names no detector file"
    detector = DetectorModel.load(det_path)
    op = detector.operating_point
    truths = read_truths(a.mias_dir)
    s = split(a.mias_dir, seed=int(detector.training.get("seed", 0)))
    refs = sorted(set(s.cluster_images) | set(s.test_normals))
    from tests.testdata import mias_to_mg, uid_from

    with tempfile.TemporaryDirectory(prefix="mias-node-eval-") as tmp:
        work = Path(tmp)
        studies: dict[str, list[Path]] = defaultdict(list)
        uid_to_ref = {}
        for ref in refs:
            pid = "MIASEVAL" + mias_patient(ref)
            path = work / "in" / f"{ref}.dcm"
            ds = mias_to_mg(ref, path, patient_id=pid, study_uid=uid_from("eval", pid),
                            mias_dir=a.mias_dir)
            uid_to_ref[str(ds.SOPInstanceUID)] = ref
            studies[pid].append(path)
        print(f"through the node: {len(refs)} images ({len(s.cluster_images)} with clusters, "
              f"{len(s.test_normals)} held-out normals), {len(studies)} studies")
        sr_files, timing = run_node(studies, work)
        found: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        calls = prob_items = 0
        notes = 0
        from tests.srread import read_cad_findings

        for f in sr_files:
            ds = pydicom.dcmread(f)
            if str(ds.SOPClassUID) == MammographyCADSRStorage:
                for e in read_cad_findings(ds):
                    ref = uid_to_ref[str(e["sop_instance_uid"])]
                    x, y = e["centre"]
                    found[ref].append((y - 0.5, x - 0.5, float(e["certainty"]) / 100.0))
                    prob_items += "probability" in e
            elif str(ds.SOPClassUID) == ComprehensiveSRStorage:
                codes = _codes(ds)
                calls += sum(codes.count(c) for c in PATHOLOGY_CALLS)
                notes += sum("not validated for benign/malignant" in str(it.get("TextValue", ""))
                             for it in _walk(ds))
    spacing = {r: 0.2 for r in refs}
    best = best_hit_scores(truths, found, spacing)
    normal_fp = {r: np.array([sc for *_, sc in found.get(r, [])]) for r in s.test_normals}
    fps = np.concatenate(list(normal_fp.values()))
    sens, thr = sensitivity_at(best, fps, len(s.test_normals))
    ci = bootstrap_froc(truths, best, normal_fp, {r: mias_patient(r) for r in s.test_normals})
    op_sens = float(np.mean(best >= op))
    op_fp = float((fps >= op).sum() / len(s.test_normals))
    validated, why = classification_validated(card)
    res = {
        "command": command, "n_clusters": len(truths), "n_cluster_images": len(s.cluster_images),
        "n_normals": len(s.test_normals), "timing": timing,
        "operating_point": {"score": op, "sensitivity": op_sens, "fp_per_normal": op_fp,
                            "detected": int(np.sum(best >= op))},
        "froc": [{"fp_per_normal": r, "sensitivity": float(v), "ci95": [float(lo), float(hi)]}
                 for r, v, (lo, hi) in zip(FP_RATES, sens, ci, strict=True)],
        "marks_at_operating_point": int(sum((np.array([x[2] for x in v]) >= op).sum()
                                            for v in found.values())),
        "classification": {"validated": validated, "rule_outcome": why,
                           "pathology_calls_in_srs": calls,
                           "probability_of_cancer_items_in_cad_srs": prob_items,
                           "not_validated_notes_in_srs": notes},
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    block = markdown(res, detector)
    (a.out / "report.md").write_text("# Through the node on mini-MIAS\n\n" + "\n".join(block)
                                     + "\n")
    print("\n".join(block))
    if not a.no_docs:
        update_docs(res, block, a.card)
    return 0


def _walk(ds: pydicom.Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def markdown(res: dict, detector: DetectorModel) -> list[str]:
    op, c, t = res["operating_point"], res["classification"], res["timing"]
    clean = detector.metrics.get("clean_test", {})
    lines = [
        f"Measured with `{res['command']}` ({res['wall_s']:.0f} s on 2 shared CPU cores): "
        f"{res['n_cluster_images']} images with {res['n_clusters']} located clusters and "
        f"{res['n_normals']} held-out normal images ({t['studies']} studies, one per woman) "
        "sent as MG DICOM over real associations; marks read back from the node's SRs.",
        "",
        "| false marks / normal image | " + " | ".join(f"{r:g}" for r in FP_RATES) + " |",
        "|---|" + "---:|" * len(FP_RATES),
        "| sensitivity through the node | " + " | ".join(
            f"{100 * f['sensitivity']:.1f} %" for f in res["froc"]) + " |",
        "| 95 % bootstrap interval | " + " | ".join(
            f"{100 * f['ci95'][0]:.0f}–{100 * f['ci95'][1]:.0f} %" for f in res["froc"]) + " |",
        "",
        f"Default operating point (cluster score ≥ {op['score']:.3f}, from the detector file): "
        f"**{100 * op['sensitivity']:.1f} % ({op['detected']}/{res['n_clusters']}) of the "
        f"clusters at {op['fp_per_normal']:.2f} false marks per normal image**"
        + (f" (the detector's own clean test: {100 * clean['operating_point']['sensitivity']:.1f}"
           f" % at {clean['operating_point']['fp_per_normal']:.2f})" if clean else "") + ".",
        "",
        f"Benign/malignant: the card's classification evidence is "
        f"{'**validated**' if c['validated'] else '**not validated**'} ({c['rule_outcome']}); "
        f"the node's SRs hold {c['pathology_calls_in_srs']} Benign/Malignant codes and "
        f"{c['probability_of_cancer_items_in_cad_srs']} Probability-of-cancer items, and "
        f"{c['not_validated_notes_in_srs']} \"not validated for benign/malignant "
        "classification\" notes.",
        "",
        f"Time: all studies sent in {t['send_s']:.0f} s, last SR {t['until_last_sr_s']:.0f} s "
        f"after the first image; median analysis per study {t['analysis_ms_median'] / 1000:.2f} s"
        if t.get("analysis_ms_median") else "",
    ]
    return lines


def _replace_block(text: str, name: str, block: list[str]) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = begin + "\n" + "\n".join(block).rstrip() + "\n" + end
    if begin in text and end in text:
        return re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: body, text,
                      flags=re.S)
    return text.rstrip() + "\n\n" + body + "\n"


def update_docs(res: dict, block: list[str], card_path: Path) -> None:
    from models.card_md import render_model_card

    card = ModelCard.load(card_path)
    card.metrics["analysis_stage"] = {**res, "markdown": block}
    card.save(card_path)
    md = card_path.parent / "MODEL_CARD.md"
    detector = DetectorModel.load(card.detector_path(card_path))
    md.write_text(render_model_card(card, card_path.name, "models/reports/mini-mias-cv/"
                                    "report.md", detector), encoding="utf-8")
    from models.card_md import _classification_section, _detector_section

    blocks = {"node-eval": block, "detector": _detector_section(detector)[2:],
              "classification": classification_block(card)
              + _classification_section(card)[2:]}
    for path, names in ((REPO / "docs" / "analysis-evaluation.md",
                         ("detector", "classification", "node-eval")),
                        (REPO / "README.md", ("node-eval",))):
        if path.exists():
            text = path.read_text(encoding="utf-8")
            for name in names:
                text = _replace_block(text, name, blocks[name])
            path.write_text(text, encoding="utf-8")
    print(f"updated {card_path.name}, MODEL_CARD.md, docs/analysis-evaluation.md, README.md")


def classification_block(card: ModelCard) -> list[str]:
    """The configuration table of ``python -m models classify`` (its results.json)."""
    path = REPO / "models" / "reports" / "classification" / "results.json"
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    lines = ["| configuration | clusters | AUC | 95 % CI |", "|---|---:|---:|---|"]
    for name, v in r["configs"].items():
        lines.append(f"| {name} | {v['n']} ({v['n_malignant']} M) | {v['auc']:.3f} | "
                     f"{v['auc_ci95'][0]:.2f}–{v['auc_ci95'][1]:.2f} |")
    n = r["nested"]
    lines.append(f"| nested CV of choosing the best configuration | {n['n']} | {n['auc']:.3f} | "
                 f"{n['auc_ci95'][0]:.2f}–{n['auc_ci95'][1]:.2f} |")
    return [*lines, ""]


if __name__ == "__main__":
    sys.exit(main())
