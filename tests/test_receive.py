"""Receive + store over real sockets: dcmtk storescu/echoscu against the node's SCP."""

from __future__ import annotations

import copy
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import HTJ2K, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000Lossless
from sqlalchemy import func, select

from node.analysis.jpeg2000 import decode_pixels
from node.config import StudySettings
from node.db import Database, Instance, OtherObject, Study
from node.receive import TRANSFER_SYNTAXES, Receiver
from node.store import Spool
from tests.netutil import REPO, storescu
from tests.receivers import local_receiver
from tests.testdata import mias_to_mg, uid_from
from tests.tools import require_binary

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def receiver(tmp_path: Path):
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    stored = []
    r = local_receiver(spool, db, max_pdu_size=131072,
                       max_associations=8, on_stored=stored.append)
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


def test_secondary_capture_and_dx_intake(receiver: Receiver, tmp_path: Path) -> None:
    """SC: analysed when it holds a mammogram (Modality MG, or a mammography view and laterality
    as in WG-04's MG1 with Modality RG); another SC is accepted, not analysed. A DX that is not
    MG is no mammogram at all: 0xC001, quarantined."""
    ds = mias_to_mg("mdb212", None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality = "DX"
    bad = tmp_path / "dx.dcm"
    ds.save_as(bad, enforce_file_format=True)
    res = storescu(receiver.port, [bad], extra=["-d"])
    assert "0xc001" in (res.stdout + res.stderr).lower()
    assert _count(receiver.db, Instance) == 0
    assert len(list((receiver.spool.root / "quarantine").rglob("*.dcm"))) == 1

    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    paths = {}
    for name, modality, keep_view in (("sc_ot_no_view", "OT", False), ("sc_mg", "MG", True),
                                      ("sc_rg_view", "RG", True)):
        variant = copy.deepcopy(ds)
        variant.Modality = modality
        if not keep_view:
            for keyword in ("ViewPosition", "ViewCodeSequence", "ImageLaterality"):
                delattr(variant, keyword)
        variant.SOPInstanceUID = uid_from("sc", name)
        variant.file_meta.MediaStorageSOPInstanceUID = variant.SOPInstanceUID
        paths[name] = tmp_path / f"{name}.dcm"
        variant.save_as(paths[name], enforce_file_format=True)
    res = storescu(receiver.port, list(paths.values()), extra=["-d"])
    assert res.returncode == 0 and (res.stdout + res.stderr).lower().count("0x0000") >= 3
    with receiver.db.session() as s:
        stored = set(s.execute(select(Instance.sop_uid)).scalars())
    assert stored == {uid_from("sc", "sc_mg"), uid_from("sc", "sc_rg_view")}
    assert len(receiver.stored) == 2  # only the analysed ones reach completion


def _other_object(sop_class: str, study_uid: str, name: str) -> pydicom.Dataset:
    """A small non-image object of ``sop_class`` (a dose report, a presentation state...)."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid_from("other", name)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = uid_from("other-series", name)
    ds.Modality = "SR" if ".88." in sop_class else "PR"
    ds.PatientID = "OTHER1"
    return ds


@pytest.mark.parametrize("policy", ["discard", "keep"])
def test_objects_not_analysed_are_accepted_and_never_touch_the_study(
        tmp_path: Path, policy: str, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    stored: list = []
    r = local_receiver(spool, db, max_pdu_size=131072,
                       max_associations=8, on_stored=stored.append,
                       study=StudySettings(other_objects="keep" if policy == "keep"
                                           else "discard"))
    r.start()
    try:
        image = tmp_path / "img.dcm"
        ds = mias_to_mg("mdb209", image)
        assert storescu(r.port, [image]).returncode == 0
        with db.session() as s:
            before = s.execute(select(Study)).scalar_one()
        objects = []
        for name, sop_class in (("rdsr", "1.2.840.10008.5.1.4.1.1.88.67"),
                                ("gsps", "1.2.840.10008.5.1.4.1.1.11.1"),
                                ("cad", "1.2.840.10008.5.1.4.1.1.88.50"),
                                ("tomo-elsewhere", "1.2.840.10008.5.1.4.1.1.88.33")):
            path = tmp_path / f"{name}.dcm"
            study = ds.StudyInstanceUID if name != "tomo-elsewhere" else uid_from("unknown")
            _other_object(sop_class, study, name).save_as(path, enforce_file_format=True)
            objects.append(path)
        with caplog.at_level(logging.INFO, logger="node.receive"):
            res = storescu(r.port, objects, extra=["-d"])
            again = storescu(r.port, objects[:1])
        assert res.returncode == 0 and again.returncode == 0
        assert (res.stdout + res.stderr).lower().count("0x0000: success") == len(objects)
        with db.session() as s:
            after = s.execute(select(Study)).scalar_one()  # no study row for the unknown UID
            kept = s.execute(select(OtherObject)).scalars().all()
            n_instances = s.execute(select(func.count()).select_from(Instance)).scalar_one()
        # The study is not re-opened, not delayed, and its analysis input is unchanged.
        assert (after.state, after.last_received_at, after.generation) == (
            before.state, before.last_received_at, before.generation)
        assert n_instances == 1 and len(stored) == 1
        lines = [rec.getMessage() for rec in caplog.records
                 if "instance.not_analysed" in rec.getMessage()]
        assert len(lines) == len(objects) + 1
        assert any("kind=dose_report" in ln and "X-Ray Radiation Dose SR" in ln for ln in lines)
        if policy == "keep":
            assert sorted(k.kind for k in kept) == ["dose_report", "presentation_state",
                                                    "structured_report", "structured_report"]
            assert all(spool.path(k.relpath).exists() for k in kept)
            assert "action=duplicate" in lines[-1]
        else:
            assert kept == [] and "action=discarded" in lines[0]
            assert list(spool.instances.rglob("*.dcm")) == [spool.path(
                next(iter(_relpaths(db))))]
        assert list(spool.incoming.iterdir()) == []
    finally:
        r.stop()
        db.dispose()


def _relpaths(db: Database) -> list[str]:
    with db.session() as s:
        return list(s.execute(select(Instance.relpath)).scalars())


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
    r = local_receiver(spool, db, allowed_calling_aets=["PACS"], max_pdu_size=0,
                       max_associations=4)
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
    r = local_receiver(spool, db, max_pdu_size=0, max_associations=4,
                       min_free_mb=huge)
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
    # HTJ2K (OpenJPH, through imagecodecs; its default progression is RPCL): storescu cannot
    # propose these, `mammo-node send` proposes each file's own syntax.
    import imagecodecs
    from pydicom.encaps import encapsulate

    for uid, reversible in ((HTJ2KLossless, True), (HTJ2KLosslessRPCL, True), (HTJ2K, False)):
        ds = pydicom.dcmread(src)
        ds.PixelData = encapsulate([imagecodecs.htj2k_encode(ds.pixel_array,
                                                             reversible=reversible)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = uid
        if not reversible:
            ds.LossyImageCompression = "01"
        dst = out / f"{uid}.dcm"
        ds.save_as(dst, enforce_file_format=True)
        variants[str(uid)] = (dst, [])
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
    lossy = {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.203"}
    for row in rows:
        # decoded the way the analysis decodes (imagecodecs for JPEG 2000 and HTJ2K)
        pixels = decode_pixels(pydicom.dcmread(receiver.spool.path(row.relpath)))
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
    from tests.testdata import mg_dataset

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


def test_datasets_stream_into_incoming_and_the_process_tempdir_is_left_alone(
        receiver: Receiver) -> None:
    # pynetdicom creates each chunked dataset's temp file without naming a folder: it must land
    # in the spool's incoming/ (same filesystem: adopting is a rename; swept at start), while
    # every other temp file of the process (reports, models, tests) stays in the system's.
    import tempfile

    from node import fastrecv

    assert Path(tempfile.gettempdir()) != receiver.spool.incoming
    f = fastrecv._HashingTempFile(delete=False, mode="wb", suffix=".dcm")  # pynetdicom's call
    try:
        assert Path(f.name).parent == receiver.spool.incoming
    finally:
        f.close()
        Path(f.name).unlink()
        fastrecv.take_digest(f.name)
    with tempfile.NamedTemporaryFile() as other:
        assert Path(other.name).parent != receiver.spool.incoming
