"""Hostile input over real sockets: the node (a real process) keeps listening, answers the right
DIMSE status, and quarantines each refused object with a reason in the log.

Each case is sent as raw bytes (a valid File Meta header in front of a hostile dataset body), so
that nothing on the sending side repairs it. The fuzz test sends >= 1,200 mutated real datasets
and then checks that the node still answers C-ECHO and stores a valid study.
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.netutil import NodeProcess, storescu
from tests.reliability import (
    MG_FOR_PRESENTATION,
    NO_RESPONSE,
    RawSender,
    echo,
    file_meta_bytes,
    quarantine_reasons,
    stored_sop_uids,
)
from tests.smallstudies import small_study, sop_uids
from tests.testdata import mg_dataset, mias_pixels, uid_from

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage: never accepted

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

FUZZ_MUTATIONS = 1200


def _image(tag: str, size: int = 64) -> Dataset:
    px = mias_pixels("mdb209")[400:400 + size, 400:400 + size].astype(np.uint16) << 4
    return mg_dataset(px, patient_id="HOSTILE", study_uid=uid_from("hostile", "study"),
                      sop_uid=uid_from("hostile", tag), laterality="R", view="CC",
                      spacing_mm=0.2, bits_stored=12)


def _body(ds: Dataset) -> bytes:
    """The dataset encoded in Explicit VR Little Endian, without preamble and File Meta."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    group_len = struct.unpack_from("<I", raw, 132 + 8)[0]
    return raw[132 + 12 + group_len:]


def _write(path: Path, body: bytes, sop_uid: str, sop_class: str = MG_FOR_PRESENTATION) -> Path:
    path.write_bytes(file_meta_bytes(sop_class, sop_uid) + body)
    return path


def _patch(body: bytes, tag: tuple[int, int], vr: bytes, new_vr: bytes | None = None,
           new_length: int | None = None, new_value: bytes | None = None) -> bytes:
    """Rewrite one short-VR explicit element (group, element, VR, 2-byte length, value)."""
    head = struct.pack("<HH", *tag) + vr
    i = body.index(head)
    length = struct.unpack_from("<H", body, i + 6)[0]
    value = body[i + 8:i + 8 + length]
    if new_value is not None:
        value = new_value
    out_vr = new_vr or vr
    if out_vr in (b"UL", b"US") and new_vr is not None:
        encoded = out_vr + struct.pack("<H", len(value))
    else:
        encoded = out_vr + struct.pack("<H", len(value) if new_length is None else new_length)
    return body[:i] + struct.pack("<HH", *tag) + encoded + value + body[i + 8 + length:]


def _hostile_cases(d: Path) -> list[tuple[str, Path, int]]:
    """(name, file, expected status) for each kind of hostile input."""
    d.mkdir(parents=True, exist_ok=True)
    cases: list[tuple[str, Path, int]] = []

    def add(name: str, ds_or_body: Dataset | bytes, status: int, sop_uid: str | None = None,
            sop_class: str = MG_FOR_PRESENTATION) -> None:
        body = ds_or_body if isinstance(ds_or_body, bytes) else _body(ds_or_body)
        sop = sop_uid or uid_from("hostile", name)
        cases.append((name, _write(d / f"{name}.dcm", body, sop, sop_class), status))

    full = _body(_image("truncated-pixels"))
    add("truncated in pixel data", full[:int(len(full) * 0.6)], 0xC003,
        uid_from("hostile", "truncated-pixels"))
    add("truncated in header", _body(_image("truncated-header"))[:300], 0xC003,
        uid_from("hostile", "truncated-header"))
    ok = _body(_image("wrong-length"))
    add("value length overruns", _patch(ok, (0x0010, 0x0010), b"PN", new_length=0xFFF0),
        0xC003, uid_from("hostile", "wrong-length"))
    ok = _body(_image("odd-length"))
    add("US element with odd length", _patch(ok, (0x0028, 0x0010), b"US",
                                            new_value=b"\x40\x00\x00"), 0xC003,
        uid_from("hostile", "odd-length"))
    ok = _body(_image("bad-vr"))
    add("unknown VR", _patch(ok, (0x0028, 0x0011), b"US", new_vr=b"ZZ"), 0xC003,
        uid_from("hostile", "bad-vr"))
    ds = _image("no-pixels")
    del ds.PixelData
    add("missing pixel data", ds, 0xC004, uid_from("hostile", "no-pixels"))
    ds = _image("empty-pixels")
    ds.PixelData = b""
    add("empty pixel data", ds, 0xC004, uid_from("hostile", "empty-pixels"))
    ds = _image("short-pixels")
    ds.PixelData = ds.PixelData[:100]
    add("short pixel data", ds, 0xC004, uid_from("hostile", "short-pixels"))
    ds = _image("absurd-us")
    ds.Rows = ds.Columns = 65535
    add("65535 x 65535 declared", ds, 0xC004, uid_from("hostile", "absurd-us"))
    ds = _image("absurd-ul")
    body = _body(ds)
    for tag in ((0x0028, 0x0010), (0x0028, 0x0011)):  # Rows/Columns as UL 100000
        body = _patch(body, tag, b"US", new_vr=b"UL", new_value=struct.pack("<I", 100000))
    add("100000 x 100000 declared", body, 0xC004, uid_from("hostile", "absurd-ul"))
    ds = Dataset()  # an SR-like, non-image object claiming the MG SOP class
    ds.SOPClassUID, ds.SOPInstanceUID = MG_FOR_PRESENTATION, uid_from("hostile", "non-image")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid_from("h", "st"), uid_from("h", "se")
    ds.Modality = "MG"
    ds.ValueType, ds.ConceptNameCodeSequence = "CONTAINER", []
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    add("non-image object as MG", ds, 0xC004, uid_from("hostile", "non-image"))
    ds = _image("path-uid")
    ds.SOPInstanceUID = "../../../../etc/passwd"
    add("path-like SOP Instance UID", ds, 0xC002, "../../../../etc/passwd")
    ds = _image("path-study")
    ds.StudyInstanceUID = "1.2/../../x"
    add("path-like Study Instance UID", ds, 0xC002, uid_from("hostile", "path-study"))
    ds = _image("long-uid")
    ds.SOPInstanceUID = "1." + "2" * 120
    add("over-long SOP Instance UID", ds, 0xC002, uid_from("hostile", "long-uid"))
    ds = _image("conflict")
    add("conflict: first copy", ds, 0x0000, uid_from("hostile", "conflict"))
    ds = _image("conflict")
    ds.PixelData = bytes(len(ds.PixelData))
    add("conflict: same UID, other pixels", ds, 0xC005, uid_from("hostile", "conflict"))
    ds = _image("huge-private")
    ds.add_new(0x00090010, "LO", "HOSTILE PRIVATE")
    ds.add_new(0x00091000, "OB", bytes(24 * 1024 * 1024))
    add("24 MB private element (valid image)", ds, 0x0000, uid_from("hostile", "huge-private"))
    ds = _image("huge-declared")
    ds.add_new(0x00090010, "LO", "HOSTILE PRIVATE")
    ds.add_new(0x00091000, "OB", b"\x00" * 16)
    body = _body(ds)
    i = body.index(struct.pack("<HH", 0x0009, 0x1000) + b"OB")
    body = body[:i + 8] + struct.pack("<I", 0x7FFFFFF0) + body[i + 12:]
    add("private element declares 2 GB", body, 0xC003, uid_from("hostile", "huge-declared"))
    return cases


def test_hostile_inputs_get_the_right_status_and_are_quarantined(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node",
                       study={"stable_seconds": 600, "complete_on_four_views": False}).start()
    cases = _hostile_cases(tmp_path / "cases")
    got: dict[str, int] = {}
    try:
        sender = RawSender(node.port)
        for name, path, _ in cases:
            got[name] = sender.send(path)
            sender.close()  # a fresh association per case: one bad object, one verdict
        # An object of a class the node does not take never gets a presentation context.
        ct = RawSender(node.port, sop_classes=[CT_CLASS])
        ds = _image("ct-class")
        ds.SOPClassUID = CT_CLASS
        with pytest.raises(ConnectionError):  # no accepted presentation context at all
            ct.send(_write(tmp_path / "ct.dcm", _body(ds), uid_from("h", "ct"), CT_CLASS))
        assert echo(node.port) == 0x0000
        assert node.proc is not None and node.proc.poll() is None
    finally:
        node.stop()
    expected = {name: status for name, _, status in cases}
    assert {k: f"0x{v:04X}" for k, v in got.items()} == \
        {k: f"0x{v:04X}" for k, v in expected.items()}
    refused = [name for name, _, status in cases if status != 0]
    reasons = quarantine_reasons(node.data_dir)
    assert len(reasons) == len(refused), reasons
    log = node.log()
    assert log.count("instance.quarantined") == len(refused)
    for code in ("0xC002", "0xC003", "0xC004", "0xC005"):
        assert f"status={code}" in log
    # Nothing named after a peer's UID ever reached the disk; the valid ones are stored.
    assert not any("passwd" in str(p) for p in node.data_dir.rglob("*"))
    assert stored_sop_uids(node.data_dir) == {uid_from("hostile", "conflict"),
                                              uid_from("hostile", "huge-private")}
    assert "Traceback" not in log


def _mutate(body: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(body)
    kind = rng.choice(["flip", "bytes", "truncate", "insert", "delete", "length", "tag"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "bytes":
        i = rng.randrange(len(data))
        data[i:i + rng.randint(1, 16)] = rng.randbytes(rng.randint(1, 16))
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind == "insert":
        i = rng.randrange(len(data))
        data[i:i] = rng.randbytes(rng.randint(1, 64))
    elif kind == "delete":
        i = rng.randrange(len(data))
        del data[i:i + rng.randint(1, 64)]
    elif kind in ("length", "tag"):
        # Corrupt a length field or a tag in the header part, where it hurts most.
        header_end = max(8, len(data) - 64 * 64 * 2 - 12)
        i = rng.randrange(0, header_end - 4)
        data[i:i + 4] = struct.pack("<I", rng.choice([0, 1, 3, 0xFFFF, 0xFFFFFFFF,
                                                      rng.randrange(1 << 32)]))
    return kind, bytes(data)


def test_fuzz_mutated_datasets_then_echo_and_a_valid_study(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node",
                       study={"stable_seconds": 600, "complete_on_four_views": False}).start()
    rng = random.Random(20261129)
    statuses: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    fuzz_dir = tmp_path / "fuzz"
    fuzz_dir.mkdir()
    t0 = time.monotonic()
    try:
        sender = RawSender(node.port)
        for n in range(FUZZ_MUTATIONS):
            sop = uid_from("fuzz", str(n))
            base = _image(f"fuzz-{n % 4}")
            base.SOPInstanceUID = sop  # distinct UIDs: most mutants take the storing path
            kind, body = _mutate(_body(base), rng)
            kinds[kind] += 1
            path = _write(fuzz_dir / "mutant.dcm", body, sop)
            status = sender.send(path)
            statuses["none" if status == NO_RESPONSE else f"0x{status:04X}"] += 1
        sender.close()
        duration = time.monotonic() - t0
        assert echo(node.port) == 0x0000
        study = small_study(tmp_path / "valid", 1, tag="afterfuzz")
        res = storescu(node.port, study)
        assert res.returncode == 0, res.stdout + res.stderr
        assert node.proc is not None and node.proc.poll() is None
    finally:
        node.stop()
    print(f"\nfuzz: {FUZZ_MUTATIONS} mutations in {duration:.1f} s; statuses "
          f"{dict(sorted(statuses.items()))}; mutation kinds {dict(sorted(kinds.items()))}")
    assert sum(statuses.values()) == FUZZ_MUTATIONS
    assert set(statuses) <= {"0x0000", "0xC002", "0xC003", "0xC004", "0xC005"}, statuses
    assert statuses["0xC003"] > 0 and statuses["0x0000"] > 0
    assert sop_uids(study) <= stored_sop_uids(node.data_dir)
    log = node.log()
    assert "Traceback" not in log
    assert log.count("instance.quarantined") == FUZZ_MUTATIONS - statuses["0x0000"]
