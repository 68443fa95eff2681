"""JPEG 2000 / HTJ2K decode, ms per image: the node's decoder against OpenJPEG's own tool.

    .venv/bin/python -m bench.decode [--repeats 5] [--format big] [--out FILE.md]

One synthetic 3328 x 4096 12-bit mammogram (bench/studies.py), encoded lossless as JPEG 2000
(pylibjpeg-openjpeg, as the turnaround bench sends it) and as HTJ2K (OpenJPH through
imagecodecs). Each decoder decodes it ``repeats`` times, the decoders taking turns within each
repeat (so load on a shared machine hits them alike); medians:

* ``pydicom`` (pylibjpeg-openjpeg): what the node used before (single-threaded, under the GIL);
* ``node`` (:func:`node.analysis.jpeg2000.decode_pixels`: imagecodecs, OpenJPEG with threads,
  OpenJPH for HTJ2K), with 1 and with all (at most 4) threads;
* ``opj_decompress -threads N`` (OpenJPEG's command-line decoder; wall time of the process,
  writing a raw file to /dev/shm or the temp dir), the native baseline, when installed
  (Debian ``libopenjp2-tools``);
* four images at once in four Python threads (a study's images decoded side by side), ms per
  image: where releasing the GIL shows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import HTJ2KLossless, JPEG2000Lossless

from bench.report import publish
from bench.studies import FORMATS, synthetic_mammogram
from node.analysis.jpeg2000 import decode_pixels, decode_threads
from tests.testdata import mg_dataset


def _datasets(fmt: str) -> dict[str, pydicom.Dataset]:
    f = FORMATS[fmt]
    pixels = synthetic_mammogram(f, "L", "CC", seed=1)
    j2k = mg_dataset(pixels, patient_id="B", study_uid="1.2.3", sop_uid="1.2.3.1",
                     laterality="L", view="CC", spacing_mm=f.spacing_mm, bits_stored=f.bits)
    j2k.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ht = mg_dataset(pixels, patient_id="B", study_uid="1.2.3", sop_uid="1.2.3.2",
                    laterality="L", view="CC", spacing_mm=f.spacing_mm, bits_stored=f.bits)
    ht.PixelData = encapsulate([imagecodecs.htj2k_encode(pixels, reversible=True)])
    ht["PixelData"].VR = "OB"
    ht["PixelData"].is_undefined_length = True
    ht.file_meta.TransferSyntaxUID = HTJ2KLossless
    return {"JPEG 2000 lossless": j2k, "HTJ2K lossless": ht}


def _reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A fresh dataset each time, so that nothing is cached between decodes."""
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0)


def run(fmt: str, repeats: int, work: Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    opj = shutil.which("opj_decompress")
    n_threads = decode_threads()
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    rows = ["| codestream | MB | decoder | threads | ms/image | vs opj_decompress (same threads) |",
            "|---|---|---|---|---|---|"]
    figures: dict[str, dict[str, float]] = {}
    for label, ds in _datasets(fmt).items():
        reference = ds.pixel_array
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        cs = work / ("image.j2k" if "HT" not in label else "image.j2c")
        cs.write_bytes(frame)
        decoders: dict[tuple[str, int], Callable[[], object]] = {
            ("pydicom (pylibjpeg-openjpeg)", 1): lambda ds=ds: _reread(ds).pixel_array,
            ("node (imagecodecs)", 1): lambda ds=ds: decode_pixels(_reread(ds), threads=1),
            ("node (imagecodecs)", n_threads): lambda ds=ds: decode_pixels(_reread(ds),
                                                                           threads=n_threads),
        }
        if opj:
            for t in sorted({1, n_threads}):
                out = shm / f"mammo-bench-opj-{os.getpid()}.raw"
                decoders[("opj_decompress", t)] = (
                    lambda t=t, out=out, cs=cs: subprocess.run(
                        [opj, "-i", str(cs), "-o", str(out), "-threads", str(t)],
                        check=True, capture_output=True))
        for name, t in decoders:  # correctness first, untimed
            if name.startswith("node"):
                assert np.array_equal(decode_pixels(_reread(ds), threads=t), reference)
        samples: dict[tuple[str, int], list[float]] = {k: [] for k in decoders}
        for _ in range(repeats):
            for key, fn in decoders.items():
                samples[key].append(_timed(fn))
        # four images at once, in threads (a study's images side by side)
        four: dict[str, list[float]] = {"pydicom (pylibjpeg-openjpeg)": [],
                                        "node (imagecodecs)": []}
        copies = [_reread(ds) for _ in range(4)]
        for _ in range(max(1, repeats // 2)):
            for name in four:
                def one(d: pydicom.Dataset, name: str = name) -> object:
                    fresh = _reread(d)
                    return fresh.pixel_array if name.startswith("pydicom") else \
                        decode_pixels(fresh, threads=1)

                with ThreadPoolExecutor(4) as pool:
                    four[name].append(_timed(
                        lambda pool=pool, one=one, copies=copies: list(pool.map(one, copies)))
                        / 4)
        med = {k: statistics.median(v) for k, v in samples.items()}
        mb = len(frame) / 1e6
        for (name, t), ms in med.items():
            base = med.get(("opj_decompress", t))
            ratio = "" if base is None or name == "opj_decompress" else f"{ms / base:.2f}"
            rows.append(f"| {label} | {mb:.1f} | {name} | {t} | {ms:.0f} | {ratio} |")
        for name, v in four.items():
            rows.append(f"| {label} | {mb:.1f} | {name}, 4 images in 4 threads | 1 each | "
                        f"{statistics.median(v):.0f} per image | |")
        figures[label] = {f"{n} x{t}": ms for (n, t), ms in med.items()}
        cs.unlink()
    return rows, figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--format", default="big", choices=sorted(FORMATS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mammo-bench-dec-") as tmp:
        rows, _ = run(args.format, args.repeats, Path(tmp))
    load1 = os.getloadavg()
    opj = shutil.which("opj_decompress")
    version = ""
    if opj:
        v = subprocess.run([opj, "-h"], capture_output=True, text=True)
        version = next((line.strip() for line in (v.stdout + v.stderr).splitlines()
                        if "openjp2" in line.lower() or "version" in line.lower()), "")
    out = ["## Decode: JPEG 2000 / HTJ2K, ms per image (medians, decoders alternating)", "",
           f"- {os.cpu_count()} CPUs; imagecodecs {imagecodecs.__version__} "
           f"(OpenJPEG {imagecodecs.jpeg2k_version()}, OpenJPH {imagecodecs.htj2k_version()}); "
           f"opj_decompress: {opj or 'not installed'} {version}",
           f"- load average before {load0[0]:.1f}, after {load1[0]:.1f}",
           f"- command: `python -m bench.decode "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "", *rows, "",
           f"({time.monotonic() - t0:.0f} s)", ""]
    publish(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
