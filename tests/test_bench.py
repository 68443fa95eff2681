"""The benchmark suite keeps working: ``python -m bench --tiny`` prints every section with numbers.

A smoke test only (the figures of a tiny run mean nothing; see bench/results/ for real ones).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import require_binary

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_tiny_bench_prints_every_section(tmp_path: Path) -> None:
    for tool in ("storescu", "storescp"):
        require_binary(tool)
    out_md = tmp_path / "bench.md"
    res = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--out", str(out_md),
                          "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    text = res.stdout
    assert out_md.read_text(encoding="utf-8").strip() == text.strip()
    for title in ("## Ingest", "## Study turnaround", "## Sustained", "## Classifier",
                  "## Targets"):
        assert title in text, title
    num = r"\d+(?:\.\d+)?"
    # ingest: both syntaxes, a paired node/dcmtk ratio and both peak RSS figures
    for label in ("tiny raw", "tiny j2k"):
        # (then storescp + fsync MB/s and its ratio, or n/a without a C compiler)
        assert re.search(rf"\| {label} \| 4 \|.*\*\*{num}\*\* \|.*\| {num} \| {num} \|$", text,
                         re.M), label
    # turnaround: p50, p95 and every stage
    row = re.search(r"^\| tiny raw \| 2 \|(.*)$", text, re.M)
    assert row is not None
    cells = [c.strip() for c in row.group(1).split("|") if c.strip()]
    assert len(cells) == 1 + 2 + 7 + 1 and all(re.fullmatch(num, c) for c in cells), cells
    assert float(cells[1]) > 0  # p50 turnaround
    # sustained: studies/h and RSS samples
    assert re.search(rf"\| 3 \(tiny raw\) \| {num} \| \*\*{num}\*\* \|", text)
    assert re.search(rf"RSS over time \(s: MiB\): {num}: {num}", text)
    # classifier: the shipped model and B0, batch 1 and batched, all > 0 ROIs/s
    rates = re.findall(rf"^\| (\S+)(?: \(shipped\))? \| {num} \| (\d+) \| \w+ \| \w+ \| "
                       rf"(?:yes|no) \| ({num}) \|$", text, re.M)
    assert {(m, b) for m, b, _ in rates} >= {("tf_efficientnet_lite0", "1"),
                                              ("tf_efficientnet_lite0", "4"),
                                              ("efficientnet_b0", "1"), ("efficientnet_b0", "4")}
    assert all(float(r) > 0 for _, _, r in rates)
    assert re.search(r"\| turnaround p50 ≤ 5 s", text) and "ROIs/s" in text


def test_decode_bench_compares_with_opj_decompress() -> None:
    """bench.decode prints ms/image for pydicom, the node's imagecodecs decode (checked equal
    to pydicom's pixels before timing) and, where installed, opj_decompress."""
    res = subprocess.run([sys.executable, "-m", "bench.decode", "--format", "tiny",
                          "--repeats", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    num = r"\d+(?:\.\d+)?"
    for codestream in ("JPEG 2000 lossless", "HTJ2K lossless"):
        for decoder in ("pydicom (pylibjpeg-openjpeg)", "node (imagecodecs)"):
            assert re.search(rf"\| {codestream} \| {num} \| {re.escape(decoder)} \| \d+ \| "
                             rf"{num} \|", res.stdout), (codestream, decoder)


def test_turnaround_baseline_bench_alternates_two_nodes(tmp_path: Path) -> None:
    """bench.turnaround_baseline runs this tree and a baseline (here: pre-analysis off) side by
    side and prints both rows with the p50 ratio."""
    for tool in ("storescu", "storescp"):
        require_binary(tool)
    res = subprocess.run([sys.executable, "-m", "bench.turnaround_baseline", "--baseline", "off",
                          "--studies", "1", "--formats", "tiny-raw", "--gaps", "0.5",
                          "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    num = r"\d+(?:\.\d+)?"
    assert re.search(r"^\| tiny raw, images 0.5 s apart, baseline \| 1 \|.* \| 1.00 \|$",
                     res.stdout, re.M), res.stdout
    assert re.search(rf"^\| tiny raw, images 0.5 s apart, this tree \| 1 \|.* \| "
                     rf"\*\*{num}\*\* \|$", res.stdout, re.M), res.stdout


def test_sustained_bench_runs_this_tree_and_a_baseline_back_to_back(tmp_path: Path) -> None:
    """bench.sustained --baseline REV checks REV out in a temporary worktree, runs both nodes one
    after the other and prints a row for each with studies/h, VmHWM and the ratios."""
    for tool in ("storescu", "storescp"):
        require_binary(tool)
    res = subprocess.run([sys.executable, "-m", "bench.sustained", "--baseline", "HEAD",
                          "--studies", "2", "--format", "tiny-raw", "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    num = r"\d+(?:\.\d+)?"
    for i, tree in ((1, "baseline"), (2, "this tree")):
        assert re.search(rf"^\| {i} \| {tree} \| 2 \| {num} \| \*\*{num}\*\* \| {num} \|",
                         res.stdout, re.M), res.stdout
    assert re.search(rf"studies/h: this tree {num}, baseline {num}, ratio \*\*{num}\*\*",
                     res.stdout), res.stdout
    assert re.search(rf"node peak RSS: this tree {num} MiB, baseline {num} MiB", res.stdout)


def test_perimage_bench_alternates_this_tree_and_a_baseline(tmp_path: Path) -> None:
    """bench.perimage runs the per-image work in this tree and in a baseline worktree, taking
    turns, and prints CPU and wall ms per image, the ratio and whether the clusters agree."""
    res = subprocess.run([sys.executable, "-m", "bench.perimage", "--baseline", "HEAD",
                          "--format", "tiny", "--rounds", "1", "--repeats", "1",
                          "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    num = r"\d+(?:\.\d+)?"
    for tree in ("baseline", "this tree"):
        assert re.search(rf"^\| 1 \| {tree} \| 4 \| \*\*{num}\*\* \| {num} \| {num} \| {num} \| "
                         r"`[0-9a-f]{16}` \|", res.stdout, re.M), res.stdout
    assert re.search(rf"CPU ms/image \(median of rounds\): this tree {num}, baseline {num}, "
                     rf"ratio \*\*{num}\*\*", res.stdout), res.stdout
    assert "clusters: identical in every run" in res.stdout  # HEAD against itself


def test_native_ceiling_shim_fsyncs_and_hashes_what_storescp_saves(tmp_path: Path) -> None:
    """bench/native/fsync_on_close.c, preloaded into a real storescp with MAMMO_SHIM_SHA256=2,
    takes the SHA-256 of each instance it saves (printed to stderr to be checked here): the
    ``storescp+fsync+sha256`` column of bench.ingest really does the node's hashing work."""
    import hashlib
    import os

    from bench.ingest import fsync_shim
    from tests.netutil import free_port, storescu, wait_for_port
    from tests.testdata import mias_to_mg

    for tool in ("storescu", "storescp"):
        require_binary(tool)
    shim = fsync_shim(tmp_path)
    if shim is None:
        pytest.skip("no C compiler (cc): the bench leaves the native-ceiling columns out")
    src = tmp_path / "one.dcm"
    mias_to_mg("mdb209").save_as(src, enforce_file_format=True)
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    server = subprocess.Popen(["storescp", "-aet", "MAMMO_AI", "-od", str(out), "+xa", str(port)],
                              env=dict(os.environ, LD_PRELOAD=str(shim), MAMMO_SHIM_SHA256="2"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, 30, server)
        assert storescu(port, [src]).returncode == 0
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    (saved,) = list(out.iterdir())
    digest = hashlib.sha256(saved.read_bytes()).hexdigest()
    assert f"{digest}  {saved}" in err, err[-2000:]
