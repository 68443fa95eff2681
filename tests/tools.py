"""Helpers for tests that need external binaries (dcmtk, dicom3tools, ...)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest


def require_binary(name: str) -> str:
    """The path of executable ``name``.

    Missing binary: the test FAILS when the environment variable ``CI`` is set (a CI image must
    provide it) and is skipped otherwise.
    """
    path = shutil.which(name)
    if path is None:
        message = f"required binary {name!r} not found on PATH"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this is an error)")
        pytest.skip(message)
    return path


def require_shared(relative: str) -> Path:
    """``relative`` under the shared data folder (``../shared/data`` beside the repository, or
    ``$MAMMO_NODE_SHARED_DATA``): real public data too large or too restricted to ship (WG-04
    images, vendor headers under GPL, the full mini-MIAS).

    Missing: the test FAILS when ``CI`` is set (CI provides it) and is skipped otherwise, with
    the path it looked for."""
    from tests.testdata import SHARED_DATA_ENV, find_shared, shared_data_dir

    path = find_shared(relative)
    if path is None:
        message = (f"{relative} not found under {shared_data_dir()} (the project's shared data "
                   f"beside the repository; set {SHARED_DATA_ENV} to point elsewhere)")
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this is an error)")
        pytest.skip(message)
    return path


def run_tool(name: str, args: Sequence[str | Path], timeout: float = 120) -> tuple[int, str]:
    """Run binary ``name`` (see :func:`require_binary`); return (exit code, stdout + stderr)."""
    exe = require_binary(name)
    proc = subprocess.run([exe, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, errors="replace")
    return proc.returncode, proc.stdout + proc.stderr


def dciodvfy_problems(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) lines that ``dciodvfy`` reports for ``path``."""
    _, out = run_tool("dciodvfy", [path])
    lines = out.splitlines()
    errors = [ln for ln in lines if ln.startswith(("Error", "Abort"))]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


def dsrdump(path: Path) -> tuple[int, str]:
    """(exit code, output) of ``dsrdump -Ph +Pn`` on ``path``."""
    return run_tool("dsrdump", ["-Ph", "+Pn", path])


def dcentvfy_lines(paths: Sequence[Path]) -> list[str]:
    """The Error/Warning lines of ``dcentvfy`` over ``paths`` (its exit code is always 0)."""
    _, out = run_tool("dcentvfy", list(paths))
    return [ln for ln in out.splitlines() if ln.startswith(("Error", "Warning", "Abort"))]
