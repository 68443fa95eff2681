"""The compose file's viewer (docker/viewer/) run with Debian's nginx and the cached OHIF build.

``scripts/test`` installs the OHIF build with docker/viewer/install-ohif.sh into .cache/ohif (the
same script the viewer image runs), so the tests serve the very nginx configuration, OHIF
configuration and patched OHIF files that the image serves. Only the variables the nginx image
would take from the environment are filled in here.
"""

from __future__ import annotations

import base64
import os
import string
import subprocess
from pathlib import Path

import pytest

from tests.netutil import REPO, free_port, wait_for_port
from tests.tools import require_binary

VIEWER_DIR = REPO / "docker" / "viewer"
OHIF_CACHE = Path(os.environ.get("MAMMO_NODE_OHIF_DIR", REPO / ".cache" / "ohif"))
OHIF_MARKER = ".mammo-node-ohif"


def ohif_dist() -> Path:
    """The installed OHIF build; fails in CI, skips elsewhere, when it is missing."""
    if (OHIF_CACHE / OHIF_MARKER).is_file() and (OHIF_CACHE / "index.html").is_file():
        return OHIF_CACHE
    msg = (f"OHIF build not found in {OHIF_CACHE}: run docker/viewer/install-ohif.sh "
           f"{OHIF_CACHE} (scripts/test does)")
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Viewer:
    """nginx serving OHIF and proxying Orthanc's DICOMweb (docker/viewer/nginx.conf.template)."""

    def __init__(self, workdir: Path, orthanc_url: str, orthanc_authorization: str,
                 users: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.orthanc_url = orthanc_url
        self.orthanc_authorization = orthanc_authorization
        self.users = users
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def render(self) -> Path:
        """nginx.conf: a main block of this test's folders around the shipped server block."""
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        htpasswd = w / "users.htpasswd"
        htpasswd.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.users.items()))
        template = string.Template((VIEWER_DIR / "nginx.conf.template").read_text())
        variables = {
            "VIEWER_PORT": f"127.0.0.1:{self.port}",
            "OHIF_ROOT": str(ohif_dist()),
            "OHIF_APP_CONFIG": str(VIEWER_DIR / "app-config.js"),
            "VIEWER_HTPASSWD": str(htpasswd),
            "ORTHANC_URL": self.orthanc_url,
            "ORTHANC_AUTHORIZATION": self.orthanc_authorization,
        }
        server = template.safe_substitute(variables)
        left = [v for v in variables if "${" + v + "}" in server]
        assert not left, left
        temp = "\n".join(f"{kind}_temp_path {w / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = w / "nginx.conf"
        # As root (CI), nginx's workers would run as nobody and could not read this test's
        # private folders; elsewhere the directive does not apply.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(f"""daemon off;
{user}
worker_processes 1;
pid {w / 'nginx.pid'};
error_log {w / 'error.log'} warn;
events {{ worker_connections 256; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {w / 'access.log'};
    {temp}
{server}
}}
""")
        return conf

    def start(self) -> Viewer:
        exe = require_binary("nginx")
        conf = self.render()
        self.log = open(self.workdir / "nginx.out", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(self.workdir)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 30, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None
            self.log.close()
