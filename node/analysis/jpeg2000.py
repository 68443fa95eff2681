"""JPEG 2000 and High-Throughput JPEG 2000 decode through imagecodecs.

pydicom's JPEG 2000 plugin (pylibjpeg-openjpeg) decodes single-threaded and holds the GIL, so
the four images of a study (and the receiver's threads) wait on each other. imagecodecs'
bindings release the GIL: OpenJPEG with ``numthreads`` for JPEG 2000 (1.2.840.10008.1.2.4.90,
.91), OpenJPH for HTJ2K (1.2.840.10008.1.2.4.201, .202, .203; OpenJPEG, which also reads HT
code-blocks, if OpenJPH refuses a codestream). Anything else, and any frame that does not
decode to the header's Rows x Columns, goes back to pydicom (:func:`decode_pixels`), which
keeps every other transfer syntax and its checks as they were. Uncompressed little-endian
frames of 8- or 16-bit integers are read straight from the pixel bytes (:func:`native_pixels`):
pydicom's ``pixel_array`` gives the same array after a copy and two shift passes (~5 ms for a
3328 x 4096 image; this takes one pass).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

log = logging.getLogger("node.analysis.jpeg2000")

JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
HTJ2K = {"1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}

try:  # a declared dependency; the node still decodes through pydicom without it
    import imagecodecs
except ImportError:  # pragma: no cover - exercised only where imagecodecs is missing
    imagecodecs = None  # type: ignore[assignment]  # None marks the optional module missing


def decode_threads() -> int:
    """Threads one JPEG 2000 decode may use: the CPUs, at most 4 (beyond, little is gained)."""
    return max(1, min(4, os.cpu_count() or 1))


def available() -> bool:
    return imagecodecs is not None


def decode_codestream(data: bytes, transfer_syntax: str, threads: int | None = None
                      ) -> np.ndarray:
    """Decode one JPEG 2000 / HTJ2K codestream (or JP2 file) with imagecodecs."""
    if imagecodecs is None:
        raise RuntimeError("imagecodecs is not installed")
    n = threads or decode_threads()
    if transfer_syntax in HTJ2K:
        try:
            return imagecodecs.htj2k_decode(data)
        except Exception as exc:  # noqa: BLE001 - any codec error: OpenJPEG reads HT code-blocks too
            log.debug("OpenJPH refused the codestream (%s): OpenJPEG", exc)
    return imagecodecs.jpeg2k_decode(data, numthreads=n)


NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def native_pixels(ds: Dataset) -> np.ndarray | None:
    """The single uncompressed little-endian frame of ``ds`` exactly as pydicom's
    ``pixel_array`` gives it (a new, writeable array; the bits above Bits Stored cleared, or
    sign-extended for signed data, PS3.5 8.1.1), or None when ``ds`` is anything else (other
    syntaxes, sizes, several frames or samples, a pixel data length other than the header's):
    pydicom decides those."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax not in NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        stored = int(ds.get("BitsStored", bits))
        signed = int(ds.get("PixelRepresentation", 0))
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
            return None
    except (AttributeError, TypeError, ValueError):
        return None
    if bits not in (8, 16) or not 1 <= stored <= bits or signed not in (0, 1) or \
            rows < 1 or cols < 1:
        return None
    data = ds.PixelData
    n = rows * cols * (bits // 8)
    if not isinstance(data, bytes | bytearray) or len(data) not in (n, n + (n & 1)):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    view = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
    arr = np.empty((rows, cols), dtype.newbyteorder("="))  # writeable, native byte order
    if stored == bits:
        np.copyto(arr, view)
        return arr
    if not signed:  # one pass: copy and clear the unused high bits
        np.bitwise_and(view, np.array((1 << stored) - 1, dtype=arr.dtype), out=arr)
        return arr
    np.copyto(arr, view)  # sign-extend from Bits Stored, as pydicom does
    shift = bits - stored
    np.left_shift(arr, shift, out=arr)
    np.right_shift(arr, shift, out=arr)
    return arr


def decode_pixels(ds: Dataset, threads: int | None = None) -> np.ndarray:
    """The single frame of ``ds`` as pydicom's ``pixel_array`` would give it: JPEG 2000 and
    HTJ2K through imagecodecs, uncompressed little-endian integers from their bytes
    (:func:`native_pixels`), everything else (and any surprise) through pydicom."""
    native = native_pixels(ds)
    if native is not None:
        return native
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if imagecodecs is None or syntax not in JPEG_2000 | HTJ2K or \
            int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        return ds.pixel_array
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        arr = decode_codestream(frame, syntax, threads)
    except Exception as exc:  # noqa: BLE001 - any codec error: pydicom decides (and says why)
        log.debug("imagecodecs could not decode %s (%s): pydicom", syntax, exc)
        return ds.pixel_array
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        log.debug("codestream is %s, header %sx%s: pydicom decides", arr.shape, ds.Rows,
                  ds.Columns)
        return ds.pixel_array
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits = int(ds.get("BitsAllocated", 16))
    if signed and arr.dtype.kind == "u":  # sign-extend from Bits Stored, as pydicom does
        stored = int(ds.get("BitsStored", bits))
        x = arr.astype(np.int32)
        x = np.where(x >= (1 << (stored - 1)), x - (1 << stored), x)
        return x.astype(np.int16 if bits <= 16 else np.int32)
    if not signed and arr.dtype.kind == "i":
        return arr.astype(np.uint16 if bits <= 16 else np.uint32)
    return arr
