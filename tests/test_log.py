"""The log line format (node/log.py): UTC timestamps, escaped messages, indented tracebacks."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from node.log import event, setup_logging


def test_lines_have_utc_timestamps_and_tracebacks_are_indented(tmp_path: Path) -> None:
    file = tmp_path / "node.log"
    setup_logging("INFO", file)
    log = logging.getLogger("node.test_log")
    before = time.gmtime()
    try:
        event(log, "first.event", calling_ae="EVIL\nAE")
        try:
            raise ValueError("bad\nline")
        except ValueError:
            log.exception("second.event")
    finally:
        setup_logging("INFO")  # closes the file handler
    lines = file.read_text(encoding="utf-8").splitlines()
    stamp = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d{3}Z ")
    first = stamp.match(lines[0])
    assert first is not None, lines[0]
    # UTC, not local time: the hour is gmtime's (the test may straddle a second, not an hour)
    assert first.group(1)[:13] == time.strftime("%Y-%m-%dT%H", before), lines[0]
    assert lines[0].endswith('first.event calling_ae="EVIL\\nAE"')
    assert stamp.match(lines[1]) and lines[1].endswith("second.event")
    # every traceback line is indented: only the node's records start with a timestamp
    assert len(lines) > 3 and all(line.startswith("    ") for line in lines[2:]), lines
    assert lines[-2:] == ["    ValueError: bad", "    line"]
