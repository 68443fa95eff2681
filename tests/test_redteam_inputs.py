"""Red team, input side, in-process (no network): what the C-STORE header check and the decode
entry do with bombs, impossible value lengths and unknown character sets.

* Every element of a real MG header given a wrong value length (+1, +2, -1, -2, +8, +40 bytes)
  is refused as unreadable, 0xC003, as the conformance statement promises (before: some were
  0xC002 or 0xC004 and some were even stored).
* The decode entry (``prepare``) refuses a real JPEG-LS or JPEG 2000 bomb (a few KB decoding to
  20000 x 20000) before decoding, in milliseconds and without the gigabytes, whether the DICOM
  header tells the truth or lies about the size; the pipeline records it as a failed image.
* The decode budget never lets concurrent decodes hold more than it allows.
* Codestream headers are read right for the formats the node accepts.
"""

from __future__ import annotations

import struct
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from node.analysis.prepare import prepare
from node.charset import charset_problem, defined_term, normalise_for_copy
from node.codestream import frame_header
from node.decode_limits import DecodeBudget, ImageLimits, LimitExceeded
from node.receive import STATUS_UNREADABLE, Receiver, Refused
from tests.bombs import bomb_instance
from tests.reliability import MG_FOR_PRESENTATION, file_meta_bytes
from tests.test_hostile import _body, _image
from tests.testdata import mg_dataset, uid_from


def _elements(body: bytes) -> list[tuple[tuple[int, int], int, str, int]]:
    """(tag, offset of the length field, struct format, length) of each top-level element."""
    long_vrs = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"}
    out, i = [], 0
    while i < len(body):
        group, element = struct.unpack_from("<HH", body, i)
        vr = body[i + 4:i + 6]
        if vr in long_vrs:
            length, pos, fmt, header = struct.unpack_from("<I", body, i + 8)[0], i + 8, "<I", 12
        else:
            length, pos, fmt, header = struct.unpack_from("<H", body, i + 6)[0], i + 6, "<H", 8
        out.append(((group, element), pos, fmt, length))
        if length == 0xFFFFFFFF:
            break
        i += header + length
    return out


def test_every_wrong_value_length_is_refused_as_unreadable(tmp_path: Path) -> None:
    receiver = object.__new__(Receiver)  # only the header check, no listener
    receiver.limits = ImageLimits()
    body = _body(_image("lengths"))
    sop = uid_from("hostile", "lengths")
    statuses: dict[str, int] = {}
    for tag, pos, fmt, length in _elements(body):
        if tag == (0x7FE0, 0x0010):
            continue  # short pixel data is 0xC004 by definition (tested in test_hostile)
        for delta in (1, 2, -1, -2, 8, 40):
            if not 0 <= length + delta <= 0xFFFF:
                continue
            mutant = bytearray(body)
            struct.pack_into(fmt, mutant, pos, length + delta)
            path = tmp_path / "m.dcm"
            path.write_bytes(file_meta_bytes(MG_FOR_PRESENTATION, sop) + bytes(mutant))
            try:
                receiver._check_header(path, sop, MG_FOR_PRESENTATION)
                status = 0
            except Refused as refusal:
                status = refusal.status
            statuses[f"({tag[0]:04X},{tag[1]:04X}){delta:+d}"] = status
    wrong = {k: f"0x{v:04X}" for k, v in statuses.items() if v != STATUS_UNREADABLE}
    print(f"\nvalue lengths: {len(statuses)} mutants, all 0xC003 but {wrong}")
    assert len(statuses) > 300
    assert wrong == {}


@pytest.mark.parametrize("kind", ["jpegls", "j2k"])
@pytest.mark.parametrize("header_side", [20000, 256])
def test_decode_entry_refuses_a_bomb_before_decoding(tmp_path: Path, kind: str,
                                                     header_side: int) -> None:
    path = bomb_instance(tmp_path / f"{kind}.dcm", kind, header_side)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(LimitExceeded) as refused:
        prepare(path)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"\n{kind} bomb, header {header_side}: refused in {seconds * 1000:.0f} ms, "
          f"{peak / 2**20:.1f} MiB traced: {refused.value}")
    assert ("limits.max_rows" in str(refused.value)) if header_side == 20000 else \
        ("20000 x 20000" in str(refused.value))
    assert seconds < 1.0
    assert peak < 32 << 20  # the file is read; nothing is decoded (before: 0.4-2 GB, 1-15 s)


def test_mammography_and_tomosynthesis_sizes_pass_the_limits() -> None:
    from node.decode_limits import Geometry, check_declared

    limits = ImageLimits()
    for g in (Geometry(4096, 3328, 1, 1, 16),  # Hologic / Siemens FFDM
              Geometry(5928, 4728, 1, 1, 16),  # Fuji 50 um
              Geometry(2457, 1996, 120, 1, 16),  # tomosynthesis slices
              Geometry(4096, 3328, 100, 1, 16)):  # high-resolution tomosynthesis, 2.6 GiB
        check_declared(g, limits)
    with pytest.raises(LimitExceeded):
        check_declared(Geometry(20000, 20000, 1, 1, 8), limits)
    with pytest.raises(LimitExceeded):
        check_declared(Geometry(4096, 4096, 5000, 1, 16), limits)


def test_codestream_headers_are_read(tmp_path: Path) -> None:
    px = (np.arange(96 * 80, dtype=np.uint16).reshape(96, 80) % 4096)
    ds = mg_dataset(px, patient_id="CS", study_uid=uid_from("cs", "st"),
                    sop_uid=uid_from("cs", "i"), laterality="L", view="CC", spacing_mm=0.1,
                    bits_stored=12)
    # (JPEG Lossless has no encoder in pydicom: test_receive sends dcmtk-encoded ones through
    # the same check.)
    for syntax, kind in ((JPEGLSLossless, "JPEG-LS"), (JPEG2000Lossless, "JPEG 2000")):
        copy = pydicom.dcmread(_save(ds, tmp_path / "src.dcm"))
        copy.compress(syntax)
        frame = next(pydicom.encaps.generate_frames(copy.PixelData, number_of_frames=1))
        fh = frame_header(str(syntax), frame)
        assert fh is not None and (fh.rows, fh.columns, fh.components, fh.kind) == \
            (96, 80, 1, kind), fh
        assert fh.bits in (12, 16)
    copy = pydicom.dcmread(_save(ds, tmp_path / "src.dcm"))
    copy.compress(RLELossless)
    frame = next(pydicom.encaps.generate_frames(copy.PixelData, number_of_frames=1))
    assert frame_header(RLELossless, frame).components == 2  # two byte planes for 16 bits


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_decode_budget_bounds_concurrent_reservations() -> None:
    budget = DecodeBudget(100)
    held, peak, lock = [0], [0], threading.Lock()

    def work(n: int) -> None:
        with budget.reserve(n):
            with lock:
                held[0] += min(n, 100)
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= min(n, 100)

    threads = [threading.Thread(target=work, args=(n,)) for n in [40, 40, 40, 70, 250, 10] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] <= 100  # a 250 reservation ran alone (capped to the whole budget)
    assert budget.peak_reserved <= 100


def test_character_sets() -> None:
    assert defined_term("ISO_IR 100") == "ISO_IR 100"
    assert defined_term("ISO-IR 100") == "ISO_IR 100"  # a common misspelling
    assert defined_term("ISO_IR100") == "ISO_IR 100"
    assert defined_term("ISO 2022 IR 87") == "ISO 2022 IR 87"
    assert defined_term("ISO_IR 999") is None
    ds = _image("charset")
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.PatientName = "TEST^ASCII"
    assert charset_problem(_reread(ds)) is None  # ASCII reads the same in any character set
    out = normalise_for_copy(_reread(ds))
    assert "SpecificCharacterSet" not in out and str(out.PatientName) == "TEST^ASCII"
    ds.SpecificCharacterSet = "ISO-IR 100"
    ds.PatientName = "M\u00fcller^Anna"
    assert charset_problem(_reread(ds)) is None
    out = normalise_for_copy(_reread(ds))
    assert out.SpecificCharacterSet == "ISO_IR 100" and str(out.PatientName) == "M\u00fcller^Anna"


def _reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buf.getvalue()), defer_size=4096)
