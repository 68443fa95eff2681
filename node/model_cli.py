"""``mammo-node model ...`` and ``mammo-node outcomes ...``: the model lifecycle commands.

    mammo-node model install CARD [CARD ...]     verify (models/verify.py) and keep a copy
    mammo-node model list [--json]               installed versions, active, shadow, metrics
    mammo-node model activate NAME[:VERSION]     serve it (the running node follows in ~2 s)
    mammo-node model activate --default          serve [model] card of config.toml again
    mammo-node model shadow NAME[:VERSION]       run it beside the active model, never sent
    mammo-node model shadow --off
    mammo-node model compare [--since DATE]      agreement, distributions, sens/spec/AUC
    mammo-node outcomes import FILE.csv          biopsy / follow-up results (node/outcomes.py)
    mammo-node outcomes export --out FILE.csv    training labels for `python -m models import
                                                 dicom-csv`

They work on the node's database and data_dir (run them as the node's user); a running node
needs no restart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.config import Settings, load_settings

if TYPE_CHECKING:
    from node.modelstore import ModelRef


def _open(args: argparse.Namespace) -> tuple[Settings, Any, Any]:
    from node.db import Database
    from node.modelstore import ModelStore

    os.umask(0o077)  # like serve: everything under data_dir is private
    settings = load_settings(Path(args.config))
    settings.node.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(settings.database_url)
    db.create_schema()
    return settings, db, ModelStore(db, settings.node.data_dir)


def _default_ref(settings: Settings) -> ModelRef | None:
    from models.card import ModelCard
    from node.modelstore import ModelRef

    try:
        card = ModelCard.load(settings.model.card)
    except ValueError:
        return None
    return ModelRef(card.name, card.version)


def _err(message: str) -> int:
    print(f"mammo-node: {message}", file=sys.stderr)
    return 1


# -- model -------------------------------------------------------------------------------------
def cmd_install(args: argparse.Namespace) -> int:
    from node.modelstore import ModelStoreError

    _, db, store = _open(args)
    failed = 0
    try:
        for card in args.card:
            try:
                r = store.install(Path(card))
            except ModelStoreError as exc:
                print(f"{card}: {exc}", file=sys.stderr)
                failed += 1
                continue
            m = r.model
            what = "already installed, unchanged" if r.already_installed else "installed"
            print(f"{m.name}:{m.version} {what} in {store.data_dir / m.relpath} "
                  f"({m.architecture}, {m.input_size} px over {m.roi_size_mm:g} mm, threshold "
                  f"{m.threshold:.4f}, weights sha256 {m.weights_sha256[:16]}...)")
            for w in r.warnings:
                print(f"  warning: {w}")
    finally:
        db.dispose()
    return 1 if failed else 0


def cmd_list(args: argparse.Namespace) -> int:
    from node.modelstore import ModelRef

    settings, db, store = _open(args)
    try:
        roles = store.roles()
        rows = store.installed()
    finally:
        db.dispose()
    default = _default_ref(settings)
    active = roles.get("active") or default

    def role(name: str, version: str) -> str:
        ref = ModelRef(name, version)
        return ", ".join(r for r in ("active", "shadow") if roles.get(r) == ref) or "-"

    items = []
    for m in rows:
        items.append({"name": m.name, "version": m.version, "role": role(m.name, m.version),
                      "architecture": m.architecture, "input_size": m.input_size,
                      "roi_size_mm": m.roi_size_mm, "threshold": m.threshold,
                      "metrics": json.loads(m.metrics or "{}"),
                      "intended_use": m.intended_use, "data_licence": m.data_licence,
                      "installed_at": m.installed_at.isoformat() + "Z",
                      "weights_sha256": m.weights_sha256, "path": str(store.data_dir / m.relpath)})
    report = {"default": {"card": str(settings.model.card),
                          "name": default.name if default else None,
                          "version": default.version if default else None,
                          "active": "active" not in roles},
              "active": str(active) if active else None,
              "shadow": str(roles["shadow"]) if "shadow" in roles else None,
              "installed": items}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    src = "[model] card" if "active" not in roles else "installed"
    print(f"active: {active or '?'} ({src})")
    print(f"shadow: {roles.get('shadow', 'off')}")
    print(f"[model] card default: {default or 'unreadable'} ({settings.model.card})"
          + (" - serving" if "active" not in roles else ""))
    if not items:
        print("no model installed (mammo-node model install CARD)")
        return 0
    print(f"\n{'MODEL:VERSION':34s} {'ROLE':7s} {'ARCHITECTURE':22s} {'INPUT':>9s} "
          f"{'THRESH':>6s} {'CV AUC':>6s}  INSTALLED (UTC)   INTENDED USE")
    for it in items:
        auc = it["metrics"].get("pooled_auc")
        print(f"{it['name'] + ':' + it['version']:34s} {it['role']:7s} "
              f"{it['architecture']:22s} {it['input_size']:>3d}/{it['roi_size_mm']:>4g}mm "
              f"{it['threshold']:6.3f} {'-' if auc is None else f'{auc:.3f}':>6s}  "
              f"{it['installed_at'][:16].replace('T', ' ')}  {it['intended_use'][:60]}")
    return 0


def cmd_activate(args: argparse.Namespace) -> int:
    from node.modelstore import ModelStoreError

    settings, db, store = _open(args)
    try:
        if args.default:
            was = store.activate_default()
            default = _default_ref(settings)
            print(f"[model] card ({default or settings.model.card}) is active again"
                  + (f" (was {was})" if was else " (it already was)"))
        else:
            if not args.model:
                return _err("model activate needs NAME[:VERSION] or --default")
            try:
                model, notes = store.activate(args.model, default=_default_ref(settings))
            except ModelStoreError as exc:
                return _err(str(exc))
            print(f"{model.name}:{model.version} is active")
            for n in notes:
                print(f"  {n}")
        print("A running node switches within a few seconds: queued studies and those that "
              "arrive later run on it; an analysis already running finishes on the previous "
              "model. Studies already analysed are not analysed again.")
    finally:
        db.dispose()
    return 0


def cmd_shadow(args: argparse.Namespace) -> int:
    from node.modelstore import ModelStoreError

    settings, db, store = _open(args)
    try:
        if args.off:
            was = store.shadow_off()
            print(f"shadow mode off (was {was})" if was else "shadow mode was off")
            return 0
        if not args.model:
            return _err("model shadow needs NAME[:VERSION] or --off")
        active = store.roles().get("active") or _default_ref(settings)
        try:
            model = store.set_shadow(args.model, active=active)
        except ModelStoreError as exc:
            return _err(str(exc))
        print(f"{model.name}:{model.version} runs in shadow mode beside {active}: on every "
              "study the active model analyses, when nothing is received or analysed; its results "
              "are stored (data_dir/shadow/, the database), never sent. Compare with: "
              "mammo-node model compare")
    finally:
        db.dispose()
    return 0


def _since(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"mammo-node: --since {text!r} is not a date (YYYY-MM-DD[THH:MM])"
                         ) from None
    return when.astimezone(dt.UTC).replace(tzinfo=None) if when.tzinfo else when


def cmd_compare(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from node.db import ShadowRun
    from node.evaluation import compare, render_compare
    from node.modelstore import ModelRef, ModelStoreError, parse_ref

    settings, db, store = _open(args)
    try:
        roles = store.roles()

        def ref(text: str | None, fallback: ModelRef | None) -> ModelRef | None:
            if not text:
                return fallback
            name, version = parse_ref(text)
            if version is None:
                m = store.resolve(text)
                return ModelRef(m.name, m.version)
            return ModelRef(name, version)

        try:
            active = ref(args.active, roles.get("active") or _default_ref(settings))
            last = None
            with db.session() as s:
                row = s.execute(select(ShadowRun.model_name, ShadowRun.model_version)
                                .order_by(ShadowRun.id.desc()).limit(1)).first()
                if row is not None:
                    last = ModelRef(*row)
            shadow = ref(args.shadow, roles.get("shadow") or last)
        except ModelStoreError as exc:
            return _err(str(exc))
        if active is None or shadow is None:
            return _err("no shadow model to compare (mammo-node model shadow NAME[:VERSION])")
        report = compare(db, active, shadow, _since(args.since))
    finally:
        db.dispose()
    print(json.dumps(report, indent=2) if args.json else render_compare(report))
    return 0


# -- outcomes ------------------------------------------------------------------------------------
def cmd_outcomes_import(args: argparse.Namespace) -> int:
    from node.outcomes import OutcomesError, import_outcomes

    settings, db, _ = _open(args)
    try:
        report = import_outcomes(db, Path(args.file), data_dir=settings.node.data_dir,
                                 dry_run=args.dry_run,
                                 rejects=Path(args.rejects) if args.rejects else None)
    except OutcomesError as exc:
        return _err(str(exc))
    finally:
        db.dispose()
    print(report.text(Path(args.file).name) + (" (dry run: nothing written)" if args.dry_run
                                               else ""))
    return 0


def cmd_outcomes_export(args: argparse.Namespace) -> int:
    from node.modelstore import ModelRef, parse_ref
    from node.outcomes import export_training_csv

    settings, db, store = _open(args)
    try:
        model = None
        if args.model:
            name, version = parse_ref(args.model)
            if version is None:
                version = store.resolve(args.model).version
            model = ModelRef(name, version)
        report = export_training_csv(db, Path(args.out), model=model, negatives=args.negatives,
                                     breast_level=args.breast_level)
    finally:
        db.dispose()
    print(report.text(Path(args.out)))
    print(f"next: python -m models import dicom-csv {settings.node.data_dir} --csv {args.out} "
          "--out DIR" + ("" if settings.database.url == "" else " --node-db URL"))
    return 0


def add_commands(sub: argparse._SubParsersAction,
                 common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``model`` and ``outcomes`` on the mammo-node parser."""
    p = sub.add_parser("model", help="install, list, activate, shadow and compare models")
    msub = p.add_subparsers(dest="model_command", required=True)
    sp = msub.add_parser("install", help="verify a model card + weights and install them")
    common(sp)
    sp.add_argument("card", nargs="+", help="model card JSON (the weights next to it)")
    sp.set_defaults(func=cmd_install)
    sp = msub.add_parser("list", help="installed versions, the active and the shadow model")
    common(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_list)
    sp = msub.add_parser("activate", help="serve an installed model (no restart needed)")
    common(sp)
    sp.add_argument("model", nargs="?", help="NAME or NAME:VERSION (NAME: its latest install)")
    sp.add_argument("--default", action="store_true", help="serve [model] card again")
    sp.set_defaults(func=cmd_activate)
    sp = msub.add_parser("shadow", help="run an installed model beside the active one")
    common(sp)
    sp.add_argument("model", nargs="?", help="NAME or NAME:VERSION")
    sp.add_argument("--off", action="store_true", help="stop shadow mode")
    sp.set_defaults(func=cmd_shadow)
    sp = msub.add_parser("compare", help="active vs shadow: agreement, scores, outcomes")
    common(sp)
    sp.add_argument("--since", help="only shadow analyses from this date (YYYY-MM-DD, UTC)")
    sp.add_argument("--active", help="NAME:VERSION (default: the active model)")
    sp.add_argument("--shadow", help="NAME:VERSION (default: the shadow model, else the last "
                                     "one that ran)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_compare)

    p = sub.add_parser("outcomes", help="import biopsy/follow-up outcomes, export labels")
    osub = p.add_subparsers(dest="outcomes_command", required=True)
    sp = osub.add_parser("import", help="link outcomes (CSV) to analysed studies")
    common(sp)
    sp.add_argument("file", help="CSV: study_instance_uid or accession_number, laterality, "
                                 "outcome, [kind], [date], [finding]")
    sp.add_argument("--dry-run", action="store_true", help="check and report, write nothing")
    sp.add_argument("--rejects", help="write the rows not imported, with the reason, here")
    sp.set_defaults(func=cmd_outcomes_import)
    sp = osub.add_parser("export", help="labels CSV for `python -m models import dicom-csv`")
    common(sp)
    sp.add_argument("--out", required=True, help="CSV to write (mode 0600: it holds UIDs)")
    sp.add_argument("--model", help="findings of this NAME:VERSION (default: the active "
                                    "model's latest analysis of each study)")
    sp.add_argument("--negatives", choices=("normal", "benign"), default="normal",
                    help="label of findings in breasts whose outcome is benign or negative")
    sp.add_argument("--breast-level", action="store_true",
                    help="also one unlocated row per breast with an outcome")
    sp.set_defaults(func=cmd_outcomes_export)
