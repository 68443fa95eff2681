"""Logging: one line per event, UTC timestamps, rotation, no patient identity by default.

Events are written as ``<timestamp> <LEVEL> <logger> <event> key=value ...`` so that an admin can
``tail -f`` and ``grep`` the log. Only :func:`patient_fields` may put PatientID/PatientName in a
line, and only when ``[log] patient_identifiers = true``.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Any

_PATIENT_IDENTIFIERS = False


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        t = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created))
        return f"{t}.{int(record.msecs):03d}Z"


FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(
    level: str = "INFO",
    file: Path | None = None,
    max_mb: float = 50,
    backup_count: int = 10,
    patient_identifiers: bool = False,
) -> None:
    """Configure the root logger (stderr + rotating file). Safe to call more than once."""
    global _PATIENT_IDENTIFIERS
    _PATIENT_IDENTIFIERS = patient_identifiers
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = _UTCFormatter(FORMAT)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=int(max_mb * 1024 * 1024), backupCount=backup_count, encoding="utf-8"
        )
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom is chatty at INFO (every PDU); keep its own warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # logs every copied module


def _fmt(value: Any) -> str:
    text = str(value)
    if not text or any(ch in text for ch in ' "='):
        return '"' + text.replace('"', "'") + '"'
    return text


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event line: ``name key=value ...`` (None values are left out)."""
    if not logger.isEnabledFor(level):
        return
    parts = [name] + [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None]
    logger.log(level, " ".join(parts))


def patient_fields(patient_id: str | None, patient_name: str | None) -> dict[str, str]:
    """PatientID/Name for a log line, or nothing unless the config allows it."""
    if not _PATIENT_IDENTIFIERS:
        return {}
    return {"patient_id": str(patient_id or ""), "patient_name": str(patient_name or "")}
