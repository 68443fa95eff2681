"""The service runs without the research extra: scikit-learn, matplotlib and tqdm are
``mammo-node[research]`` dependencies only (pyproject.toml).

A subprocess makes those packages unimportable, imports every module of the service package,
loads the default configuration's analyser (the shipped card, its detector) and analyses a
mammogram; any import of a research-only package on that path fails the test.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESEARCH_ONLY = ("sklearn", "matplotlib", "tqdm")

SCRIPT = textwrap.dedent("""
    import builtins, importlib, pkgutil, sys, tempfile
    from pathlib import Path

    BLOCKED = set(sys.argv[1].split(","))
    real_import, real_import_module = builtins.__import__, importlib.import_module

    def check(name):
        if name and name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (research-only, blocked)")

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0:
            check(name)
        return real_import(name, globals, locals, fromlist, level)

    def guarded_import_module(name, package=None):
        check(name)
        return real_import_module(name, package)

    # (importlib.util.find_spec probes stay answered: torch probes optional packages that way)
    builtins.__import__, importlib.import_module = guarded_import, guarded_import_module
    import node
    for m in pkgutil.walk_packages(node.__path__, "node."):
        importlib.import_module(m.name)

    import numpy as np
    import pydicom
    from node.analysis.result import ImageInput
    from node.config import load_settings
    from node.service import load_analyser
    from tests.testdata import mg_dataset, mias_pixels

    settings = load_settings(Path("config.toml"))
    analyser = load_analyser(settings)
    ds = mg_dataset(mias_pixels("mdb209"), patient_id="P", study_uid="1.2.826.0.1.9.1",
                    sop_uid="1.2.826.0.1.9.1.1", laterality="R", view="MLO", spacing_mm=0.2)
    path = Path(tempfile.mkdtemp()) / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = analyser.analyse("1.2.826.0.1.9.1",
                           [ImageInput(path, ds.SOPInstanceUID, ds.SOPClassUID)])
    assert out.images and out.images[0].analysed, out
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ANALYSED", len(out.images[0].findings))
""")


def test_the_service_imports_and_analyses_without_research_packages() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(RESEARCH_ONLY)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ANALYSED" in proc.stdout
