"""DICOMweb STOW-RS receiver (``[dicomweb]``, off by default): a PACS that speaks only DICOMweb
routes studies to the node with ``POST /dicom-web/studies``.

Every part goes through the very checks and store path of C-STORE
(:meth:`node.receive.Receiver.accept_file`): same refusals, quarantine, duplicate handling, and
the same durability promise: the response is written only after every stored instance is
fsynced and committed. The parts stream from the socket into files under ``data_dir/incoming``
(a 60 MB mammogram is never held in memory); Content-Length or chunked transfer encoding, at
most ``max_request_mb`` per request.

Answers (PS3.18 10.5.3): 200 every instance stored; 202 some stored, the others in
FailedSOPSequence with their FailureReason (the C-STORE status the node would have answered:
0xA700, 0xC001-0xC005; 0xC122 for a transfer syntax the node does not decode, 0xA900 for an
instance of another study than the URL names); 409 none stored; 503 none stored because the
node is out of resources (Retry-After). Before any part: 401 (credentials), 403 (peer address),
404, 405, 411 (no length), 413 (too large), 415 (not multipart/related application/dicom),
400 (malformed body), 503 (disk below ``node.min_free_mb``).
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import os
import re
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

import pydicom

from node import metrics
from node.config import DicomwebSettings
from node.log import event
from node.receive import (
    OTHER_TRANSFER_SYNTAXES,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    Receiver,
)
from node.secrets import read_tokens, read_users, verify

log = logging.getLogger("node.stow")

ROOT = "/dicom-web"
STATUS_TS_NOT_SUPPORTED = 0xC122  # PS3.18 Table 10.5.3-?: Referenced Transfer Syntax not supported
STATUS_WRONG_STUDY = 0xA900  # the instance is not in the study the URL names
_STUDY_PATH = re.compile(r"^/dicom-web/studies(?:/([0-9.]{1,64}))?/?$")


class RequestError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class StowServer:
    """The HTTP(S) listener of ``[dicomweb]``; parts are stored through ``receiver``."""

    def __init__(self, settings: DicomwebSettings, receiver: Receiver,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.receiver = receiver
        self.ssl_context = ssl_context
        self.networks = [ipaddress.ip_network(n, strict=False)
                         for n in settings.allowed_peer_ips]
        self.users = read_users(settings.users_file) if settings.auth == "basic" else {}
        self.tokens = read_tokens(settings.tokens_file) if settings.auth == "bearer" else []
        handler = _handler(self)
        server = self

        class _Server(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                # TLS handshake in the connection's own thread: a silent client cannot stall
                # the listener.
                request.settimeout(settings.timeout_seconds)
                if server.ssl_context is not None:
                    try:
                        request = server.ssl_context.wrap_socket(request, server_side=True)
                    except (OSError, ssl.SSLError) as exc:
                        event(log, "stow.tls_failed", logging.WARNING,
                              peer=f"{client_address[0]}:{client_address[1]}",
                              error=type(exc).__name__)
                        return
                super().finish_request(request, client_address)

        try:
            self._httpd: ThreadingHTTPServer | None = _Server((settings.host, settings.port),
                                                              handler)
        except OSError as exc:
            raise OSError(f"[dicomweb] cannot listen on {settings.host}:{settings.port}: "
                          f"{exc.strerror or exc}") from exc
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        assert self._httpd is not None
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="stow",
                                        daemon=True)
        self._thread.start()
        event(log, "stow.started", host=self.settings.host, port=self.port,
              path=f"{ROOT}/studies", auth=self.settings.auth,
              tls="on" if self.ssl_context else "off",
              max_request_mb=self.settings.max_request_mb)

    def stop(self) -> None:
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join(10)
            self._httpd.server_close()
            self._httpd = None
            event(log, "stow.stopped")

    # -- checks before the body ------------------------------------------------------------
    def peer_allowed(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in self.networks)

    def authenticated(self, header: str | None) -> str | None:
        """The user (or "token") the Authorization header proves, None when it proves none."""
        auth = self.settings.auth
        if auth == "none":
            return "anonymous"
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if auth == "basic" and scheme.lower() == "basic":
            try:
                name, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            stored = self.users.get(name)
            return name if stored is not None and verify(password, stored) else None
        if auth == "bearer" and scheme.lower() == "bearer":
            token = value.strip()
            return "token" if any(verify(token, t) for t in self.tokens) else None
        return None


# -- request body ------------------------------------------------------------------------------
class _Body:
    """The request body as a byte stream (Content-Length or chunked), capped at ``limit``."""

    def __init__(self, rfile: BinaryIO, length: int | None, chunked: bool, limit: int) -> None:
        self.rfile, self.remaining, self.chunked, self.limit = rfile, length, chunked, limit
        self.read_total = 0
        self._chunk_left = 0
        self._done = False

    def read(self, size: int = 1 << 20) -> bytes:
        if self._done:
            return b""
        if not self.chunked:
            assert self.remaining is not None
            if self.remaining <= 0:
                self._done = True
                return b""
            data = self.rfile.read(min(size, self.remaining))
            if not data:
                raise RequestError(400, "request body shorter than its Content-Length")
            self.remaining -= len(data)
        else:
            if self._chunk_left == 0:
                line = self.rfile.readline(1024).strip()
                try:
                    self._chunk_left = int(line.split(b";")[0], 16)
                except ValueError:
                    raise RequestError(400, "malformed chunked encoding") from None
                if self._chunk_left == 0:
                    while self.rfile.readline(1024).strip():  # trailers
                        pass
                    self._done = True
                    return b""
            data = self.rfile.read(min(size, self._chunk_left))
            if not data:
                raise RequestError(400, "request body ended inside a chunk")
            self._chunk_left -= len(data)
            if self._chunk_left == 0:
                self.rfile.readline(8)  # CRLF after the chunk
        self.read_total += len(data)
        if self.read_total > self.limit:
            raise RequestError(413, f"request body over dicomweb.max_request_mb "
                                    f"({self.limit >> 20} MiB)")
        return data


def _boundary(content_type: str) -> str:
    """The multipart boundary; RequestError 415 unless multipart/related of application/dicom."""
    main, *params = [p.strip() for p in content_type.split(";")]
    values = {}
    for p in params:
        k, _, v = p.partition("=")
        values[k.strip().lower()] = v.strip().strip('"')
    if main.lower() != "multipart/related":
        raise RequestError(415, f"Content-Type must be multipart/related, got {main!r}")
    if values.get("type", "application/dicom").lower() != "application/dicom":
        raise RequestError(415, "only type=\"application/dicom\" parts are accepted (no "
                                "metadata + bulk data STOW)")
    boundary = values.get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise RequestError(400, "multipart boundary missing")
    return boundary


def split_parts(body: _Body, boundary: str, directory: Path) -> Iterator[tuple[Path, str]]:
    """Stream the parts of a multipart body into files in ``directory``; yields (file, content
    type) as each part is complete. Only a few KiB more than one read are ever in memory."""
    delimiter = b"\r\n--" + boundary.encode()
    buffer = b"\r\n"  # the first delimiter has no CRLF of its own
    # Preamble: up to the first delimiter.
    while True:
        i = buffer.find(delimiter)
        if i >= 0:
            buffer = buffer[i + len(delimiter):]
            break
        data = body.read()
        if not data:
            raise RequestError(400, "no multipart part in the body")
        buffer = buffer[-len(delimiter):] + data
    while True:
        while len(buffer) < 2:
            data = body.read()
            if not data:
                raise RequestError(400, "body ended after a boundary")
            buffer += data
        if buffer.startswith(b"--"):  # the closing delimiter
            while body.read():  # epilogue
                pass
            return
        # Part headers, up to an empty line.
        while b"\r\n\r\n" not in buffer:
            data = body.read()
            if not data or len(buffer) > 16384:
                raise RequestError(400, "malformed part headers")
            buffer += data
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        ctype = headers.get("content-type", "application/dicom")
        fd, name = tempfile.mkstemp(dir=directory, suffix=".stow")
        path = Path(name)
        with os.fdopen(fd, "wb") as out:
            while True:
                i = buffer.find(delimiter)
                if i >= 0:
                    out.write(buffer[:i])
                    buffer = buffer[i + len(delimiter):]
                    break
                keep = len(delimiter)
                if len(buffer) > keep:
                    out.write(buffer[:-keep])
                    buffer = buffer[-keep:]
                data = body.read()
                if not data:
                    path.unlink(missing_ok=True)
                    raise RequestError(400, "body ended inside a part (no closing boundary)")
                buffer += data
        yield path, ctype


# -- response ------------------------------------------------------------------------------------
def _ref_item(sop_class: str, sop_uid: str, reason: int | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_uid:
        item["00081155"] = {"vr": "UI", "Value": [sop_uid]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def _uids(path: Path) -> tuple[str, str, str, str]:
    """(SOP Class, SOP Instance, Study Instance UID, transfer syntax) of a part, "" if unknown."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
            "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
    except Exception:  # noqa: BLE001 - unreadable: no identifiers
        return "", "", "", ""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    return (str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or ""),
            str(ds.get("StudyInstanceUID", "") or ""), ts)


def _handler(server: StowServer) -> type[BaseHTTPRequestHandler]:
    settings = server.settings

    class Handler(BaseHTTPRequestHandler):
        server_version = "mammo-node"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("stow.request peer=%s %s", self.address_string(), format % args)

        def _peer(self) -> dict[str, object]:
            return {"peer_aet": "DICOMWEB", "peer": f"{self.client_address[0]}:"
                                                   f"{self.client_address[1]}"}

        def _send(self, status: int, body: dict[str, Any] | None = None,
                  headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, reason: str, close: bool = False) -> None:
            headers = {"Warning": f'299 mammo-node "{reason[:200]}"'}
            if status == 401:
                headers["WWW-Authenticate"] = ('Bearer realm="mammo-node"'
                                               if settings.auth == "bearer"
                                               else 'Basic realm="mammo-node"')
            if status == 503:
                headers["Retry-After"] = "60"
            if close:
                headers["Connection"] = "close"
                self.close_connection = True
            event(log, "stow.refused", logging.WARNING, **self._peer(), status=status,
                  reason=reason)
            self._send(status, None, headers)

        def do_GET(self) -> None:
            self._error(405, "only STOW-RS (POST) is served here", close=True)

        do_PUT = do_DELETE = do_GET  # noqa: N815

        def do_POST(self) -> None:
            t0 = time.perf_counter()
            try:
                self._post(t0)
            except RequestError as exc:
                self._error(exc.status, exc.reason, close=True)
            except (ConnectionError, TimeoutError) as exc:
                event(log, "stow.aborted", logging.WARNING, **self._peer(),
                      error=type(exc).__name__)
                self.close_connection = True

        def _post(self, t0: float) -> None:
            if not server.peer_allowed(self.client_address[0]):
                metrics.connection_refused("peer_ip")
                raise RequestError(403, "peer address not in dicomweb.allowed_peer_ips")
            match = _STUDY_PATH.match(self.path.split("?", 1)[0])
            if match is None:
                raise RequestError(404, f"no STOW-RS resource at {self.path[:100]}")
            user = server.authenticated(self.headers.get("Authorization"))
            if user is None:
                raise RequestError(401, "missing or wrong credentials")
            boundary = _boundary(self.headers.get("Content-Type", ""))
            limit = settings.max_request_mb << 20
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            length = self.headers.get("Content-Length")
            if not chunked:
                if length is None or not length.isdigit():
                    raise RequestError(411, "Content-Length or chunked encoding required")
                if int(length) > limit:
                    raise RequestError(413, f"{int(length)} bytes is over "
                                            f"dicomweb.max_request_mb ({settings.max_request_mb})")
            rcv = server.receiver
            if rcv.spool.free_mb() < rcv.min_free_mb:
                metrics.instance_rejected(STATUS_OUT_OF_RESOURCES)
                raise RequestError(503, f"less than {rcv.min_free_mb} MiB free in data_dir")
            body = _Body(self.rfile, None if chunked else int(length or 0), chunked, limit)
            study_in_path = match.group(1)
            stored, failed = [], []
            parts = split_parts(body, boundary, rcv.spool.incoming)
            try:
                for path, ctype in parts:
                    result = self._one_part(path, ctype, study_in_path)
                    (stored if result[2] is None else failed).append(result)
            except BaseException:
                with contextlib.suppress(Exception):
                    parts.close()
                raise
            self._answer(stored, failed, user, t0)

        def _one_part(self, path: Path, ctype: str, study_in_path: str | None
                      ) -> tuple[str, str, int | None]:
            """Store one part; (SOP Class, SOP Instance UID, failure reason or None)."""
            rcv = server.receiver
            sop_class, sop_uid, study_uid, ts = _uids(path)
            reason: int | None = None
            if not ctype.lower().startswith("application/dicom"):
                reason, why = 0xC000, f"part of type {ctype[:60]!r}"
            elif ts and ts not in (TRANSFER_SYNTAXES if sop_class in STORAGE_SOP_CLASSES
                                   else OTHER_TRANSFER_SYNTAXES):
                # analysed images must decode; the objects never analysed are never decoded
                reason, why = STATUS_TS_NOT_SUPPORTED, f"transfer syntax {ts} not accepted"
            elif study_in_path and study_uid and study_uid != study_in_path:
                reason, why = STATUS_WRONG_STUDY, "instance of another study than the URL's"
            if reason is not None:
                relpath = rcv._quarantine(path, f"STOW-RS: {why}")
                event(log, "instance.quarantined", logging.WARNING, **self._peer(),
                      sop=sop_uid or "?", status=f"0x{reason:04X}", reason=why, file=relpath)
                metrics.instance_rejected(reason)
                return sop_class, sop_uid, reason
            result = rcv.accept_file(path, self._peer(), None, None)
            code = result if isinstance(result, int) else int(result.Status)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # adopted or quarantined files are gone already
            if code == STATUS_SUCCESS:
                metrics.instance_received()
                return sop_class, sop_uid, None
            metrics.instance_rejected(code)
            return sop_class, sop_uid, code

        def _answer(self, stored: list, failed: list, user: str, t0: float) -> None:
            body: dict[str, Any] = {}
            if stored:
                body["00081199"] = {"vr": "SQ", "Value": [_ref_item(c, u, None)
                                                          for c, u, _ in stored]}
            if failed:
                body["00081198"] = {"vr": "SQ", "Value": [_ref_item(c, u, r)
                                                          for c, u, r in failed]}
            if not stored and not failed:
                raise RequestError(400, "no part in the request")
            if failed and not stored:
                status = 503 if all(r == STATUS_OUT_OF_RESOURCES for *_, r in failed) else 409
            else:
                status = 202 if failed else 200
            headers = {"Retry-After": "60"} if status == 503 else {}
            event(log, "stow.answered", logging.INFO if status == 200 else logging.WARNING,
                  **self._peer(), user=user, status=status, stored=len(stored),
                  failed=len(failed), ms=round((time.perf_counter() - t0) * 1000, 1))
            self._send(status, body, headers)

    return Handler


def https_context(certificate: str, private_key: str) -> ssl.SSLContext:
    """Server-side TLS (>= 1.2) with the node's certificate; clients are not asked for one
    (they authenticate with ``dicomweb.auth``)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certificate, private_key)
    return ctx
