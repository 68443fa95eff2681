"""DICOMweb out and in, with real peers: Orthanc's DICOMweb plugin and dicomweb-client.

Out: results reach Orthanc by STOW-RS (basic auth); a wrong password fails at once (401, like a
C-STORE refusal); a server that is down is retried with backoff, then failed, and
``mammo-node retry`` delivers once it is up.

In: dicomweb-client stores a study through the node's STOW-RS endpoint (basic auth); the node
stores and analyses it exactly as a C-STORE'd one. Refusals map onto HTTP statuses and STOW-RS
failure reasons (401, 413, 409 with 0xC001, 202 partial); Orthanc, configured with the node as a
DICOMweb server, sends a study to it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid

from node.secrets import hash_password
from node.stow_client import MultipartBody
from tests.netutil import NodeProcess, free_port, storescu, wait_until
from tests.orthanc import Orthanc
from tests.smallstudies import small_study, sop_uids

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # not a storage class the node accepts


def _status(node: NodeProcess) -> dict:
    out = node.cli("status", "--json", "--errors", "20")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _instances(pacs: Orthanc) -> dict[str, int]:
    """Instances per modality in the PACS."""
    out: dict[str, int] = {}
    for sid in pacs.get("/series") or []:
        s = pacs.get(f"/series/{sid}")
        m = s["MainDicomTags"].get("Modality", "")
        out[m] = out.get(m, 0) + len(s["Instances"])
    return out


def test_stow_rs_destinations_auth_refusal_backoff_and_retry(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "pacs", dicomweb=True, users={"node": "s3cret"}).start()
    later_port = free_port()  # a second DICOMweb server, down at first
    (tmp_path / "good.pw").write_text("s3cret\n")
    (tmp_path / "bad.pw").write_text("wrong\n")
    web = {"type": "dicomweb", "auth": "basic", "username": "node"}
    node = NodeProcess(
        tmp_path / "node",
        [{"name": "cloud", **web, "url": pacs.url + "/dicom-web",
          "password_file": str(tmp_path / "good.pw")},
         {"name": "badauth", **web, "url": pacs.url + "/dicom-web",
          "password_file": str(tmp_path / "bad.pw")},
         {"name": "later", "type": "dicomweb", "url": f"http://127.0.0.1:{later_port}/dicom-web"}],
        study={"stable_seconds": 600},
        delivery={"max_attempts": 3, "backoff_initial_seconds": 1, "backoff_max_seconds": 1},
    ).start()
    later = Orthanc(tmp_path / "later", dicomweb=True)
    later.http_port = later_port
    try:
        study = small_study(tmp_path / "in", 1, tag="stowout")
        assert storescu(node.port, study).returncode == 0
        wait_until(lambda: _instances(pacs).get("SR") == 1 and _instances(pacs).get("OT") == 4,
                   180, 1.0, "1 SR + 4 SC in Orthanc by STOW-RS")

        def settled() -> dict | None:
            st = _status(node)
            return st if st["deliveries"] == {"done": 1, "failed": 2} else None

        status = wait_until(settled, 120, 1.0, "cloud done, badauth and later failed")
        later.start()
        assert node.cli("retry").returncode == 0
        wait_until(lambda: _instances(later).get("SR") == 1 and _instances(later).get("OT") == 4,
                   120, 1.0, "the results at the server that came back")
        wait_until(lambda: _status(node)["deliveries"] == {"done": 2, "failed": 1}, 60, 1.0,
                   "later done after retry")
        log = node.log()
        in_pacs = _instances(pacs)
    finally:
        node.stop()
        later.stop()
        pacs.stop()
    errors = {e["destination"]: e for e in status["recent_errors"] if e["kind"] == "delivery"}
    # Wrong credentials: refused at once (one attempt), like a C-STORE refusal.
    assert errors["badauth"]["attempts"] == 1 and "HTTP 401" in errors["badauth"]["error"]
    # Down: retried with backoff up to max_attempts, then failed; `retry` sent it.
    assert errors["later"]["attempts"] == 3 and "cannot reach" in errors["later"]["error"]
    # Each kind goes as it is written: the closing line names the whole delivery (total_*).
    assert re.search(r"delivery\.sent destination=cloud .*status=\"?HTTP 200\"? .*"
                     r"total_objects=5 total_kinds=tid1500,sc", log)
    assert re.search(r"delivery\.sent destination=later .*total_objects=5", log)
    # Each object once in the PACS (the refused attempts stored nothing).
    assert in_pacs == {"MG": 0, "SR": 1, "OT": 4} or in_pacs == {"SR": 1, "OT": 4}


def _users_file(path: Path, users: dict[str, str]) -> Path:
    path.write_text("".join(f"{u}:{hash_password(p, iterations=1000)}\n"
                            for u, p in users.items()))
    return path


def _post(url: str, files: list[Path], auth: tuple[str, str] | None) -> requests.Response:
    body = MultipartBody(files)
    return requests.post(url, data=body.read(), auth=auth, timeout=60,
                         headers={"Content-Type": body.content_type})


def test_stow_rs_receiver_real_clients_and_refusals(tmp_path: Path) -> None:
    web_port = free_port()
    users = _users_file(tmp_path / "users.txt", {"pacs": "pacs-pw"})
    node = NodeProcess(tmp_path / "node", study={"stable_seconds": 600},
                       dicomweb={"enabled": True, "host": "127.0.0.1", "port": web_port,
                                 "auth": "basic", "users_file": str(users),
                                 "max_request_mb": 5}).start()
    base = f"http://127.0.0.1:{web_port}/dicom-web"
    study = small_study(tmp_path / "in", 1, tag="stowin")
    try:
        wait_until(lambda: "stow.started" in node.log(), 30, 0.2, "STOW-RS listener")
        # A real client: dicomweb-client, one instance per request.
        session = requests.Session()
        session.auth = ("pacs", "pacs-pw")
        client = DICOMwebClient(base, session=session)
        for path in study:
            rsp = client.store_instances([pydicom.dcmread(path)])
            refs = rsp.get("ReferencedSOPSequence") or rsp.ReferencedSOPSequence
            assert len(refs) == 1
        wait_until(lambda: "analysis.done" in node.log(), 180, 0.5, "analysis of the study")

        # Refusals, each with its HTTP status and failure reason.
        assert _post(base + "/studies", study[:1], None).status_code == 401
        assert _post(base + "/studies", study[:1], ("pacs", "nope")).status_code == 401
        big = small_study(tmp_path / "big", 2, tag="stowbig")  # 4 x ~130 kB, limit 5 MiB: fine
        assert _post(base + "/studies", big, ("pacs", "pacs-pw")).status_code == 200
        huge = [tmp_path / f"huge{i}.dcm" for i in range(3)]
        for i, p in enumerate(huge):
            ds = pydicom.dcmread(study[0])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PixelData = bytes(2 << 20)
            ds.Rows = ds.Columns = 1024
            ds.save_as(p, enforce_file_format=True)
            assert i >= 0
        assert _post(base + "/studies", huge, ("pacs", "pacs-pw")).status_code == 413
        not_mg = tmp_path / "not-mg.dcm"
        ds = pydicom.dcmread(study[0])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_CLASS
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality = "CT"
        ds.save_as(not_mg, enforce_file_format=True)
        rsp = _post(base + "/studies", [not_mg], ("pacs", "pacs-pw"))
        assert rsp.status_code == 409
        failed = rsp.json()["00081198"]["Value"]
        assert failed[0]["00081197"]["Value"] == [0xC001]
        # One stored again (identical: success, not stored twice) and one refused: 202.
        rsp = _post(base + "/studies", [study[0], not_mg], ("pacs", "pacs-pw"))
        assert rsp.status_code == 202
        assert len(rsp.json()["00081199"]["Value"]) == 1
        # Another study than the URL names: 0xA900.
        rsp = _post(base + "/studies/1.2.3.4", study[:1], ("pacs", "pacs-pw"))
        assert rsp.status_code == 409
        assert rsp.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
        assert requests.get(base + "/studies", timeout=10).status_code == 405

        # Orthanc's DICOMweb peer sends a study to the node.
        peer = Orthanc(tmp_path / "peer", dicomweb=True, extra={"DicomWeb": {
            "Enable": True, "Root": "/dicom-web/",
            "Servers": {"mammo": {"Url": base + "/", "Username": "pacs",
                                  "Password": "pacs-pw"}}}}).start()
        try:
            third = small_study(tmp_path / "third", 3, tag="stowpeer")
            for p in third:
                peer.upload(p)
            (study_id,) = peer.get("/studies")
            peer.post("/dicom-web/servers/mammo/stow", {"Resources": [study_id]})
        finally:
            peer.stop()
        log = node.log()
        status = _status(node)
    finally:
        node.stop()
    stored = re.findall(r"instance\.stored peer_aet=DICOMWEB .*? sop=([0-9.]+)", log)
    assert set(stored) >= sop_uids(study) | sop_uids(big) | sop_uids(third)
    assert log.count("instance.duplicate") >= 1
    assert status["studies"].get("receiving", 0) + status["studies"].get("done", 0) >= 3
    assert re.search(r"stow\.refused .*status=413", log)
    assert re.search(r"instance\.quarantined peer_aet=DICOMWEB .*status=0xC001", log)
    quarantined = list((node.data_dir / "quarantine").rglob("*.reason.txt"))
    assert len(quarantined) >= 3  # not-MG twice, wrong study once
