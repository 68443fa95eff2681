"""What a compressed frame's own header declares: rows, columns, components, bit depth.

A DICOM header and the codestream inside its Pixel Data can disagree; the decoder believes the
codestream. A 2.7 KB JPEG-LS stream declaring 20000 x 20000 inside an object whose Rows/Columns
say 256 x 256 makes the decoder allocate 400 MB (2 GB for OpenJPEG), so the node reads the
codestream header (a few dozen bytes, no decoding) and compares before anything is decoded.

Parsed: JPEG (ISO 10918: SOF0-SOF15, the lossless SV1 / process 14 syntaxes), JPEG-LS (ISO 14495:
SOF55) and JPEG 2000 (ISO 15444-1: SIZ, raw codestream or inside a JP2 file). RLE has no
dimensions of its own (the decoder uses Rows/Columns); its header gives the segment count.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

JPEG_FAMILY = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
}
JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
             "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
RLE = "1.2.840.10008.1.2.5"

#: Start-of-frame markers: JPEG SOF0..SOF15 without DHT (C4), JPG (C8) and DAC (CC); JPEG-LS F7.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length


class CodestreamError(ValueError):
    """The codestream header cannot be read (truncated, not the declared format)."""


@dataclass(frozen=True)
class FrameHeader:
    rows: int
    columns: int
    components: int
    bits: int  # sample precision of the first component
    kind: str  # "JPEG", "JPEG-LS", "JPEG 2000", "RLE"


def frame_header(transfer_syntax: str, data: bytes) -> FrameHeader | None:
    """The header of the first frame's codestream ``data`` (its first bytes are enough), or
    None for a transfer syntax with no own dimensions. Raises :class:`CodestreamError`."""
    if transfer_syntax in JPEG_FAMILY:
        return _jpeg(data)
    if transfer_syntax in JPEG_2000:
        return _j2k(data)
    if transfer_syntax == RLE:
        return _rle(data)
    return None


def _jpeg(data: bytes) -> FrameHeader:
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("no JPEG SOI marker at the start of the frame")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise CodestreamError(f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _SOF:
            if i + 10 > len(data):
                break
            bits, rows, cols, comps = struct.unpack_from(">BHHB", data, i + 4)
            kind = "JPEG-LS" if marker == 0xF7 else "JPEG"
            return FrameHeader(rows, cols, comps, bits, kind)
        if marker == 0xDA:  # start of scan before any frame header
            raise CodestreamError("JPEG scan before its frame header")
        i += 2 + length
    raise CodestreamError("no JPEG frame header (SOF) in the first bytes of the frame")


def _j2k(data: bytes) -> FrameHeader:
    start = data.find(b"\xff\x4f\xff\x51")  # SOC + SIZ; JP2 wraps it in a jp2c box
    if start < 0 or (start > 0 and data[:4] != b"\x00\x00\x00\x0c" and start > 64):
        raise CodestreamError("no JPEG 2000 SOC/SIZ markers at the start of the frame")
    i = start + 4
    if i + 38 > len(data):
        raise CodestreamError("JPEG 2000 SIZ marker segment truncated")
    _, _, xsiz, ysiz, xo, yo, _, _, _, _, csiz = struct.unpack_from(">HHIIIIIIIIH", data, i)
    if csiz < 1 or i + 38 + 3 > len(data):
        raise CodestreamError("JPEG 2000 SIZ declares no components")
    ssiz = data[i + 38]
    if xsiz <= xo or ysiz <= yo:
        raise CodestreamError("JPEG 2000 SIZ declares an empty image")
    return FrameHeader(ysiz - yo, xsiz - xo, csiz, (ssiz & 0x7F) + 1, "JPEG 2000")


def _rle(data: bytes) -> FrameHeader:
    if len(data) < 64:
        raise CodestreamError("RLE header shorter than 64 bytes")
    (segments,) = struct.unpack_from("<I", data, 0)
    if not 1 <= segments <= 15:
        raise CodestreamError(f"RLE header declares {segments} segments (1-15 allowed)")
    return FrameHeader(0, 0, segments, 0, "RLE")
