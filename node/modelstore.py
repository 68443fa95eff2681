"""Installed models: every version kept, immutable, under ``data_dir/models/<name>/<version>/``.

``mammo-node model install CARD`` runs the card contract of :func:`models.verify.verify_card`
(card parses, weights SHA-256, timm architecture, 2 classes, input size, data licence and
intended use present, strict load and a finite forward pass, cluster/lesion ROIs) and copies
the card (as ``card.json``) and its weights into a fresh folder, which is renamed into place only
when complete, made read-only and recorded with both hashes in ``installed_models``. Installing
the same card again changes nothing; a different card or weights under an installed name and
version is refused (a version, once installed, never changes: bump the version).

Roles (table ``model_roles``): ``active`` serves the results, ``shadow`` runs beside it and is
never delivered (node.shadow). No ``active`` row means ``[model] card`` of config.toml serves.
A running node polls the roles (node.activemodel) and switches without a restart.

This module imports no torch; only :meth:`ModelStore.install` (through models.verify) does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.card import ModelCard, sha256_of
from node.db import Database, InstalledModel, ModelEvent, ModelRole, utcnow
from node.store import _fsync_dir

# A name or version becomes a folder name: letters, digits and . _ + - only, starting with a
# letter or digit (so never "." or ".."), at most 64 characters.
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
ROLES = ("active", "shadow")
CARD_FILE = "card.json"


class ModelStoreError(Exception):
    """A lifecycle command that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class InstallResult:
    model: InstalledModel
    already_installed: bool
    warnings: tuple[str, ...] = ()


def parse_ref(text: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:VERSION`` -> (name, version or None)."""
    name, _, version = text.strip().partition(":")
    if not name or (_ and not version):
        raise ModelStoreError(f"{text!r} is not NAME or NAME:VERSION")
    return name, version or None


def headline_metrics(card: ModelCard) -> dict[str, object]:
    """The card's summary numbers worth a column in ``model list`` (cross-validated AUC, n)."""
    m = card.metrics or {}
    out: dict[str, object] = {}
    for key in ("pooled_auc", "pooled_auc_ci95", "cluster_only_auc", "n_rois", "source", "data"):
        if key in m and not isinstance(m[key], dict):
            out[key] = m[key]
    at = m.get("pooled_at_threshold")
    if isinstance(at, dict):
        for key in ("sensitivity", "specificity"):
            if isinstance(at.get(key), int | float):
                out[key] = at[key]
    return out


class ModelStore:
    """The installed versions (files + ``installed_models``) and the roles."""

    def __init__(self, db: Database, data_dir: Path) -> None:
        self.db = db
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "models"

    # -- install -------------------------------------------------------------------------------
    def install(self, card_path: Path, *, load: bool = True) -> InstallResult:
        """Verify ``card_path`` + its weights and keep an immutable copy (module docstring)."""
        from models.verify import verify_card

        card_path = Path(card_path)
        v = verify_card(card_path, load=load)
        if not v.ok or v.card is None:
            raise ModelStoreError("refused by the card contract (models/README.md, "
                                  "\"Installing a model\"):\n" + v.text())
        card = v.card
        for what, value in (("name", card.name), ("version", card.version)):
            if not _SAFE.match(value):
                raise ModelStoreError(
                    f"card {what} {value!r} cannot name a folder: use letters, digits and "
                    ". _ + - only (at most 64, starting with a letter or digit)")
        weights_src = card.weights_path(card_path)
        weights_name = Path(card.weights_file).name
        if not _SAFE_FILE.match(weights_name) or weights_name == CARD_FILE:
            raise ModelStoreError(f"weights file name {card.weights_file!r} cannot be kept: use "
                                  f"letters, digits and . _ + - (and not {CARD_FILE})")
        files = [(weights_src, weights_name, card.weights_sha256)]
        detector_name = Path(card.detector_file).name if card.detector_file else ""
        detector_src = card.detector_path(card_path)  # None when the card names no detector
        # verified above (models.verify): the detector is kept beside the card too
        if detector_name and detector_src is not None:
            if not _SAFE_FILE.match(detector_name) or detector_name in (CARD_FILE, weights_name):
                raise ModelStoreError(f"detector file name {card.detector_file!r} cannot be "
                                      "kept: use letters, digits and . _ + -")
            files.append((detector_src, detector_name, sha256_of(detector_src)))
        stored = card if (card.weights_file, card.detector_file) == (
            weights_name, detector_name) else replace(
            card, weights_file=weights_name, detector_file=detector_name)
        card_bytes = (card_path.read_bytes() if stored is card
                      else stored.to_json().encode("utf-8"))
        card_sha = hashlib.sha256(card_bytes).hexdigest()
        relpath = f"models/{card.name}/{card.version}"
        target = self.data_dir / relpath
        with self.db.session() as s:
            row = s.execute(select(InstalledModel).where(
                InstalledModel.name == card.name, InstalledModel.version == card.version)
            ).scalar()
        if row is not None:
            if row.weights_sha256 == card.weights_sha256 and row.card_sha256 == card_sha:
                problems = self.check_files(row)
                if problems:  # the same content again repairs a damaged copy
                    _remove_tree(target)
                    self._copy_into_place(card_bytes, files, target)
                    with self.db.session() as s:
                        s.add(ModelEvent(action="repair", name=card.name, version=card.version,
                                         detail="; ".join(problems)[:2000]))
                    return InstallResult(row, True, (*v.warnings, "the installed copy was "
                                                     "damaged and is repaired: "
                                                     + "; ".join(problems)))
                return InstallResult(row, True, tuple(v.warnings))
            raise ModelStoreError(
                f"{card.name}:{card.version} is already installed with other "
                f"{'weights' if row.weights_sha256 != card.weights_sha256 else 'card content'}"
                f" (installed versions never change): give the new model another version")
        if not target.exists():
            self._copy_into_place(card_bytes, files, target)
        elif not self._same_files(target, card_sha, files):
            raise ModelStoreError(f"{target} exists but holds other files and is not recorded "
                                  "as installed; move it away and install again")
        row = InstalledModel(
            name=card.name, version=card.version, architecture=card.architecture,
            input_size=card.input_size, roi_size_mm=card.roi_size_mm, threshold=card.threshold,
            weights_sha256=card.weights_sha256, card_sha256=card_sha, relpath=relpath,
            card_file=CARD_FILE, weights_file=weights_name,
            detector_file=detector_name, detector_sha256=files[1][2] if detector_name else "",
            intended_use=card.intended_use,
            data_licence=card.data_licence,
            metrics=json.dumps(headline_metrics(card), sort_keys=True))
        with self.db.session() as s:
            s.add(row)
            s.add(ModelEvent(action="install", name=card.name, version=card.version,
                             detail=f"weights sha256 {card.weights_sha256}"))
        return InstallResult(row, False, tuple(v.warnings))

    def _copy_into_place(self, card_bytes: bytes, files: list[tuple[Path, str, str]],
                         target: Path) -> None:
        """Copy the card and ``files`` ((source, name, sha256): the weights, the detector) into
        a fresh folder, fsync, check the hashes, make read-only, rename into place."""
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.root / f".incoming-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True, mode=0o700)
        try:
            for src_path, name, _ in files:
                with open(src_path, "rb") as src, open(tmp / name, "xb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
            with open(tmp / CARD_FILE, "xb") as dst:
                dst.write(card_bytes)
                dst.flush()
                os.fsync(dst.fileno())
            for src_path, name, sha in files:
                if sha256_of(tmp / name) != sha:
                    raise ModelStoreError(f"{src_path} changed while it was copied; try again")
            for name in [CARD_FILE, *(n for _, n, _ in files)]:
                os.chmod(tmp / name, 0o400)
            os.chmod(tmp, 0o500)
            os.rename(tmp, target)
        except BaseException:
            _remove_tree(tmp)
            raise
        _fsync_dir(target.parent)

    @staticmethod
    def _same_files(folder: Path, card_sha: str, files: list[tuple[Path, str, str]]) -> bool:
        card = folder / CARD_FILE
        return card.is_file() and sha256_of(card) == card_sha and all(
            (folder / name).is_file() and sha256_of(folder / name) == sha
            for _, name, sha in files)

    # -- what is installed ---------------------------------------------------------------------
    def installed(self) -> list[InstalledModel]:
        with self.db.session() as s:
            return list(s.execute(select(InstalledModel).order_by(
                InstalledModel.name, InstalledModel.installed_at, InstalledModel.id)).scalars())

    def resolve(self, text: str) -> InstalledModel:
        """``NAME:VERSION``, or ``NAME`` for its most recently installed version."""
        name, version = parse_ref(text)
        with self.db.session() as s:
            q = select(InstalledModel).where(InstalledModel.name == name)
            if version is not None:
                q = q.where(InstalledModel.version == version)
            row = s.execute(q.order_by(InstalledModel.installed_at.desc(),
                                       InstalledModel.id.desc()).limit(1)).scalar()
        if row is None:
            known = ", ".join(f"{m.name}:{m.version}" for m in self.installed()) or "none"
            raise ModelStoreError(f"{text} is not installed (installed: {known}); "
                                  "install it with: mammo-node model install CARD")
        return row

    def get(self, ref: ModelRef) -> InstalledModel | None:
        with self.db.session() as s:
            return s.execute(select(InstalledModel).where(
                InstalledModel.name == ref.name, InstalledModel.version == ref.version)).scalar()

    def card_path(self, model: InstalledModel) -> Path:
        return self.data_dir / model.relpath / model.card_file

    def check_files(self, model: InstalledModel) -> list[str]:
        """Problems with the installed copy (missing file, hash changed): empty when intact."""
        folder = self.data_dir / model.relpath
        problems = []
        kept = [(model.card_file, model.card_sha256), (model.weights_file, model.weights_sha256)]
        if model.detector_file:
            kept.append((model.detector_file, model.detector_sha256))
        for name, sha in kept:
            path = folder / name
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif sha256_of(path) != sha:
                problems.append(f"{path} does not match its recorded sha256")
        return problems

    # -- roles ---------------------------------------------------------------------------------
    def roles(self) -> dict[str, ModelRef]:
        with self.db.session() as s:
            return {r.role: ModelRef(r.name, r.version)
                    for r in s.execute(select(ModelRole)).scalars()}

    def activate(self, text: str, *, default: ModelRef | None = None) -> tuple[InstalledModel,
                                                                                 list[str]]:
        """Make an installed model the active one; returns it and notes for the user."""
        model = self._servable(text)
        ref = ModelRef(model.name, model.version)
        notes = []
        with self.db.session() as s:
            current = s.get(ModelRole, "active")
            previous = (ModelRef(current.name, current.version) if current is not None
                        else default)
            _set_role(s, "active", ref)
            shadow = s.get(ModelRole, "shadow")
            if shadow is not None and (shadow.name, shadow.version) == (ref.name, ref.version):
                s.delete(shadow)
                notes.append(f"{ref} was the shadow model: shadow mode is now off")
            s.add(ModelEvent(action="activate", name=ref.name, version=ref.version,
                             detail=f"previous {previous or 'none'}"))
        if previous == ref:
            notes.append(f"{ref} was already active")
        return model, notes

    def activate_default(self) -> ModelRef | None:
        """Back to ``[model] card``; returns the model that was active (None: already)."""
        return self._clear("active", "default", "[model] card of config.toml serves again")

    def set_shadow(self, text: str, *, active: ModelRef | None) -> InstalledModel:
        model = self._servable(text)
        ref = ModelRef(model.name, model.version)
        if active == ref:
            raise ModelStoreError(f"{ref} is the active model; a shadow model runs beside it")
        with self.db.session() as s:
            _set_role(s, "shadow", ref)
            s.add(ModelEvent(action="shadow", name=ref.name, version=ref.version))
        return model

    def shadow_off(self) -> ModelRef | None:
        return self._clear("shadow", "shadow_off")

    def _clear(self, role: str, action: str, detail: str = "") -> ModelRef | None:
        with self.db.session() as s:
            current = s.get(ModelRole, role)
            if current is None:
                return None
            ref = ModelRef(current.name, current.version)
            s.delete(current)
            s.add(ModelEvent(action=action, name=ref.name, version=ref.version, detail=detail))
        return ref

    def _servable(self, text: str) -> InstalledModel:
        model = self.resolve(text)
        problems = self.check_files(model)
        if problems:
            raise ModelStoreError(f"{model.name}:{model.version} cannot be served: "
                                  f"{'; '.join(problems)} (install it again from its card)")
        return model

    def record(self, action: str, ref: ModelRef | None, detail: str = "") -> None:
        """An event written by a running node (loaded, load_failed)."""
        with self.db.session() as s:
            s.add(ModelEvent(action=action, name=ref.name if ref else "",
                             version=ref.version if ref else "", detail=detail[:2000]))

    def events(self, limit: int = 20) -> list[ModelEvent]:
        with self.db.session() as s:
            return list(s.execute(select(ModelEvent).order_by(ModelEvent.id.desc())
                                  .limit(limit)).scalars())


def _set_role(s: Session, role: str, ref: ModelRef) -> None:
    row = s.get(ModelRole, role)
    if row is None:
        s.add(ModelRole(role=role, name=ref.name, version=ref.version, changed_at=utcnow()))
    else:
        row.name, row.version, row.changed_at = ref.name, ref.version, utcnow()


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for p in [path, *path.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o700)
    shutil.rmtree(path, ignore_errors=True)
