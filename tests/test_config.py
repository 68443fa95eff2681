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


# -- each section checks its own fields, once, where it is parsed (issue 20) --------------------

@pytest.mark.parametrize("raw, message", [
    ({"node": {"port": 0}}, "node.port must be 1-65535, got 0"),
    ({"node": {"pdu_timeout": 100}}, "node.pdu_timeout must be positive and at most "
                                     "node.network_timeout"),
    ({"node": {"trusted_peers": ["*@*"]}},
     "node.trusted_peers[0] '*@*': \"*@*\" would trust everyone"),
    ({"node": {"allowed_peer_ips": ["x"]}},
     "node.allowed_peer_ips[0] is not an IP address or network: 'x'"),
    ({"database": {"migrate": "x"}}, "database.migrate must be \"auto\" or \"off\", got 'x'"),
    ({"cluster": {"roles": ["receive", "x"]}},
     "cluster.roles[1] must be one of receive, analyse, deliver, got 'x'"),
    ({"analysis": {"for_processing": "maybe"}},
     "analysis.for_processing must be \"analyse\" or \"skip\", got 'maybe'"),
    ({"analysis": {"for_processing": 3}}, "analysis.for_processing must be a string, got 3"),
    ({"analysis": {"detector_operating_point": "x"}},
     "analysis.detector_operating_point must be \"card\" or a cluster score in [0, 1], got 'x'"),
    ({"model": {"precision": "x"}}, "model.precision must be auto, fp32, bf16 or fp16, got 'x'"),
    ({"output": {"objects": ["sc", "x"]}}, "output.objects[1] is not an output kind: 'x' "
                                           "(known: tid1500, mammo_cad, gsps, sc)"),
    ({"output": {"sc_series_number": 9901}},
     "output.sc_series_number must differ from output.sr_series_number"),
    ({"output": {"gsps_series_number": 9903}},
     "output.gsps_series_number must differ from output.cad_sr_series_number"),
    ({"output": {"cad_sr_series_number": 2**31}}, "output.cad_sr_series_number out of range"),
    ({"destinations": [{"name": "a", "ae_title": "A", "host": "h", "port": 1},
                       {"name": "b", "ae_title": "B", "host": "h", "port": 0}]},
     "destinations[1].port must be 1-65535, got 0"),
    ({"destinations": [{"name": "a", "ae_title": "A", "host": "h", "port": 1},
                       {"name": "a", "ae_title": "B", "host": "h", "port": 2}]},
     "destinations[1].name must be non-empty and unique, got 'a'"),
    ({"destinations": [{"name": "a", "ae_title": "A", "host": "h", "port": 1,
                        "objects": ["gsps", "gsps"]}]},
     "destinations[0].objects lists an output kind twice"),
    ({"destinations": [{"name": "w", "type": "dicomweb", "url": "http://x/", "auth": "bearer",
                        "token_file": "missing"}]},
     "destinations[0].token_file must name a file holding the token"),
    ({"dicomweb": {"enabled": True, "auth": "none", "port": 11112}},
     "dicomweb.port must differ from node.port"),
    ({"destinations": [{"name": "a", "ae_title": "A", "host": "h", "port": 1, "tls": True}]},
     "tls.ca_certificates must name a PEM file when TLS is used (tls.enabled or a destination "
     "with tls = true)"),
])
def test_the_admin_reads_one_exact_message_naming_the_key(tmp_path: Path, raw: dict,
                                                           message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(raw, tmp_path)
    assert str(err.value) == message


def test_a_section_built_in_code_is_checked_like_a_parsed_one() -> None:
    """The checks are the sections' own (``__post_init__``): no object of a section exists
    with a bad value, wherever it was built, so the stages that take one trust it."""
    import dataclasses

    from node.config import AnalysisSettings, Destination, NodeSettings, OutputSettings

    with pytest.raises(ConfigError, match=r"^node\.port must be 1-65535, got 0$"):
        NodeSettings(port=0)
    with pytest.raises(ConfigError, match=r"^analysis\.for_processing must be"):
        AnalysisSettings(for_processing="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must differ from output.sr_series_number"):
        dataclasses.replace(OutputSettings(), sc_series_number=9901)
    with pytest.raises(ConfigError, match=r"^destination\.host must not be empty$"):
        Destination(name="pacs", ae_title="PACS", host="", port=104)
    with pytest.raises(dataclasses.FrozenInstanceError):
        NodeSettings().port = 1  # type: ignore[misc]


def test_each_section_is_checked_exactly_once_per_parse(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """One ``__post_init__`` per section and per destination: nothing re-checks (or rebuilds)
    a section after it was parsed."""
    import node.config as config

    calls: dict[str, int] = {}
    classes = [*config._SECTIONS.values(), config.Destination, config.Settings]
    for cls in classes:
        original = cls.__post_init__

        def counting(self: object, _original=original, _name=cls.__name__) -> None:
            calls[_name] = calls.get(_name, 0) + 1
            _original(self)

        monkeypatch.setattr(cls, "__post_init__", counting)
    s = parse_settings({"destinations": [
        {"name": "a", "ae_title": "A", "host": "h", "port": 1},
        {"name": "b", "ae_title": "B", "host": "h", "port": 2}]}, DEFAULT.parent)
    assert len(s.destinations) == 2
    assert calls == {**{cls.__name__: 1 for cls in classes}, "Destination": 2}


def test_relative_files_are_resolved_before_the_section_checks_them(tmp_path: Path) -> None:
    """``[dicomweb] users_file`` and a destination's ``password_file`` name files beside the
    configuration: they exist there, so the section's own check passes wherever the node's
    working directory is."""
    (tmp_path / "users").write_text("u:hash\n")
    (tmp_path / "pw").write_text("secret\n")
    s = parse_settings({"dicomweb": {"enabled": True, "users_file": "users"},
                        "destinations": [{"name": "w", "type": "dicomweb",
                                          "url": "https://pacs.example/dicom-web",
                                          "auth": "basic", "username": "u",
                                          "password_file": "pw"}]}, tmp_path)
    assert s.dicomweb.users_file == str(tmp_path / "users")
    assert s.destinations[0].password_file == str(tmp_path / "pw")
