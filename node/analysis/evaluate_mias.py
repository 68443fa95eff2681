"""Old name of the mini-MIAS evaluation: ``python -m node.analysis.evaluate_mias`` runs
``python -m bench.evaluate_mias`` (the whole node over DICOM, scored against the ground truth;
see docs/analysis-evaluation.md)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from bench.evaluate_mias import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
