"""A card whose head is the morphology head (the shipped one) builds no CNN and imports no torch.

torch (default CUDA build) and timm are ~700 MiB of the node's resident memory; a node serving the
shipped card never runs the network, so it must not load it. The CNN path itself stays reachable
(``network=True``) for benchmarks and tests on the shipped weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.analysis.classify import Classifier
from tests.modelfixtures import SHIPPED_CARD

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from node.config import load_settings
from node.analysis.pipeline import AnalysisPipeline
from node.analysis.classify import Classifier
s = load_settings(sys.argv[1])
p = AnalysisPipeline(s.model, s.analysis, s.limits)
out = {"head": p.classifier.head_kind, "model": p.classifier.model is not None,
       "torch_after_pipeline": "torch" in sys.modules, "timm_after_pipeline": "timm" in sys.modules}
c = Classifier(s.model.card, device="cpu", network=True)
out["model_when_asked"] = c.model is not None
out["torch_when_asked"] = "torch" in sys.modules
print(json.dumps(out))
"""


def test_shipped_card_node_imports_no_torch_until_a_cnn_is_asked_for() -> None:
    res = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "config.toml")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"head": "morphology", "model": False, "torch_after_pipeline": False,
                   "timm_after_pipeline": False, "model_when_asked": True,
                   "torch_when_asked": True}


def test_morphology_card_without_network_refuses_predict_and_still_checks_weights(
        tmp_path: Path) -> None:
    clf = Classifier(SHIPPED_CARD, device="cpu")
    assert clf.model is None and clf.head_kind == "morphology"
    with pytest.raises(RuntimeError, match="no CNN to run"):
        clf.predict([])
    # the digest of the weights file is checked even though no network is built from it
    card = json.loads(SHIPPED_CARD.read_text())
    shutil.copy(SHIPPED_CARD.with_suffix(".safetensors"), tmp_path / card["weights_file"])
    damaged = tmp_path / card["weights_file"]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(RuntimeError, match="does not match"):
        Classifier(tmp_path / "card.json", device="cpu")


def test_serving_node_on_the_shipped_card_maps_no_torch_library(node_process) -> None:
    """The whole service (receive, pre-analysis, worker, delivery, status page), not only the
    pipeline: no thread of it loads libtorch when the card needs no CNN."""
    node = node_process("no-torch")
    assert node.proc is not None
    maps = Path(f"/proc/{node.proc.pid}/maps")
    if not maps.exists():
        pytest.skip("needs /proc (Linux)")
    mapped = maps.read_text()
    assert "libtorch" not in mapped and "libc10" not in mapped
    assert "morphology head" in node.log_path.read_text()
