"""Orthanc (Debian package) as a real PACS on loopback, started with a temporary config."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.netutil import free_port, wait_for_port, wait_until
from tests.tools import require_binary

#: Debian's orthanc-dicomweb plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: DICOMweb settings of the test Orthanc (the compose file's are in docker/orthanc/orthanc.json).
DICOMWEB = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
            "StudiesMetadata": "Full", "SeriesMetadata": "Full"}


def require_dicomweb_plugin() -> str:
    """The DICOMweb plugin's path; fails in CI, skips elsewhere, when it is not installed."""
    if DICOMWEB_PLUGIN.is_file():
        return str(DICOMWEB_PLUGIN)
    msg = f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} not found (Debian: orthanc-dicomweb)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


class Orthanc:
    def __init__(self, workdir: Path, aet: str = "ORTHANC",
                 modalities: dict[str, list[object]] | None = None, *,
                 dicomweb: bool = False, users: dict[str, str] | None = None,
                 extra: dict[str, object] | None = None) -> None:
        self.workdir = workdir
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = modalities or {}
        self.dicomweb = dicomweb
        self.users = users or {}
        self.extra = extra or {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, object]:
        return {
            "Name": "mammo-node-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": self.modalities,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "Plugins": [require_dicomweb_plugin()] if self.dicomweb else [],
            "StableAge": 2,
            **({"DicomWeb": DICOMWEB} if self.dicomweb else {}),
            **({"AuthenticationEnabled": True, "RegisteredUsers": self.users}
               if self.users else {}),
            **self.extra,
        }

    def write_config(self) -> Path:
        """The configuration Orthanc is started with (a file, or a folder of .json files)."""
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        return cfg

    def start(self) -> Orthanc:
        exe = require_binary("Orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.write_config()
        self.log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([exe, str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for_port(self.http_port, 60, self.proc)
        wait_for_port(self.dicom_port, 60, self.proc)
        wait_until(lambda: self.get("/system"), 30, 0.2, "Orthanc REST API")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None
            self.log.close()

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json", timeout: float = 300) -> object:
        headers = {"Content-Type": content_type}
        if self.users:  # the first registered user
            user, password = next(iter(self.users.items()))
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body,
                                     method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            data = rsp.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> object:
        try:
            return self._request("GET", path)
        except OSError:
            return None

    def raw(self, path: str) -> bytes:
        """GET ``path`` and return the body as it is (e.g. /instances/ID/file)."""
        headers = {}
        if self.users:
            user, password = next(iter(self.users.items()))
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return rsp.read()

    def post(self, path: str, payload: object) -> object:
        return self._request("POST", path, json.dumps(payload).encode())

    def upload(self, path: Path) -> dict:
        return self._request("POST", "/instances", path.read_bytes(), "application/dicom")

    def ai_results(self, study_id: str, sc_count: int = 4) -> dict[str, int] | None:
        """Instances per series description once the node's SR and ``sc_count`` SCs are in
        the study (a ``wait_until`` probe); None before."""
        counts = {s["MainDicomTags"].get("SeriesDescription", ""): len(s["Instances"])
                  for s in self.get(f"/studies/{study_id}/series") or []}
        done = (counts.get("AI calcification analysis") == 1
                and counts.get("AI Grad-CAM") == sc_count)
        return counts if done else None


class DeployedOrthanc(Orthanc):
    """Orthanc started with the deployment's own files (docker/orthanc/: orthanc.json and the
    Lua script, linked, not copied) plus a small site.json with this test's ports and folders,
    in place of the compose file's site.json."""

    def __init__(self, workdir: Path, shared_dir: Path, shared_files: list[str],
                 site: dict[str, object]) -> None:
        super().__init__(workdir, users=dict(site.get("RegisteredUsers", {})))  # type: ignore[arg-type]
        self.shared_dir = shared_dir
        self.shared_files = shared_files
        self.site = site

    def config(self) -> dict[str, object]:
        return {
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            **self.site,
        }

    def write_config(self) -> Path:
        cfg_dir = self.workdir / "config"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        for name in self.shared_files:
            link = cfg_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(self.shared_dir / name)
        (cfg_dir / "site.json").write_text(json.dumps(self.config(), indent=2))
        return cfg_dir
