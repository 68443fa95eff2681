"""The two published protocols, on any ROI dataset, one command each.

``seed000`` — the EfficientNet comparison: EfficientNet-B0…B4 and ResNet-50/101 (plus the
EfficientNet-Lite0/1/2 that have ImageNet weights offline), patient-level stratified k-fold CV
(5 by default) on identical folds, accuracy / AUC / weighted F1 per fold, pairwise Wilcoxon
signed-rank tests, inference time per model, markdown report with ROC and box plots. Built on
:func:`models.evaluate.cross_validate` (which resumes from the last finished fold).

``seed001`` — the ResNeXt double-transfer-learning study: ImageNet (where weights exist
offline, else from scratch, stated) -> an intermediate mammography ROI set (``--intermediate-
csv``, e.g. CBIS-DDSM imported with ``python -m models import``; synthetic calcification ROIs
when none is given, stated) -> the target ROIs. A patient-disjoint held-out test split balanced
for benign/malignant; an ensemble of the k models of a patient-level k-fold CV on the rest
(each member early-stops on its own validation split; the pooled out-of-fold predictions pick
the threshold); sensitivity, specificity, PPV, NPV, accuracy at that threshold and AUC with a
patient-bootstrap CI on the test split, for the ensemble and each member; Grad-CAM panels of
correct and misclassified test ROIs. Every finished fold is checkpointed (weights + a JSON
record) and a restarted run resumes after it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from models import imagenet
from models.data import RoiSet, load_rois
from models.foldstore import FoldStore, atomic_write_text, digest
from models.metrics import binary_metrics, bootstrap_ci, roc_auc
from models.train import load_model, predict_proba, save_model, train_classifier, youden_threshold
from models.verify import roi_kinds_of

SEED000_ARCHS = ("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
                 "efficientnet_b4", "resnet50", "resnet101", "tf_efficientnet_lite0",
                 "tf_efficientnet_lite1", "tf_efficientnet_lite2")
REPORT_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "auc", "weighted_f1")


def init_sources(architectures: list[str]) -> dict[str, str]:
    """Per architecture: where its ImageNet start comes from, or "scratch"."""
    return {a: imagenet.source_of(a) or "scratch (no ImageNet weights offline)"
            for a in architectures}


# --------------------------------------------------------------------------- seed 000


def run_seed000(rois: RoiSet, out_dir: Path, *, archs: list[str], **cv_kwargs) -> dict:
    """Seed 000 on ``rois`` (one input size for all models, so one paired table)."""
    from models.evaluate import cross_validate, parse_config, write_outputs
    from models.plots import fold_boxplots

    configs = [parse_config(a) for a in archs]
    results = cross_validate(rois, configs, out_dir, **cv_kwargs)
    write_outputs(results, rois, out_dir)  # a fully resumed run rewrites nothing by itself
    boxes = fold_boxplots(results, out_dir)
    sources = init_sources([c.architecture for c in configs])
    lines = ["", "## Seed 000 protocol", "",
             f"{results['n_folds']}-fold patient-level stratified CV, identical folds for every "
             "model (paired Wilcoxon above). Initialisation per model:", "",
             "| model | init | ImageNet weights | ms/ROI (batch 1) |", "|---|---|---|---:|"]
    for lab, r in results["configs"].items():
        src = sources.get(r["architecture"], "") if r["init"] != "scratch" else "—"
        lines.append(f"| {lab} | {r['init']} | {src} | {r['infer_ms']:.1f} |")
    lines += ["", "Per-fold distributions:", ""]
    lines += [f"![{b}]({b})" for b in boxes]
    report = Path(out_dir) / "report.md"
    report.write_text(report.read_text(encoding="utf-8") + "\n".join(lines) + "\n",
                      encoding="utf-8")
    return results


# --------------------------------------------------------------------------- seed 001


def balanced_test_split(labels: np.ndarray, patients: np.ndarray, fraction: float, seed: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test, development, unused) indices: whole patients go to the test split until it holds
    ``fraction`` of the minority class in each class; ROIs of test patients beyond the balance
    are left unused (never trained on), so the test split is exactly balanced."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=2)
    target = max(1, int(round(fraction * counts.min())))
    uniq = np.unique(patients)
    rng.shuffle(uniq)
    have = np.zeros(2, dtype=int)
    test_patients = []
    for p in uniq:
        y = labels[patients == p]
        add = np.bincount(y, minlength=2)
        need = have < target
        if not need[add > 0].any():
            continue  # this woman only adds classes that are already full
        test_patients.append(p)
        have += add
        if (have >= target).all():
            break
    in_test = np.isin(patients, test_patients)
    test, unused = [], []
    for c in (0, 1):
        idx = np.nonzero(in_test & (labels == c))[0]
        rng.shuffle(idx)
        n = min(target, int(have.min()))
        test += idx[:n].tolist()
        unused += idx[n:].tolist()
    # a woman none of whose ROIs stayed in the test split goes back to development
    kept = set(patients[test].tolist())
    back = [i for i in unused if patients[i] not in kept]
    unused = [i for i in unused if patients[i] in kept]
    dev = np.sort(np.concatenate([np.nonzero(~in_test)[0], np.asarray(back, int)]))
    return np.sort(np.asarray(test, int)), dev, np.sort(np.asarray(unused, int))


def intermediate_weights(architecture: str, out_dir: Path, *, input_size: int,
                         roi_size_mm: float, intermediate_csv: Path | None, target: RoiSet,
                         epochs: int, seed: int, device: str, synth_n: int, synth_epochs: int,
                         normals: str, progress: bool, log) -> tuple[Path, dict]:
    """Stage 2 of double transfer: ImageNet (or scratch) -> the intermediate set; cached."""
    from models.evaluate import pretrain_synthetic

    start = "imagenet" if imagenet.has_imagenet(architecture) else "scratch"
    if intermediate_csv is None:
        key = digest("synthetic", architecture, input_size, roi_size_mm, synth_n, synth_epochs,
                     seed)
        path = out_dir / "cache" / f"intermediate-{architecture}-{key}.safetensors"
        info_path = path.with_suffix(".json")
        if not path.exists():
            log(f"[{architecture}] intermediate stage: {synth_n} synthetic calcification ROIs "
                f"(from {start})")
            _, m = pretrain_synthetic(architecture, path, roi_size_mm=roi_size_mm,
                                      input_size=input_size, n=synth_n, epochs=synth_epochs,
                                      seed=seed, device=device, progress=progress)
            atomic_write_text(info_path, json.dumps(
                {"data": f"{synth_n} synthetic calcification ROIs (models/synth.py)",
                 "start": start, "synthetic_test": m}, indent=1))
        return path, json.loads(info_path.read_text())
    inter = load_rois(intermediate_csv, roi_size_mm=roi_size_mm, input_size=input_size,
                      normals=normals)
    shared = set(inter.patients.tolist()) & set(target.patients.tolist())
    if shared:
        raise ValueError(f"the intermediate set shares {len(shared)} patient ids with the "
                         f"target set (e.g. {next(iter(shared))}): double transfer would leak")
    key = digest(str(intermediate_csv), inter.paths, inter.labels, architecture, input_size,
                 roi_size_mm, epochs, seed, start)
    path = out_dir / "cache" / f"intermediate-{architecture}-{key}.safetensors"
    info_path = path.with_suffix(".json")
    if not path.exists():
        log(f"[{architecture}] intermediate stage: {len(inter)} ROIs of {intermediate_csv} "
            f"(from {start})")
        model, card = train_classifier(
            inter.crops, inter.labels.tolist(), architecture=architecture,
            input_size=input_size, roi_size_mm=roi_size_mm, epochs=epochs, seed=seed,
            init=start, device=device, val_fraction=0.2, groups=inter.patients.tolist(),
            progress=progress)
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp))
        os.replace(tmp, path)
        atomic_write_text(info_path, json.dumps(
            {"data": f"{len(inter)} ROIs of {Path(intermediate_csv).name} "
                     f"({int(inter.labels.sum())} malignant, {len(np.unique(inter.patients))} "
                     "patients)", "start": start, "epochs_run": card.training["epochs_run"],
             "wall_s": card.training["wall_s"]}, indent=1))
    return path, json.loads(info_path.read_text())


def run_seed001(rois: RoiSet, out_dir: Path, *, architecture: str = "resnext50_32x4d",
                inits: tuple[str, ...] = ("double",), intermediate_csv: Path | None = None,
                test_fraction: float = 0.2, k: int = 5, epochs: int = 10, inter_epochs: int = 5,
                input_size: int = 224, roi_size_mm: float = 32.0, seed: int = 0,
                device: str = "cpu", threshold: str = "youden", patience: int = 4,
                lr: float = 3e-4, synth_n: int = 600, synth_epochs: int = 3,
                normals: str = "drop", gradcam_n: int = 8, command: str = "",
                data_desc: str = "", progress: bool = True, data_licence: str = "",
                csv_path: Path | None = None, log=print) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    y, pats = rois.labels, rois.patients
    test, dev, unused = balanced_test_split(y, pats, test_fraction, seed)
    if len(test) == 0 or len(np.unique(y[dev])) < 2:
        raise ValueError("too few ROIs for a balanced test split and a development set")
    from models.evaluate import make_folds

    dev_rois = rois.subset(dev)
    folds = make_folds(dev_rois, k, seed)
    data_key = digest(rois.paths, y, pats.tolist(), test, folds,
                      [float(c.mean()) for c in rois.crops])
    results: dict = {
        "protocol": "seed001", "command": command, "data": data_desc, "n_rois": len(rois),
        "n_patients": int(len(np.unique(pats))), "architecture": architecture,
        "input_size": input_size, "roi_size_mm": roi_size_mm, "k": k, "epochs": epochs,
        "seed": seed, "device": device, "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "test": {"n": int(len(test)), "benign": int((y[test] == 0).sum()),
                 "malignant": int((y[test] == 1).sum()),
                 "patients": int(len(np.unique(pats[test]))), "unused": int(len(unused))},
        "dev": {"n": int(len(dev)), "malignant": int(y[dev].sum()),
                "patients": int(len(np.unique(pats[dev])))},
        "imagenet": init_sources([architecture])[architecture], "arms": {},
    }
    for init in inits:
        arm = f"{architecture} ({init})"
        start = init
        info: dict = {}
        if init == "double":
            path, info = intermediate_weights(
                architecture, out_dir, input_size=input_size, roi_size_mm=roi_size_mm,
                intermediate_csv=intermediate_csv, target=rois, epochs=inter_epochs, seed=seed,
                device=device, synth_n=synth_n, synth_epochs=synth_epochs, normals=normals,
                progress=progress, log=log)
            start = str(path)
        elif init == "imagenet" and not imagenet.has_imagenet(architecture):
            raise ValueError(f"{architecture}: no offline ImageNet weights for init imagenet")
        store = FoldStore(out_dir / "folds", arm, digest(data_key, init, start, epochs,
                                                         patience, lr, seed))
        oof = np.full(len(dev), np.nan)
        test_p, members = [], []
        for f in range(k):
            tr, va = np.nonzero(folds != f)[0], np.nonzero(folds == f)[0]
            card_path = out_dir / "members" / arm.replace(" ", "_").replace("(", "").replace(
                ")", "") / f"fold{f + 1}.json"
            done = store.load(f)
            if done is not None and card_path.exists():
                log(f"[{arm}] fold {f + 1}/{k}: finished before, resumed")
            else:
                model, card = train_classifier(
                    [dev_rois.crops[i] for i in tr], dev_rois.labels[tr].tolist(),
                    architecture=architecture, input_size=input_size,
                    roi_size_mm=roi_size_mm, epochs=epochs, seed=seed + f, init=start,
                    device=device, val_fraction=0.2, groups=dev_rois.patients[tr].tolist(),
                    patience=patience, lr=lr, progress=progress)
                p_va = predict_proba(model, [dev_rois.crops[i] for i in va], card,
                                     device=device)
                p_te = predict_proba(model, [rois.crops[i] for i in test], card, device=device)
                card.name = f"calc-cluster-{architecture}-seed001-fold{f + 1}"
                card.training["init"] = init
                card.training["protocol"] = f"seed001 member {f + 1}/{k}: {command}"
                card.training["data"] = {"description": data_desc, "n_rois": len(tr)}
                kinds = roi_kinds_of(csv_path, normals) if csv_path else None
                if kinds is not None:
                    card.training["data"]["roi_kinds"] = kinds
                card.data_licence = data_licence
                save_model(model, card, card_path)
                done = {"oof": p_va.tolist(), "test_p": p_te.tolist(),
                        "epochs_run": card.training["epochs_run"],
                        "train_s": card.training["wall_s"], "card": card_path.name}
                store.save(f, done)
                log(f"[{arm}] fold {f + 1}/{k}: test AUC {roc_auc(y[test], p_te):.3f}, "
                    f"{card.training['epochs_run']} epochs, {card.training['wall_s']:.0f}s")
            oof[va] = np.asarray(done["oof"])
            test_p.append(np.asarray(done["test_p"]))
            members.append({"card": str(card_path.relative_to(out_dir)),
                            "epochs_run": done["epochs_run"], "train_s": done["train_s"]})
        ens = np.mean(test_p, axis=0)
        thr = (youden_threshold(dev_rois.labels, oof) if threshold == "youden"
               else float(threshold))
        yt = y[test]
        res = {
            "init": init, "start": start if init != "double" else "intermediate",
            "intermediate": info, "threshold": thr,
            "threshold_rule": "Youden point of the pooled out-of-fold development predictions"
            if threshold == "youden" else "fixed (--threshold)",
            "dev_oof_auc": roc_auc(dev_rois.labels, oof),
            "ensemble": binary_metrics(yt, ens, thr),
            "ensemble_auc_ci95": bootstrap_ci(yt, ens, pats[test], "auc", seed=seed),
            "ensemble_confusion": _confusion(yt, ens, thr),
            "members": [dict(m, **binary_metrics(yt, p, thr)) for m, p in zip(members, test_p,
                                                                            strict=True)],
            "test_p": ens.tolist(),
        }
        results["arms"][arm] = res
        log(f"[{arm}] ensemble of {k}: test AUC {res['ensemble']['auc']:.3f}, sensitivity "
            f"{res['ensemble']['sensitivity']:.3f}, specificity "
            f"{res['ensemble']['specificity']:.3f} at {thr:.3f}")
        if gradcam_n > 0:
            res["gradcam"] = _gradcam_panels(rois, test, ens, thr, out_dir, arm,
                                             [out_dir / m["card"] for m in members], device,
                                             gradcam_n)
    results["test_index"] = test.tolist()
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    from models.plots import roc_test

    roc_test(out_dir / "roc_test.png", y[test],
             {f"ensemble {a}": np.asarray(r["test_p"]) for a, r in results["arms"].items()},
             "Held-out balanced test split")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "report.md").write_text(render_seed001(results), encoding="utf-8")
    return results


def _confusion(y: np.ndarray, p: np.ndarray, thr: float) -> dict[str, int]:
    from models.metrics import confusion

    tn, fp, fn, tp = confusion(y, p >= thr)
    return {"tn": tn, "fp": fp, "fn": fn, "tp": tp}


def _gradcam_panels(rois: RoiSet, test: np.ndarray, p: np.ndarray, thr: float, out_dir: Path,
                    arm: str, cards: list[Path], device: str, n: int) -> dict[str, str]:
    """Mean Grad-CAM of the ensemble members on the most confident correct and the most
    confident misclassified test ROIs."""
    from models.gradcam import gradcam, panel

    y = rois.labels[test]
    pred = (p >= thr).astype(int)
    conf = np.abs(p - thr)
    chosen = {"correct": np.nonzero(pred == y)[0], "misclassified": np.nonzero(pred != y)[0]}
    cams_sum: dict[str, np.ndarray] = {}
    picks = {k: v[np.argsort(-conf[v])][:n] for k, v in chosen.items()}
    for card_path in cards:
        model, card = load_model(card_path, device=device)
        for kind, idx in picks.items():
            if len(idx):
                c = gradcam(model, [rois.crops[test[i]] for i in idx], card, device=device)
                cams_sum[kind] = cams_sum.get(kind, 0) + c
    files = {}
    tag = arm.replace(" ", "_").replace("(", "").replace(")", "")
    for kind, idx in picks.items():
        if not len(idx):
            continue
        name = f"gradcam_{kind}_{tag}.png"
        titles = [f"{_outcome(int(y[i]), int(pred[i]))} p={p[i]:.2f}\n"
                  f"{Path(rois.paths[test[i]]).stem[:22]}" for i in idx]
        panel(out_dir / name, [rois.crops[test[i]] for i in idx], cams_sum[kind] / len(cards),
              titles, f"{arm}: {kind} test ROIs (threshold {thr:.3f}), mean Grad-CAM of "
              f"{len(cards)} members")
        files[kind] = name
    return files


def _outcome(label: int, pred: int) -> str:
    return {(1, 1): "TP", (0, 0): "TN", (0, 1): "FP", (1, 0): "FN"}[(label, pred)]


def _f(v: float | None, d: int = 3) -> str:
    return "–" if v is None or v != v else f"{v:.{d}f}"


def render_seed001(r: dict) -> str:
    t = r["test"]
    L = ["# Double transfer learning with a held-out balanced test split (seed 001 protocol)",
         "", "Command:", "", "```", r["command"], "```", "",
         f"Data: {r['data']} — {r['n_rois']} ROIs from {r['n_patients']} patients. Test split "
         f"(patient-disjoint, balanced): {t['n']} ROIs ({t['benign']} benign, {t['malignant']} "
         f"malignant) of {t['patients']} patients; {t['unused']} further ROIs of those patients "
         f"left unused to keep the balance. Development: {r['dev']['n']} ROIs "
         f"({r['dev']['malignant']} malignant) of {r['dev']['patients']} patients, "
         f"{r['k']}-fold patient-level CV: the {r['k']} fold models form the ensemble "
         "(mean probability); each early-stops on a patient-disjoint 20 % of its training "
         "patients.", "",
         f"Architecture `{r['architecture']}`, {r['input_size']} px, ROI {r['roi_size_mm']} mm, "
         f"at most {r['epochs']} epochs, seed {r['seed']}, device {r['device']}, torch "
         f"{r['torch']}, {r['machine']}; {r['wall_s'] / 60:.1f} min in all.", "",
         f"ImageNet start: **{r['imagenet']}**.", ""]
    for arm, a in r["arms"].items():
        e, ci, c = a["ensemble"], a["ensemble_auc_ci95"], a["ensemble_confusion"]
        L += [f"## {arm}", ""]
        if a["init"] == "double":
            i = a["intermediate"]
            L.append(f"Stages: {i.get('start')} → intermediate: {i.get('data')} → target.")
            L.append("")
        L += [f"Threshold {a['threshold']:.4f} ({a['threshold_rule']}; development "
              f"out-of-fold AUC {_f(a['dev_oof_auc'])}).", "",
              "| on the test split | sensitivity | specificity | PPV | NPV | accuracy | AUC "
              "[95 % patient bootstrap CI] | weighted F1 |",
              "|---|---|---|---|---|---|---|---|",
              f"| **ensemble of {len(a['members'])}** | {_f(e['sensitivity'])} | "
              f"{_f(e['specificity'])} | {_f(e['ppv'])} | {_f(e['npv'])} | {_f(e['accuracy'])} "
              f"| {_f(e['auc'])} [{_f(ci[0], 2)}, {_f(ci[1], 2)}] | {_f(e['weighted_f1'])} |"]
        for j, m in enumerate(a["members"], start=1):
            L.append(f"| member {j} ({m['epochs_run']} epochs) | {_f(m['sensitivity'])} | "
                     f"{_f(m['specificity'])} | {_f(m['ppv'])} | {_f(m['npv'])} | "
                     f"{_f(m['accuracy'])} | {_f(m['auc'])} | {_f(m['weighted_f1'])} |")
        L += ["", f"Ensemble confusion at the threshold: TP {c['tp']}, FN {c['fn']}, "
              f"TN {c['tn']}, FP {c['fp']}.", ""]
        for kind, name in a.get("gradcam", {}).items():
            L.append(f"![Grad-CAM, {kind} test ROIs]({name})")
        L += ["", "Member cards (installable on the node, one model each): "
              + ", ".join(f"`{m['card']}`" for m in a["members"]), ""]
    L += ["![ROC on the test split](roc_test.png)", "",
          "Reference: a ResNeXt trained by double transfer learning on 396 calcification ROIs "
          "reached AUC 0.76, sensitivity 65 %, specificity 83 %, PPV 79 %. A test split of a "
          "few dozen ROIs gives wide intervals; the CI above is the honest message.", ""]
    return "\n".join(L)
