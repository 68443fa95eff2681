"""Receive + store over real sockets: dcmtk storescu/echoscu against the node's SCP."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless
from sqlalchemy import func, select

from node.db import Database, Instance, Study
from node.receive import TRANSFER_SYNTAXES, Receiver
from node.store import Spool
from node.testdata import mias_to_mg, uid_from
from tests.netutil import REPO, free_port, storescu
from tests.tools import require_binary

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def receiver(tmp_path: Path):
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    stored = []
    r = Receiver(ae_title="MAMMO_AI", host="127.0.0.1", port=free_port(), spool=spool, db=db,
                 allowed_calling_aets=[], max_pdu_size=131072, max_associations=8,
                 network_timeout=30, min_free_mb=1, on_stored=stored.append)
    r.stored = stored
    r.start()
    yield r
    r.stop()
    db.dispose()


def _count(db: Database, model) -> int:  # type: ignore[no-untyped-def]
    with db.session() as s:
        return s.execute(select(func.count()).select_from(model)).scalar_one()


def test_echo_and_store_durably(receiver: Receiver, tmp_path: Path) -> None:
    out = subprocess.run([require_binary("echoscu"), "-aec", "MAMMO_AI", "127.0.0.1",
                          str(receiver.port)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    src = tmp_path / "in" / "mdb209.dcm"
    mias_to_mg("mdb209", src)
    res = storescu(receiver.port, [src])
    assert res.returncode == 0, res.stderr
    with receiver.db.session() as s:
        inst = s.execute(select(Instance)).scalar_one()
        study = s.execute(select(Study)).scalar_one()
    path = receiver.spool.path(inst.relpath)
    # The stored file is the very dataset that was sent, under a name that is not a UID.
    assert pydicom.dcmread(path).SOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID
    assert inst.sop_uid not in inst.relpath
    assert np.array_equal(pydicom.dcmread(path).pixel_array, pydicom.dcmread(src).pixel_array)
    assert (inst.laterality, inst.view) == ("R", "MLO")
    assert study.state == "receiving"
    # data_dir is private to the node's user.
    assert stat.S_IMODE(os.stat(receiver.spool.root).st_mode) == 0o700
    # Nothing is left in the incoming folder.
    assert list(receiver.spool.incoming.iterdir()) == []


def test_resent_instance_is_not_stored_twice(receiver: Receiver, tmp_path: Path) -> None:
    src = tmp_path / "in" / "a.dcm"
    mias_to_mg("mdb210", src)
    assert storescu(receiver.port, [src]).returncode == 0
    assert storescu(receiver.port, [src]).returncode == 0
    assert _count(receiver.db, Instance) == 1
    files = [p for p in (receiver.spool.root / "instances").rglob("*.dcm")]
    assert len(files) == 1
    assert len(receiver.stored) == 1


def test_same_uid_different_content_is_quarantined(receiver: Receiver, tmp_path: Path) -> None:
    src = tmp_path / "in" / "a.dcm"
    ds = mias_to_mg("mdb210", src)
    assert storescu(receiver.port, [src]).returncode == 0
    ds.PixelData = bytes(len(ds.PixelData))  # same UIDs, other pixels
    other = tmp_path / "in" / "b.dcm"
    ds.save_as(other, enforce_file_format=True)
    res = storescu(receiver.port, [other], extra=["-d"])
    assert "0xc005" in (res.stdout + res.stderr).lower()
    assert _count(receiver.db, Instance) == 1
    reasons = list((receiver.spool.root / "quarantine").rglob("*.reason.txt"))
    assert len(reasons) == 1 and "different content" in reasons[0].read_text()


def test_secondary_capture_needs_modality_mg(receiver: Receiver, tmp_path: Path) -> None:
    ds = mias_to_mg("mdb212", None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.Modality = "OT"
    bad = tmp_path / "sc_ot.dcm"
    ds.save_as(bad, enforce_file_format=True)
    res = storescu(receiver.port, [bad], extra=["-d"])
    assert "0xc001" in (res.stdout + res.stderr).lower()
    assert _count(receiver.db, Instance) == 0
    assert len(list((receiver.spool.root / "quarantine").rglob("*.dcm"))) == 1
    ds.Modality = "MG"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid_from("sc-mg")
    good = tmp_path / "sc_mg.dcm"
    ds.save_as(good, enforce_file_format=True)
    assert storescu(receiver.port, [good]).returncode == 0
    assert _count(receiver.db, Instance) == 1


def test_other_sop_classes_refused_at_negotiation(receiver: Receiver, tmp_path: Path) -> None:
    ds = mias_to_mg("mdb212", None)
    ct = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ct
    ds.Modality = "CT"
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    res = storescu(receiver.port, [path], extra=["-R"])
    assert res.returncode != 0
    assert "no acceptable presentation contexts" in (res.stdout + res.stderr).lower()
    assert _count(receiver.db, Instance) == 0


def test_calling_ae_allow_list(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'db.sqlite3'}")
    db.create_schema()
    r = Receiver(ae_title="MAMMO_AI", host="127.0.0.1", port=free_port(), spool=spool, db=db,
                 allowed_calling_aets=["PACS"], max_pdu_size=0, max_associations=4,
                 network_timeout=30, min_free_mb=1)
    r.start()
    try:
        echo = require_binary("echoscu")
        ok = subprocess.run([echo, "-aet", "PACS", "-aec", "MAMMO_AI", "127.0.0.1",
                             str(r.port)], capture_output=True, text=True, timeout=30)
        bad = subprocess.run([echo, "-aet", "INTRUDER", "-aec", "MAMMO_AI", "127.0.0.1",
                              str(r.port)], capture_output=True, text=True, timeout=30)
    finally:
        r.stop()
        db.dispose()
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode != 0
    assert "rejected" in (bad.stdout + bad.stderr).lower()


def test_disk_below_threshold_answers_out_of_resources(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'db.sqlite3'}")
    db.create_schema()
    huge = spool.free_mb() * 10 + 1  # more free space than any disk has
    r = Receiver(ae_title="MAMMO_AI", host="127.0.0.1", port=free_port(), spool=spool, db=db,
                 allowed_calling_aets=[], max_pdu_size=0, max_associations=4,
                 network_timeout=30, min_free_mb=huge)
    r.start()
    src = tmp_path / "a.dcm"
    mias_to_mg("mdb210", src)
    try:
        res = storescu(r.port, [src], extra=["-d"])
    finally:
        r.stop()
    assert "0xa700" in (res.stdout + res.stderr).lower()
    assert _count(db, Instance) == 0
    assert list((spool.root / "instances").rglob("*.dcm")) == []
    db.dispose()


def _encode_variants(src: Path, out: Path) -> dict[str, tuple[Path, list[str]]]:
    """One file per accepted transfer syntax, made by dcmtk or pydicom's encoders."""
    out.mkdir(parents=True, exist_ok=True)
    variants: dict[str, tuple[Path, list[str]]] = {}

    def tool(name: str, args: list[str], uid: str, propose: list[str]) -> None:
        dst = out / f"{uid}.dcm"
        subprocess.run([require_binary(name), *args, str(src), str(dst)], check=True,
                       capture_output=True, timeout=120)
        variants[uid] = (dst, propose)

    tool("dcmconv", ["+te"], "1.2.840.10008.1.2.1", ["-xe"])
    tool("dcmconv", ["+ti"], "1.2.840.10008.1.2", ["-xi"])
    tool("dcmconv", ["+td"], "1.2.840.10008.1.2.1.99", ["-xd"])
    tool("dcmcrle", [], "1.2.840.10008.1.2.5", ["-xr"])
    tool("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70", ["-xs"])
    # storescu cannot propose JPEG Lossless process 14 (.57): sent by the node's own pynetdicom
    # SCU (`mammo-node send`) instead, which proposes each file's transfer syntax.
    tool("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57", [])
    tool("dcmcjpls", ["+el"], "1.2.840.10008.1.2.4.80", ["-xt"])
    tool("dcmcjpls", ["+en"], "1.2.840.10008.1.2.4.81", ["-xu"])
    for uid, propose, kwargs in ((JPEG2000Lossless, "-xv", {}),
                                 (JPEG2000, "-xw", {"j2k_cr": [20]})):
        ds = pydicom.dcmread(src)
        ds.compress(uid, encoding_plugin="pylibjpeg", **kwargs)
        dst = out / f"{uid}.dcm"
        ds.save_as(dst, enforce_file_format=True)
        variants[str(uid)] = (dst, [propose])
    return variants


def test_every_accepted_transfer_syntax_is_received_and_decodes(
    receiver: Receiver, tmp_path: Path
) -> None:
    base = tmp_path / "base.dcm"
    original = mias_to_mg("mdb211", base).pixel_array
    variants = _encode_variants(base, tmp_path / "variants")
    assert set(variants) == set(TRANSFER_SYNTAXES)
    for i, (uid, (path, propose)) in enumerate(sorted(variants.items())):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid_from("ts", uid)
        ds.InstanceNumber = i + 1
        ds.save_as(path, enforce_file_format=False)
        if propose:
            res = storescu(receiver.port, [path], extra=[*propose, "-R"])
        else:
            res = subprocess.run(
                [sys.executable, "-m", "node", "send", "--config", str(REPO / "config.toml"),
                 "--host", "127.0.0.1", "--port", str(receiver.port), str(path)],
                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == 0, f"{uid}: {res.stdout}{res.stderr}"
    with receiver.db.session() as s:
        rows = s.execute(select(Instance)).scalars().all()
    assert {r.transfer_syntax for r in rows} == set(TRANSFER_SYNTAXES)
    lossy = {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.81"}
    for row in rows:
        pixels = pydicom.dcmread(receiver.spool.path(row.relpath)).pixel_array
        assert pixels.shape == original.shape, row.transfer_syntax
        if row.transfer_syntax in lossy:
            err = np.abs(pixels.astype(int) - original.astype(int)).mean()
            assert err < 8, (row.transfer_syntax, err)
        else:
            assert np.array_equal(pixels, original), row.transfer_syntax


def test_large_mammogram_streams_to_disk(receiver: Receiver, tmp_path: Path) -> None:
    """A 27 MB full-field image goes through the chunked path intact."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(4096, 3328), dtype=np.uint16)
    from node.testdata import mg_dataset

    ds = mg_dataset(pixels, patient_id="BIG", study_uid=uid_from("big"),
                    sop_uid=uid_from("big", "1"), laterality="L", view="CC", spacing_mm=0.07,
                    bits_stored=12)
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert storescu(receiver.port, [path]).returncode == 0
    with receiver.db.session() as s:
        inst = s.execute(select(Instance)).scalar_one()
    assert inst.size == path.stat().st_size or abs(inst.size - path.stat().st_size) < 1024
    assert np.array_equal(pydicom.dcmread(receiver.spool.path(inst.relpath)).pixel_array, pixels)
