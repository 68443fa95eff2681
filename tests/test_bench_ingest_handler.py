"""bench.ingest_handler runs the node's own accept_file and reports every stage of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_handler_probe_reports_each_stage_and_they_add_up() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.ingest_handler", "--format", "tiny",
                          "--studies", "1", "--rounds", "1"], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=300).stdout
    rows = {tuple(line.split()[:2]): [float(x) for x in line.split()[2:]]
            for line in out.splitlines() if line.startswith("node ")}
    assert set(rows) == {("node", "wall"), ("node", "cpu")}, out
    header, adopt, database, whole, duplicate = rows[("node", "wall")]
    assert min(header, adopt, database, duplicate) > 0, out
    # The stages are parts of the whole call (medians of the same instances: allow slack).
    assert header + adopt + database <= whole * 1.5, out
    assert "load average" in out
