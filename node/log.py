"""Logging: one line per event, UTC timestamps, rotation, no patient identity by default.

Events are written as ``<timestamp> <LEVEL> <logger> <event> key=value ...`` so that an admin can
``tail -f`` and ``grep`` the log. Only :func:`patient_fields` may put PatientID/PatientName in a
line, and only when ``[log] patient_identifiers = true``.

Values come from the network (AE titles, UIDs, error comments, exception messages): a control
character in a calling AE title must not start a forged log line. :func:`_fmt` escapes every
control and non-printable character (``\n`` -> ``\\n``, others ``\\xNN``), quotes values
with spaces, quotes or backslashes and escapes those; the formatter does the same for the message
of every record (pynetdicom's, tracebacks' last lines), and indents traceback lines, so each line
of the file that starts with a timestamp is one record the node wrote.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

# what sys.exc_info() returns (logging.Formatter.formatException's argument)
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

_PATIENT_IDENTIFIERS = False


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"})
_CONTROL.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029, 0x85, 0xFEFF)})


def escape(text: str) -> str:
    """``text`` with every control or line-breaking character written as an escape."""
    return text.translate(_CONTROL)


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{t}.{int(record.msecs):03d}Z"

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: _ExcInfo) -> str:  # noqa: N802
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    """Traceback lines, each indented and escaped: none can pass for a record of its own."""
    return "\n".join("    " + escape(line) for line in text.splitlines())


FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: pynetdicom errors the node reports itself, in one event line with the peer and the reason
#: (node.fastrecv: association.stalled): dropped so that an admin sees one line, not three.
_REPORTED_BY_NODE = ("The received PDU is shorter than expected",)


class _DropReportedByNode(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("pynetdicom") and isinstance(record.msg, str)
                    and record.msg.startswith(_REPORTED_BY_NODE))


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
    stream.addFilter(_DropReportedByNode())
    root.addHandler(stream)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=int(max_mb * 1024 * 1024), backupCount=backup_count, encoding="utf-8"
        )
        handler.setFormatter(formatter)
        handler.addFilter(_DropReportedByNode())
        root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom is chatty at INFO (every PDU); keep its own warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # logs every copied module
    # pydicom logs each failing decoder plugin with a traceback; the node logs one line per
    # image that cannot be decoded, with every plugin's reason, and records it as failed.
    logging.getLogger("pydicom.pixels").setLevel(logging.CRITICAL)


def _fmt(value: Any) -> str:
    """One value of a ``key=value`` pair: quoted when it has spaces, quotes, ``=``, backslashes
    or control characters; backslashes and quotes escaped first, then control characters."""
    text = str(value)
    if text and text.isprintable() and not any(ch in text for ch in ' "=\\'):
        return text
    return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


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
