"""node/fastrecv.py replaces two pynetdicom internals; this test fails the moment pynetdicom's
code at those points changes, so an upgrade is re-verified instead of silently losing (or
breaking) the hashing temp file and the bounded PDU reader.

The pinned digests are of the *source text* of the functions that are replaced or that call
what is replaced, read from pynetdicom's files (not from the live, possibly patched, objects).
When this fails after a pynetdicom upgrade: read the new code of the named function, check that
fastrecv's replacement still matches its contract (arguments, return value, what the caller does
with it), run ``python -m bench --only ingest``, then update the digest here.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pynetdicom
import pytest
from pynetdicom import dimse_messages, transport

from node import fastrecv

PATCH_POINTS = {  # verified against pynetdicom 3.0.4
    # replaced: fastrecv._recv (exact-size reads, allocation bounded by what arrives)
    ("transport.py", "AssociationSocket.recv"):
        "3da52b77777b4359851e5f59c97ef2c2537e11f89c6efb1eb808562e2dde8cb5",
    # the caller of recv: reads the PDU header (6 bytes) and then the declared length
    ("dul.py", "DULServiceProvider._read_pdu_data"):
        "c5f07708cfb78a70d039d5f8eac54258e16b76a3a5ed016a9affaf4ed5aa9134",
    # creates the dataset temp file by the module-level name NamedTemporaryFile
    ("dimse_messages.py", "DIMSEMessage.decode_msg"):
        "4a6a0156bb315c5cadc7db2b977b77385716c0e9d281d6a10ab4d0418897a8b6",
}


def _function_source(module_file: Path, qualname: str) -> str:
    cls_name, func_name = qualname.split(".")
    text = module_file.read_text(encoding="utf-8")
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef) and node.name == cls_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == func_name:
                    return ast.get_source_segment(text, item) or ""
    raise AssertionError(f"pynetdicom has no {qualname} in {module_file.name} any more")


@pytest.mark.parametrize(("filename", "qualname"), sorted(PATCH_POINTS))
def test_pynetdicom_code_at_each_patch_point_is_the_verified_one(filename: str,
                                                                  qualname: str) -> None:
    source = _function_source(Path(pynetdicom.__file__).parent / filename, qualname)
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert digest == PATCH_POINTS[(filename, qualname)], (
        f"pynetdicom {pynetdicom.__version__} changed {qualname} ({filename}): re-verify "
        f"node/fastrecv.py against it (see this module's docstring), then pin {digest}")


def test_the_patch_targets_exist_and_install_replaces_them() -> None:
    assert "NamedTemporaryFile(" in _function_source(
        Path(dimse_messages.__file__), "DIMSEMessage.decode_msg")
    assert hasattr(dimse_messages, "NamedTemporaryFile")
    fastrecv.install()
    assert transport.AssociationSocket.recv is fastrecv._recv
    assert dimse_messages.NamedTemporaryFile is fastrecv._HashingTempFile
