"""config.toml: the default file, the contract key names, and one clear message per bad key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from node.config import ConfigError, load_settings, parse_settings
from tests.netutil import REPO

DEFAULT = REPO / "config.toml"


def test_default_config_loads_with_contract_keys() -> None:
    s = load_settings(DEFAULT)
    assert (s.node.ae_title, s.node.port, s.node.allowed_calling_aets) == ("MAMMO_AI", 11112, [])
    assert s.study.stable_seconds == 30
    assert s.database_url.startswith("sqlite:///") and s.node.data_dir.is_absolute()
    assert s.model.device == "auto"
    raw = tomllib.loads(DEFAULT.read_text())
    for section, keys in {"node": ["ae_title", "host", "port", "allowed_calling_aets",
                                   "data_dir"], "database": ["url"], "study": ["stable_seconds"],
                          "log": ["level", "file"]}.items():
        for key in keys:
            assert key in raw[section], f"{section}.{key}"


def test_every_key_in_default_config_is_commented() -> None:
    lines = DEFAULT.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), f"key without comment: {line}"


@pytest.mark.parametrize(
    "text, key",
    [
        ("[node]\nae_tittle = 'X'\n", "node.ae_tittle"),
        ("[node]\nport = 'eleven'\n", "node.port"),
        ("[node]\nport = 70000\n", "node.port"),
        ("[study]\nstable_seconds = -1\n", "study.stable_seconds"),
        ("[model]\ndevice = 'tpu'\n", "model.device"),
        ("[model]\nthreshold = 1.5\n", "model.threshold"),
        ("[analysis]\nfor_processing = 'maybe'\n", "analysis.for_processing"),
        ("[analysis]\nmax_rois_per_image = 0\n", "analysis.max_rois_per_image"),
        ("[[destinations]]\nname = 'p'\nae_title = 'P'\nhost = 'h'\n", "destinations[0].port"),
        ("[frobnicate]\nx = 1\n", "frobnicate"),
        ("[node]\nae_title = 'A\\\\B'\n", "node.ae_title"),
    ],
)
def test_bad_key_or_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert key in str(err.value)


def test_serve_stops_with_one_message_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[node]\nport = 0\n")
    proc = subprocess.run([sys.executable, "-m", "node", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "node.port" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("problem", ["missing card", "wrong architecture"])
def test_serve_stops_when_the_model_card_is_unusable(tmp_path: Path, problem: str) -> None:
    card = tmp_path / "nope.json" if problem == "missing card" else (
        REPO / "models/weights/calc-cluster-lite0.json")
    arch = "efficientnet_b3" if problem == "wrong architecture" else "tf_efficientnet_lite0"
    path = tmp_path / "c.toml"
    path.write_text(f"[node]\ndata_dir = '{tmp_path / 'data'}'\nport = 11999\n"
                    f"[model]\ncard = '{card}'\narchitecture = '{arch}'\n")
    proc = subprocess.run([sys.executable, "-m", "node", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mammo-node: cannot start:")
    assert ("nope.json" in last) if problem == "missing card" else ("efficientnet_b3" in last)


def test_shipped_config_lists_the_default_other_sop_classes() -> None:
    from node.intake import DEFAULT_OTHER_SOP_CLASSES

    shipped = load_settings(REPO / "config.toml")
    assert shipped.study.other_sop_classes == list(DEFAULT_OTHER_SOP_CLASSES)
    assert shipped.study.other_objects == "discard"
    assert shipped.analysis.synthesized_2d == "skip"


def test_model_card_relative_paths_and_the_packaged_default(tmp_path: Path) -> None:
    from node.config import SHIPPED_CARD

    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    # Absent, or the shipped name with no such file beside the config: the packaged card.
    assert parse_settings({}, elsewhere).model.card == SHIPPED_CARD
    assert parse_settings({"model": {"card": "models/weights/calc-cluster-lite0.json"}},
                          elsewhere).model.card == SHIPPED_CARD
    # Any other relative path stays relative to the config file, also for the shipped name
    # when a file of that name is there.
    assert parse_settings({"model": {"card": "cards/mine.json"}}, elsewhere).model.card == \
        elsewhere / "cards/mine.json"
    own = elsewhere / "models/weights/calc-cluster-lite0.json"
    own.parent.mkdir(parents=True)
    own.write_text("{}")
    assert parse_settings({"model": {"card": "models/weights/calc-cluster-lite0.json"}},
                          elsewhere).model.card == own


@pytest.mark.slow
def test_default_config_copied_elsewhere_starts_the_node(tmp_path: Path) -> None:
    """``cp config.toml /etc/mammo-node/node.toml`` (only port, address and data_dir edited)
    and the node starts from another working directory with the shipped model."""
    from tests.netutil import free_port, wait_for_port

    etc = tmp_path / "etc" / "mammo-node"
    etc.mkdir(parents=True)
    port = free_port()
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"', 1)
    text = text.replace("port = 11112", f"port = {port}", 1)
    text = text.replace('data_dir = "var"', f'data_dir = "{tmp_path / "var"}"', 1)
    assert 'card = "models/weights/calc-cluster-lite0.json"' in text
    config = etc / "node.toml"
    config.write_text(text, encoding="utf-8")
    workdir = tmp_path / "somewhere-else"
    workdir.mkdir()
    log = open(tmp_path / "node.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(config)],
                            cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 120, proc)
        echo = subprocess.run([sys.executable, "-m", "node", "echo", "--config", str(config)],
                              cwd=workdir, capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0 and "0x0000" in echo.stdout, echo.stdout + echo.stderr
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    out = (tmp_path / "node.out").read_text(errors="replace")
    assert "node.started" in out and "model=" in out, out[-2000:]
