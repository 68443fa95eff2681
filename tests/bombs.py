"""Decompression bombs wrapped as MG instances: tiny files that decode to 20000 x 20000.

``tests/data/bombs/zeros-20000.jls`` (JPEG-LS, 2.7 KB) and ``zeros-20000.j2k`` (JPEG 2000
codestream, 838 bytes) are real codestreams of a 20000 x 20000 8-bit image of zeros: decoding
one takes 0.4 GB (JPEG-LS) or 2 GB (OpenJPEG) and seconds of CPU. They were made once with
``tests/data/bombs/make_bombs.py``.

:func:`bomb_instance` wraps one in an MG For Presentation dataset whose Rows/Columns either say
the truth (20000 x 20000: the header alone shows the bomb) or lie (256 x 256: only the codestream
header shows it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from tests.testdata import mg_dataset, uid_from

BOMBS = Path(__file__).resolve().parent / "data" / "bombs"
SIDE = 20000
CODESTREAMS = {"jpegls": (BOMBS / "zeros-20000.jls", JPEGLSLossless),
               "j2k": (BOMBS / "zeros-20000.j2k", JPEG2000Lossless)}


def bomb_instance(out: Path, kind: str, header_side: int = SIDE, tag: str = "bomb",
                  study_uid: str | None = None, laterality: str = "L",
                  view: str = "CC") -> Path:
    """Write an MG instance holding the ``kind`` bomb; its header declares ``header_side``²."""
    stream_path, syntax = CODESTREAMS[kind]
    ds = mg_dataset(np.zeros((8, 8), dtype=np.uint8), patient_id="BOMB",
                    study_uid=study_uid or uid_from(tag, "study"),
                    sop_uid=uid_from(tag, kind, str(header_side), laterality, view),
                    laterality=laterality, view=view, spacing_mm=0.1, bits_stored=8)
    ds.Rows = ds.Columns = header_side
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = encapsulate([stream_path.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.LossyImageCompression = "00"
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out
