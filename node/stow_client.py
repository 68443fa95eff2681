"""DICOMweb STOW-RS transport: the result files of one delivery in one multipart POST.

``POST {url}/studies`` with ``Content-Type: multipart/related; type="application/dicom"``
(PS3.18 10.5), the files streamed from the spool with a known Content-Length (no chunked
encoding, which some servers refuse), basic or bearer authentication with the secret read from a
file at each attempt (so rotating it needs no restart), TLS verified against the system's CAs or
``ca_certificates`` unless ``tls_verify = false``.

The answer maps onto the same outcomes as C-STORE, so retry, backoff, dead-letter and
``mammo-node retry`` behave the same:

* success: 200, or 202 whose response lists no failed instance (warnings only);
* transient (retried with backoff): no connection, timeout, 408, 429, 5xx, or a response whose
  every failure reason is 0xA7xx (out of resources);
* permanent (failed at once, like a C-STORE refusal): any other 4xx (401/403 credentials, 404
  wrong URL, 409/202 with failure reasons, 413, 415).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import requests

from node import faults
from node.config import Destination
from node.deliver import SendOutcome

log = logging.getLogger("node.deliver")

FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"
TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


class MultipartBody:
    """A ``multipart/related`` body read from files as it is sent; its length is known up front
    (requests then sends Content-Length, not chunked transfer encoding)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.boundary = uuid.uuid4().hex
        self.paths = list(paths)
        self._head = [(f"--{self.boundary}\r\nContent-Type: application/dicom\r\n"
                       f"Content-Length: {os.path.getsize(p)}\r\n\r\n").encode()
                      for p in self.paths]
        self._tail = f"--{self.boundary}--\r\n".encode()
        self._length = (sum(len(h) for h in self._head) + sum(os.path.getsize(p) for p in paths)
                        + 2 * len(self.paths) + len(self._tail))
        self._chunks = self._iterate()
        self._buffer = b""

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return self._length

    def _iterate(self) -> Iterator[bytes]:
        for head, path in zip(self._head, self.paths, strict=True):
            yield head
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield self._tail

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            try:
                self._buffer += next(self._chunks)
            except StopIteration:
                break
        if size < 0:
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


def _secret(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()


def _failure_reasons(body: bytes) -> list[int]:
    """FailureReason values of a STOW-RS response (application/dicom+json), [] if none."""
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return []
    if isinstance(doc, list):
        doc = doc[0] if doc else {}
    items = (doc.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []
    reasons = []
    for item in items:
        values = (item.get(FAILURE_REASON) or {}).get("Value") or [0x0110]
        reasons.append(int(values[0]))
    return reasons


def classify(status: int, body: bytes) -> SendOutcome:
    """The delivery outcome of a STOW-RS answer."""
    text = f"HTTP {status}"
    reasons = _failure_reasons(body)
    listed = ", ".join(f"0x{r:04X}" for r in reasons)
    if status in (200, 202) and not reasons:
        return SendOutcome(True, False, text, "")
    if reasons:
        transient = all(0xA700 <= r <= 0xA7FF for r in reasons)
        return SendOutcome(False, not transient, text,
                           f"STOW-RS {text}: {len(reasons)} instance(s) failed ({listed})")
    detail = body[:200].decode("utf-8", "replace").strip()
    if status in TRANSIENT_HTTP:
        return SendOutcome(False, False, text, f"STOW-RS {text} {detail}".strip())
    return SendOutcome(False, True, text, f"STOW-RS refused: {text} {detail}".strip())


class StowTransport:
    """DICOMweb STOW-RS (``[[destinations]] type = "dicomweb"``)."""

    def send(self, dest: Destination, paths: Sequence[Path]) -> SendOutcome:
        url = dest.url.rstrip("/") + "/studies"
        body = MultipartBody(paths)
        headers = {"Content-Type": body.content_type, "Accept": "application/dicom+json"}
        auth = None
        try:
            if dest.auth == "basic":
                auth = (dest.username, _secret(dest.password_file))
            elif dest.auth == "bearer":
                headers["Authorization"] = f"Bearer {_secret(dest.token_file)}"
        except OSError as exc:
            return SendOutcome(False, True, "", f"cannot read the credential file: {exc}")
        verify: bool | str = (dest.ca_certificates or True) if dest.tls_verify else False
        faults.hit("deliver.mid_send")
        try:
            rsp = requests.post(url, data=_Stream(body), headers=headers, auth=auth,
                                verify=verify, timeout=dest.timeout_seconds)
        except requests.exceptions.SSLError as exc:
            return SendOutcome(False, False, "", f"TLS failure with {url}: {exc}")
        except requests.exceptions.RequestException as exc:
            return SendOutcome(False, False, "", f"cannot reach {url}: "
                                                 f"{type(exc).__name__}: {str(exc)[:200]}")
        return classify(rsp.status_code, rsp.content)


class _Stream:
    """A file-like view of :class:`MultipartBody` for requests (read() and a length)."""

    def __init__(self, body: MultipartBody) -> None:
        self.body = body
        self.len = len(body)

    def read(self, size: int = -1) -> bytes:
        return self.body.read(size)

    def __len__(self) -> int:
        return self.len

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(1 << 20):
            yield chunk



