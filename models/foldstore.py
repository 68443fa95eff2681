"""Per-fold checkpoints, so that a killed cross-validation resumes from its last finished fold.

After each fold the runner writes one small JSON file (the fold's test indices, predictions and
metrics, plus a fingerprint of everything that determines them: data, folds, recipe,
architecture, initialisation, input size). A restarted run with the same fingerprint loads the
finished folds instead of training them again; any difference in the fingerprint (other data,
another seed or epoch budget) makes the old files invisible, so a stale fold is never mixed into
a new table. Files are written atomically (temporary file, fsync, rename): a kill during the
write leaves the previous state, never half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np


def digest(*parts: Any) -> str:
    """Short SHA-256 of JSON-serialisable parts (arrays are hashed by value)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
            h.update(str(part.dtype).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "config"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class FoldStore:
    """Finished folds of one configuration under ``root/<config>/fold<k>.json``."""

    def __init__(self, root: Path, config_label: str, fingerprint: str) -> None:
        self.dir = Path(root) / slug(config_label)
        self.fingerprint = fingerprint

    def path(self, fold: int) -> Path:
        return self.dir / f"fold{fold}.json"

    def load(self, fold: int) -> dict[str, Any] | None:
        """The finished fold's record, or None (absent, unreadable or another fingerprint)."""
        p = self.path(fold)
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return rec if rec.get("fingerprint") == self.fingerprint else None

    def save(self, fold: int, record: dict[str, Any]) -> None:
        rec = dict(record, fingerprint=self.fingerprint, fold=fold)
        atomic_write_text(self.path(fold), json.dumps(rec, indent=1) + "\n")
