"""STOW-RS answers map onto the delivery outcomes of C-STORE (no network: the classifier)."""

from __future__ import annotations

import json
from pathlib import Path

from node.stow_client import MultipartBody, classify


def _failed(*reasons: int) -> bytes:
    return json.dumps({"00081198": {"vr": "SQ", "Value": [
        {"00081197": {"vr": "US", "Value": [r]}} for r in reasons]}}).encode()


def test_answers_map_to_outcomes() -> None:
    assert classify(200, b"{}").ok
    assert classify(202, b"{}").ok  # warnings only
    out = classify(202, _failed(0xC000))
    assert not out.ok and out.permanent and "0xC000" in out.error
    out = classify(409, _failed(0xA700, 0xA701))  # out of resources: retry later
    assert not out.ok and not out.permanent
    for status in (408, 429, 500, 502, 503, 504):
        assert classify(status, b"").permanent is False
    for status in (400, 401, 403, 404, 413, 415):
        out = classify(status, b"nope")
        assert out.permanent and f"HTTP {status}" in out.error


def test_multipart_body_is_framed_and_sized(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate((0, 10, 3 << 20)):
        p = tmp_path / f"f{i}.dcm"
        p.write_bytes(bytes([i]) * size)
        files.append(p)
    body = MultipartBody(files)
    data = b""
    while chunk := body.read(65536):
        data += chunk
    assert len(data) == len(body)
    boundary = body.boundary.encode()
    assert data.startswith(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n")
    assert data.endswith(b"\r\n--" + boundary + b"--\r\n")
    assert data.count(b"--" + boundary) == 4
    assert 'type="application/dicom"' in body.content_type
