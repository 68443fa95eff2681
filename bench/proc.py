"""Process helpers for the benchmarks: resident memory from /proc (Linux)."""

from __future__ import annotations

from pathlib import Path


def _status_kib(pid: int, field: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a running process, MiB."""
    return _status_kib(pid, "VmHWM") / 1024


def rss_mib(pid: int) -> float:
    """Current resident set size (VmRSS), MiB."""
    return _status_kib(pid, "VmRSS") / 1024
