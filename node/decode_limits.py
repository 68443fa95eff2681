"""Limits on what an image may declare, checked before anything is decoded, and a budget on
the memory that decoding may take at once.

Used twice with the same rules: by the C-STORE handler (node.receive), so that an object over
the limits is refused with 0xC004 while the sender is still connected, and at the decode entry of
the analysis (node.analysis.prepare), which also covers instances stored before a limit was
lowered. Checked, in this order:

1. the DICOM header: Rows, Columns, Number of Frames and the decoded size
   (Rows x Columns x Frames x Samples x Bits Allocated / 8) against ``[limits]``;
2. for compressed transfer syntaxes, the first frame's codestream header (node.codestream): it
   must declare the same rows, columns and components as the DICOM header, and no more bits than
   Bits Allocated. A decoder trusts the codestream, so a lie here is how a 3 KB file asks for
   gigabytes;
3. a Deflated dataset may inflate to at most ``min(max_decoded_mb, 1024)`` MiB (pydicom inflates
   it in memory to read even the header).

:class:`DecodeBudget` bounds the memory of concurrent decodes (``[analysis] decode_memory_mb``):
each decode reserves its working-set estimate first and waits while the budget is spent; a single
image larger than the whole budget waits until it can run alone.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.codestream import CodestreamError, frame_header
from node.config import LimitsSettings as ImageLimits  # [limits]: the same four keys

PIXEL_DATA = Tag(0x7FE0, 0x0010)
DEFLATED = "1.2.840.10008.1.2.1.99"
_HEADER_BYTES = 64 * 1024  # enough for any codestream's main header before its frame header
MAX_INFLATED_MB = 1024


class LimitExceeded(ValueError):
    """An image declares more than the limits allow, or its codestream contradicts its header.
    The message names the limit (config key) or the contradiction."""


@dataclass(frozen=True)
class Geometry:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int

    @property
    def decoded_bytes(self) -> int:
        return self.rows * self.columns * self.frames * self.samples * \
            max(1, self.bits_allocated // 8)


def geometry(ds: Dataset) -> Geometry:
    """The declared image geometry; raises ValueError/TypeError/AttributeError when missing."""
    return Geometry(int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1),
                    int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated))


def check_declared(g: Geometry, limits: ImageLimits) -> None:
    """Raise :class:`LimitExceeded` when the declared geometry is over a limit."""
    if g.rows > limits.max_rows or g.columns > limits.max_columns:
        raise LimitExceeded(f"declares {g.rows} x {g.columns} pixels, over the limits "
                            f"(limits.max_rows = {limits.max_rows}, limits.max_columns = "
                            f"{limits.max_columns})")
    if g.frames > limits.max_frames:
        raise LimitExceeded(f"declares {g.frames} frames, over limits.max_frames = "
                            f"{limits.max_frames}")
    mb = g.decoded_bytes / 2**20
    if mb > limits.max_decoded_mb:
        raise LimitExceeded(f"would decode to {mb:.0f} MiB, over limits.max_decoded_mb = "
                            f"{limits.max_decoded_mb}")


def check_codestream(transfer_syntax: str, first_frame: bytes | None, g: Geometry) -> None:
    """Raise :class:`LimitExceeded` when the first frame's codestream header disagrees with
    the DICOM header (or cannot be read at all)."""
    if first_frame is None:
        return
    try:
        fh = frame_header(transfer_syntax, first_frame)
    except CodestreamError as exc:
        raise LimitExceeded(f"compressed frame unreadable: {exc}") from None
    if fh is None:
        return
    if fh.kind == "RLE":
        expected = g.samples * max(1, g.bits_allocated // 8)
        if fh.components != expected:
            raise LimitExceeded(f"RLE frame has {fh.components} segments, the header needs "
                                f"{expected}")
        return
    if (fh.rows, fh.columns) != (g.rows, g.columns) or fh.components != g.samples:
        raise LimitExceeded(f"{fh.kind} codestream declares {fh.rows} x {fh.columns} x "
                            f"{fh.components}, the DICOM header {g.rows} x {g.columns} x "
                            f"{g.samples}")
    if fh.bits > g.bits_allocated:
        raise LimitExceeded(f"{fh.kind} codestream declares {fh.bits} bits per sample, more "
                            f"than Bits Allocated {g.bits_allocated}")


def first_frame_bytes(path: Path, ds: Dataset) -> bytes | None:
    """The first bytes of the first fragment of encapsulated Pixel Data, read from the file at
    the element's offset (without loading the pixel data); None when not encapsulated or not
    locatable (deflated datasets have no file offsets: the decoder checks those)."""
    if not ds.file_meta.TransferSyntaxUID.is_compressed or \
            ds.file_meta.TransferSyntaxUID == DEFLATED:
        return None
    elem = ds._dict.get(PIXEL_DATA)
    offset = getattr(elem, "value_tell", None)
    if elem is None or offset is None:
        value = getattr(elem, "value", None) if elem is not None else None
        return _first_fragment(value[:_HEADER_BYTES * 2]) if isinstance(value, bytes) else None
    with open(path, "rb") as fh:
        fh.seek(int(offset))
        return _first_fragment(fh.read(_HEADER_BYTES + 1024))


def first_frame_of_value(value: bytes) -> bytes | None:
    """:func:`first_frame_bytes` for Pixel Data already in memory."""
    return _first_fragment(value[:_HEADER_BYTES + 1024])


def _first_fragment(data: bytes) -> bytes:
    """Skip the Basic Offset Table item; return the start of the first fragment's value."""
    i = 0
    for _ in range(2):
        if len(data) < i + 8:
            raise LimitExceeded("encapsulated Pixel Data truncated before its first fragment")
        group, element, length = struct.unpack_from("<HHI", data, i)
        if (group, element) != (0xFFFE, 0xE000):
            raise LimitExceeded("encapsulated Pixel Data does not start with an item")
        if _ == 0:  # the Basic Offset Table
            i += 8 + length
            continue
        return data[i + 8:i + 8 + min(length, _HEADER_BYTES)]
    raise AssertionError("unreachable")


def check_inflated_size(path: Path, limits: ImageLimits) -> None:
    """A Deflated dataset must inflate to at most min(max_decoded_mb, 1024) MiB; streamed, so
    checking never holds more than a few MiB."""
    cap = min(limits.max_decoded_mb, MAX_INFLATED_MB) * 2**20
    with open(path, "rb") as fh:
        fh.seek(128 + 4)
        head = fh.read(12)
        group_len = struct.unpack_from("<I", head, 8)[0] if len(head) == 12 else 0
        fh.seek(128 + 4 + 12 + group_len)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            data = chunk
            while data:
                out = inflater.decompress(data, 16 << 20)
                total += len(out)
                if total > cap:
                    raise LimitExceeded(f"Deflated dataset inflates to more than {cap >> 20} "
                                        "MiB (min(limits.max_decoded_mb, 1024))")
                data = inflater.unconsumed_tail
            if inflater.eof:
                break


class DecodeBudget:
    """Bytes of decoded pixels (and their float copies) that may exist at once."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(1, int(budget_bytes))
        self._free = self.budget
        self._cond = threading.Condition()
        self.peak_reserved = 0

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Wait until ``nbytes`` (at most the whole budget) are free and hold them."""
        need = min(max(0, int(nbytes)), self.budget)
        with self._cond:
            self._cond.wait_for(lambda: self._free >= need)
            self._free -= need
            self.peak_reserved = max(self.peak_reserved, self.budget - self._free)
        try:
            yield
        finally:
            with self._cond:
                self._free += need
                self._cond.notify_all()


def working_set_bytes(g: Geometry) -> int:
    """Estimated peak memory to decode and prepare one frame: the decoded array plus the
    float32 copies the preparation makes (node.analysis.prepare: ~3 at once)."""
    pixels = g.rows * g.columns * g.samples
    return pixels * (max(1, g.bits_allocated // 8) + 12)
