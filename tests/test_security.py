"""Security: DICOM TLS with mutual authentication against dcmtk, peer-IP allow-list, file
permissions and patient identity in the log.

Certificates are made with the openssl command line in tmp_path: a test CA, the node's
certificate, a client (modality) certificate, a PACS certificate, and a client certificate from
another CA that the node must not trust.
"""

from __future__ import annotations

import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from node import metrics
from node.db import Database
from node.receive import Receiver
from node.store import Spool
from tests.netutil import NodeProcess, storescu, wait_until
from tests.receivers import local_receiver
from tests.reliability import RecordingSCP, delivered_studies, stored_sop_uids
from tests.smallstudies import small_study, sop_uids
from tests.tools import require_binary

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

_EXT = "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n" \
       "keyUsage=digitalSignature,keyEncipherment\n"


def _openssl(*args: str | Path) -> None:
    subprocess.run([require_binary("openssl"), *map(str, args)], check=True,
                   capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
             "-days", "2", "-subj", f"/CN={name}", "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext",
             "keyUsage=critical,keyCertSign,cRLSign")
    return key, crt


def _leaf(d: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, csr, crt, ext = (d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt",
                          d / f"{name}.ext")
    ext.write_text(_EXT)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj",
             f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
             "-out", crt, "-days", "2", "-extfile", ext)
    return key, crt


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "test-ca")
    other = _ca(d, "other-ca")
    return {"ca": ca, "node": _leaf(d, "node", ca), "modality": _leaf(d, "modality", ca),
            "pacs": _leaf(d, "pacs", ca), "intruder": _leaf(d, "intruder", other)}


def test_tls_mutual_authentication_with_dcmtk(tmp_path: Path, pki: dict) -> None:
    ca = str(pki["ca"][1])
    pacs = RecordingSCP(tmp_path / "pacs")
    pacs.extra = ["+tls", str(pki["pacs"][0]), str(pki["pacs"][1]), "+cf", ca]
    pacs.start()
    node = NodeProcess(
        tmp_path / "node", [{**pacs.destination(), "tls": True}],
        study={"stable_seconds": 600, "complete_on_four_views": True},
        tls={"enabled": True, "certificate": str(pki["node"][1]),
             "private_key": str(pki["node"][0]), "ca_certificates": ca,
             "require_client_certificate": True, "handshake_timeout_seconds": 2}).start()
    study = small_study(tmp_path / "in", 1, tag="sec")
    tls_ok = ["+tls", str(pki["modality"][0]), str(pki["modality"][1]), "+cf", ca]
    try:
        # A connection that never says a word does not stall the listener...
        idle = socket.create_connection(("127.0.0.1", node.port))
        good = storescu(node.port, study, extra=tls_ok)
        # ...and is dropped after the handshake timeout.
        idle.settimeout(30)
        t0 = time.monotonic()
        assert idle.recv(1) == b""
        idle_closed_after = time.monotonic() - t0
        idle.close()
        wrong_ca = storescu(node.port, study[:1], extra=[
            "+tls", str(pki["intruder"][0]), str(pki["intruder"][1]), "+cf", ca])
        no_cert = storescu(node.port, study[:1], extra=["+tla", "+cf", ca])
        plain = storescu(node.port, study[:1])
        echo = subprocess.run([require_binary("echoscu"), *tls_ok, "-aec", "MAMMO_AI",
                               "127.0.0.1", str(node.port)], capture_output=True, text=True,
                              timeout=60)
        wait_until(lambda: delivered_studies(node.data_dir), 120, 0.5, "delivery over TLS")
        wait_until(lambda: len(pacs.files()) >= 5, 30, 0.5, "5 objects at the TLS PACS")
    finally:
        node.stop()
        pacs.stop()
    assert good.returncode == 0, good.stdout + good.stderr
    assert sop_uids(study) == stored_sop_uids(node.data_dir)
    for refused in (wrong_ca, no_cert, plain):
        assert refused.returncode != 0, refused.stdout + refused.stderr
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert idle_closed_after < 25
    log = node.log()
    assert log.count("tls.handshake_failed") >= 4  # idle, wrong CA, no certificate, plain
    assert "tls=mutual" in log
    assert log.count("instance.stored") == 4
    assert "delivery.sent" in log


def test_permissions_and_no_patient_identity_in_log(tmp_path: Path) -> None:
    study = small_study(tmp_path / "in", 2, tag="priv")
    node = NodeProcess(tmp_path / "node",
                       study={"stable_seconds": 600, "complete_on_four_views": True}).start()
    try:
        assert storescu(node.port, study).returncode == 0
        wait_until(lambda: "analysis.done" in node.log(), 120, 0.5, "analysis")
    finally:
        node.stop()
    root = node.data_dir
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    files = [p for p in root.rglob("*") if p.is_file()]
    dirs = [p for p in root.rglob("*") if p.is_dir()]
    assert any(p.parts[-5] == "instances" for p in files if len(p.parts) > 5)
    assert any("results" in p.parts for p in files)
    bad_files = [(str(p), oct(stat.S_IMODE(p.stat().st_mode))) for p in files
                 if stat.S_IMODE(p.stat().st_mode) & 0o077]
    bad_dirs = [(str(p), oct(stat.S_IMODE(p.stat().st_mode))) for p in dirs
                if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert bad_files == [] and bad_dirs == []
    log = node.log()
    assert "PRIV0002" not in log and "TEST^" not in log
    # Configured on purpose: then (and only then) the log names the patient.
    node2 = NodeProcess(tmp_path / "node2", log={"patient_identifiers": True}).start()
    try:
        assert storescu(node2.port, study[:1]).returncode == 0
    finally:
        node2.stop()
    assert "patient_id=PRIV0002" in node2.log()


def _receiver(tmp_path: Path, allowed: list[str]) -> Receiver:
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    r = local_receiver(spool, db, max_pdu_size=0, max_associations=4,
                       allowed_peer_ips=allowed)
    r.start()
    return r


@pytest.mark.parametrize("allowed,admitted", [
    (["10.9.9.0/24"], False),
    (["10.9.9.0/24", "127.0.0.1"], True),
    ([], True),
])
def test_peer_ip_allow_list(tmp_path: Path, allowed: list[str], admitted: bool,
                            caplog: pytest.LogCaptureFixture) -> None:
    r = _receiver(tmp_path, allowed)
    refused_before = _refused_count("peer_ip")
    try:
        out = subprocess.run([require_binary("echoscu"), "-aec", "MAMMO_AI", "127.0.0.1",
                              str(r.port)], capture_output=True, text=True, timeout=30)
        # The listener is still there for the others after refusing one.
        out2 = subprocess.run([require_binary("echoscu"), "-aec", "MAMMO_AI", "127.0.0.1",
                               str(r.port)], capture_output=True, text=True, timeout=30)
    finally:
        r.stop()
        r.db.dispose()
    assert (out.returncode == 0) is admitted, out.stdout + out.stderr
    assert out2.returncode == out.returncode
    refused = "connection.refused" in caplog.text
    assert refused is (not admitted)
    # ... and counted for /metrics (two refused echoscu runs).
    assert _refused_count("peer_ip") - refused_before == (0 if admitted else 2)


def _refused_count(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("mammo_connections_refused_total",
                                             {"reason": reason}) or 0.0


@pytest.mark.parametrize("text, message", [
    ('[node]\nallowed_peer_ips = ["10.0.0.300"]\n', "node.allowed_peer_ips[0]"),
    ("[tls]\nenabled = true\n", "tls.ca_certificates"),
    ('[tls]\nenabled = true\nca_certificates = "missing-ca.pem"\n', "missing-ca.pem"),
    ("[tls]\nhandshake_timeout_seconds = 0\n", "tls.handshake_timeout_seconds"),
    ("[tls]\nverify = true\n", "tls.verify"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\ntls = true\n',
     "tls.ca_certificates"),
])
def test_security_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    from node.config import ConfigError, load_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(cfg)


def test_tls_files_resolve_against_the_config_directory(tmp_path: Path, pki: dict) -> None:
    import shutil

    from node.config import load_settings
    for name in ("ca", "node"):
        shutil.copy(pki[name][1], tmp_path / f"{name}.crt")
    shutil.copy(pki["node"][0], tmp_path / "node.key")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[tls]\nenabled = true\ncertificate = "node.crt"\nprivate_key = "node.key"\n'
                   'ca_certificates = "ca.crt"\n')
    s = load_settings(cfg)
    assert s.tls.certificate == str(tmp_path / "node.crt")
    from node.security import server_context

    assert server_context(s.tls).verify_mode.name == "CERT_REQUIRED"

