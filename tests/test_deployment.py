"""The deployment files agree with each other and with the code (Docker cannot run here).

The compose file parses and mounts files that exist; the Dockerfile copies paths that exist and
its default configuration loads; docker/node.toml, the Orthanc configuration and the Lua script
name the same AE titles, hosts and ports; the systemd unit passes ``systemd-analyze verify``.
Auto-routing itself runs for real in tests/test_docker_orthanc.py.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from node.config import Settings, parse_settings
from tests.netutil import REPO
from tests.tools import run_tool

DOCKER = REPO / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _node_toml() -> Settings:
    raw = tomllib.loads((DOCKER / "node.toml").read_text())
    return parse_settings(raw, base_dir=Path("/etc/mammo-node"))


def _in_image(path: Path) -> Path:
    """Where a path inside the image (/app/...) comes from in the repository."""
    return REPO / path.relative_to("/app")


def test_compose_services_and_mounts_exist() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"orthanc", "node", "viewer", "prometheus", "grafana"}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{source} (mounted at {target}) is missing"
            else:
                assert source in compose["volumes"], f"named volume {source} not declared"
    build = services["node"]["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).is_file()
    # The node is started with the configuration the compose file mounts.
    command = services["node"]["command"]
    config = command[command.index("--config") + 1]
    assert f"./node.toml:{config}:ro" in services["node"]["volumes"]
    assert "./orthanc:/etc/orthanc:ro" in services["orthanc"]["volumes"]
    assert services["orthanc"]["command"] == ["/etc/orthanc/"]


def test_compose_viewer_and_monitoring_agree() -> None:
    compose = _compose()
    services = compose["services"]
    # Everything but DICOM from the modalities is published on the host's loopback only.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:") or port == "4242:4242", (name, port)
    viewer = services["viewer"]
    dockerfile = DOCKER / "viewer" / "Dockerfile"
    assert (DOCKER / viewer["build"]["context"]).resolve() == REPO
    assert (REPO / viewer["build"]["dockerfile"]) == dockerfile
    text = dockerfile.read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = shlex.split(line)
        for src in sources:
            assert (REPO / src).exists(), f"viewer Dockerfile copies {src}, which is missing"
    # Every variable of the nginx template is set by the image or the compose file, and the
    # nginx image substitutes exactly those.
    template = (DOCKER / "viewer" / "nginx.conf.template").read_text()
    variables = set(re.findall(r"\$\{([A-Z_]+)\}", template))
    env = dict(viewer["environment"])
    image_env = set(re.findall(r"\b([A-Z_]+)=", text.split("ENV", 1)[1]))
    assert variables <= set(env) | image_env, variables - set(env) - image_env
    assert set(re.findall(r"[A-Z_]{4,}", env["NGINX_ENVSUBST_FILTER"])) == variables
    # The viewer reaches Orthanc as a registered Orthanc user, with a real credential.
    site = json.loads((DOCKER / "orthanc" / "site.json").read_text())
    user, _, password = base64.b64decode(env["ORTHANC_AUTHORIZATION"].split()[1]).decode() \
        .partition(":")
    assert site["RegisteredUsers"][user] == password
    assert env["ORTHANC_URL"] == f"http://orthanc:{site['HttpPort']}"
    orthanc = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    assert orthanc["DicomWeb"]["Enable"] and orthanc["DicomWeb"]["Root"] == "/dicom-web/"
    mounts = dict(v.split(":")[:2] for v in viewer["volumes"])
    app_config = (DOCKER / "viewer" / "app-config.js").read_text()
    assert mounts["./viewer/app-config.js"] == re.search(r"OHIF_APP_CONFIG=(\S+)", text).group(1)
    assert "qidoRoot: window.location.origin + '/dicom-web'" in app_config
    # Prometheus scrapes the node's [http] port; Grafana reads that Prometheus.
    node = _node_toml()
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"node:{node.http.port}"]
    assert job["metrics_path"] == "/metrics"
    grafana = services["grafana"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml")
                                .read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]


def test_dockerfile_copies_existing_paths_and_its_default_config_loads() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11", text, re.M)
    assert "FROM ${BASE_IMAGE}" in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = shlex.split(line)
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    # The image's default configuration: config.toml with the sed edits of the Dockerfile.
    seds = re.findall(r"-e '(s\|[^']+)'", text)
    assert len(seds) == 2
    conf = (REPO / "config.toml").read_text()
    for expr in seds:
        _, pattern, replacement, _ = expr.split("|")
        conf, n = re.subn(pattern.replace("^", "(?m)^", 1), replacement, conf)
        assert n == 1, f"{expr} does not match config.toml any more"
    settings = parse_settings(tomllib.loads(conf), base_dir=Path("/etc/mammo-node"))
    assert settings.node.data_dir == Path("/data")
    assert _in_image(settings.model.card).is_file()
    # torch in the image is the version pyproject.toml pins.
    pins = re.findall(r'"(torch(?:vision)?==[\d.]+)"',
                      (REPO / "pyproject.toml").read_text())
    for pin in pins:
        assert pin in text
    # Docker's build context leaves out the virtual environment and the tests.
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_node_orthanc_and_lua_agree() -> None:
    node = _node_toml()
    compose = _compose()
    orthanc = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    site = json.loads((DOCKER / "orthanc" / "site.json").read_text())
    lua = (DOCKER / "orthanc" / "autorouting.lua").read_text()
    # Orthanc refuses a key that appears in two of its configuration files.
    assert not set(orthanc) & set(site), set(orthanc) & set(site)
    for script in orthanc["LuaScripts"]:
        assert (DOCKER / "orthanc" / script).is_file()
    modality = re.search(r"NODE_MODALITY = '([^']+)'", lua).group(1)
    manufacturer = re.search(r"NODE_MANUFACTURER = '([^']+)'", lua).group(1)
    routed = re.search(r"ROUTED = '([^']+)'", lua).group(1)
    target = site["DicomModalities"][modality]
    assert target == {"AET": node.node.ae_title, "Host": "node", "Port": node.node.port}
    assert "node" in compose["services"]
    assert manufacturer == node.output.manufacturer
    assert routed in orthanc["UserMetadata"]
    # The node sends its results back to this Orthanc, and only it may send to the node.
    (dest,) = node.destinations
    assert (dest.ae_title, dest.host, dest.port) == (orthanc["DicomAet"], "orthanc",
                                                     site["DicomPort"])
    assert node.node.allowed_calling_aets == [orthanc["DicomAet"]]
    assert orthanc["DicomAlwaysAllowStore"] is True
    # The monitoring server is on, and published on the host's loopback only.
    assert node.http.enabled and node.http.host == "0.0.0.0"
    assert f"127.0.0.1:{node.http.port}:{node.http.port}" in compose["services"]["node"]["ports"]
    assert str(node.http.port) in str(compose["services"]["node"]["healthcheck"]["test"])
    assert _in_image(node.model.card).is_file()
    assert node.node.data_dir == Path("/data")


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (REPO / "docs" / "systemd" / "mammo-node.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", unit, re.M).group(1)
    assert exec_start == "/opt/mammo-node/.venv/bin/mammo-node"
    # verify checks that the program exists: point it at this checkout's entry point.
    local = tmp_path / "mammo-node.service"
    local.write_text(unit.replace(exec_start, str(REPO / ".venv" / "bin" / "mammo-node")))
    code, out = run_tool("systemd-analyze", ["verify", local])
    assert code == 0 and out.strip() == "", out
    assert "ReadWritePaths=/var/lib/mammo-node" in unit
    assert "--config /etc/mammo-node/config.toml" in unit
