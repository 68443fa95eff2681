"""node/fastrecv.py and node/fastpdu.py replace pynetdicom internals; this test fails the moment
pynetdicom's code at those points changes, so an upgrade is re-verified instead of silently
losing (or breaking) the hashing temp file, the bounded PDU reader and the P-DATA-TF shortcut.

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
    # node/fastpdu.py: replaced for acceptors (_run_reactor: a copy with the select wait and
    # the P-DATA-TF shortcut; _is_transport_event still runs in Sta13)
    ("dul.py", "DULServiceProvider.run_reactor"):
        "61c299b9a930fb8740258c5518eed55255153ee890a826bed3d3483b42e1b110",
    ("dul.py", "DULServiceProvider._is_transport_event"):
        "a192323b769ecd4ab1349db0b819516a7dce2d42fc65d8bdec919984e5ebbab0",
    # replaced for acceptors (fastpdu._assoc_run_reactor: the same checks, woken by the queue)
    ("association.py", "Association._run_reactor"):
        "304c896561674fdc8a8c3c87ee41d63ef83f16942a44b64e545dce4a5370c0d1",
    # what the shortcut stands in for: Sta6 + Evt10 -> DT-2 -> DIMSE receive_primitive ->
    # decode_msg writes data[1:] of each dataset fragment to the temp file and flushes
    ("fsm.py", "DT_2"):
        "6541e369216c2ab559df9a878a777934066282c0d8b7608c542127610c592230",
    ("dimse.py", "DIMSEServiceProvider.receive_primitive"):
        "533d17b6a815edee0cf264b62db31dd54ce9b3ec4c77c466a418bce0258ab584",
    # pynetdicom's default EVT_PDU_RECV logging handler does nothing for a P-DATA-TF
    ("_handlers.py", "_receive_data_tf"):
        "57fc35037255ccfa120e92d1d161a54b18905c045e640231ddad7863dcfcd144",
}


def _function_source(module_file: Path, qualname: str) -> str:
    text = module_file.read_text(encoding="utf-8")
    if "." not in qualname:  # a module-level function
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef) and node.name == qualname:
                return ast.get_source_segment(text, node) or ""
        raise AssertionError(f"pynetdicom has no {qualname} in {module_file.name} any more")
    cls_name, func_name = qualname.split(".")
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
    from pynetdicom import association, dul

    from node import fastpdu

    assert dul.DULServiceProvider.run_reactor is fastpdu._run_reactor
    assert association.Association._run_reactor is fastpdu._assoc_run_reactor
