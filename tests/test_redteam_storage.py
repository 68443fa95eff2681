"""Red team, storage side: what a hostile or broken sender leaves behind, against a real node.

* 50 C-STOREs that stop half way (A-ABORT, TCP reset, or silence until ``node.pdu_timeout``)
  leave no file in ``incoming/`` and no open file descriptor (before: +50 files, +50 fds until
  the next restart);
* decompression bombs (a real 2.7 KB JPEG-LS and an 838-byte JPEG 2000 codestream of 20000 x
  20000) are refused with 0xC004 at C-STORE, whether the DICOM header admits the size or lies,
  and the node's memory does not move (before: 0x0000, then +5 GB RSS and 18 s in the analysis);
* an unknown Specific Character Set: refused with 0xC003 when text cannot be decoded, analysed
  (results without the bogus value) when it is ASCII (before: 0x0000, then three failed
  analyses);
* images that cannot be decoded (JPEG 2000 with only a main header, RLE with impossible segment
  offsets) end as counted failures visible in ``mammo-node status``, the status page and
  /metrics (before: the study ended "done" with nothing sent and nothing counted).
"""

from __future__ import annotations

import json
import struct
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
from pynetdicom import AE, _config

from tests import hostile_peers as hp
from tests.bombs import bomb_instance
from tests.netutil import NodeProcess, free_port, storescu, wait_until
from tests.reliability import echo, node_db, peak_rss_mb
from tests.smallstudies import small_study
from tests.testdata import mg_dataset, uid_from

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

PDU_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("redteam-store")
    http_port = free_port()
    n = NodeProcess(work / "node",
                    node={"pdu_timeout": PDU_TIMEOUT, "max_associations_per_ip": 16,
                          "max_associations_per_ae": 16, "max_associations": 24},
                    study={"stable_seconds": 2, "check_interval_seconds": 0.3},
                    http={"enabled": True, "port": http_port})
    n.http_port = http_port
    n.start()
    yield n
    n.stop()


def _metrics(node: NodeProcess) -> str:
    return hp.scrape(node.http_port)


_metric = hp.metric


def _store(port: int, path: Path, syntax: str, calling: str = "SENDER") -> tuple[int, str]:
    """(status, error comment) of one C-STORE of ``path`` as it is on disk."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=calling)
    ae.add_requested_context(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID,
                             [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMO_AI")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def test_fifty_interrupted_transfers_leave_no_file_and_no_fd(node: NodeProcess,
                                                              tmp_path: Path) -> None:
    px = (np.arange(1024 * 1024, dtype=np.uint32) % 4096).astype(np.uint16).reshape(1024, 1024)
    src = tmp_path / "big.dcm"
    mg_dataset(px, patient_id="ABORT", study_uid=uid_from("abort", "st"),
               sop_uid=uid_from("abort", "src"), laterality="L", view="CC",
               spacing_mm=0.1).save_as(src, enforce_file_format=True)
    incoming = node.data_dir / "incoming"
    assert echo(node.port) == 0
    pid = node.proc.pid
    files_before, fds_before = len(list(incoming.iterdir())), hp.open_fds(pid)
    before = _metrics(node)
    t0 = time.monotonic()
    for i in range(40):  # half with an A-ABORT, half vanishing with a TCP reset
        peer = hp.start_store(node.port, src, hp.MG_FOR_PRESENTATION,
                              uid_from("abort", str(i)), calling="ABORTER")
        assert peer is not None
        if i % 2:
            peer.send(hp.a_abort())
            peer.close()
        else:
            peer.close(reset=True)
    stalled = [hp.start_store(node.port, src, hp.MG_FOR_PRESENTATION,
                              uid_from("abort", f"stall{i}"), source_ip=f"127.0.2.{i + 1}",
                              calling="STALLER") for i in range(10)]
    assert all(p is not None for p in stalled)
    assert all(p.closed_by_node(PDU_TIMEOUT + 5) for p in stalled)  # silence: cut off
    for p in stalled:
        p.close()

    def settled() -> bool:
        return (len(list(incoming.iterdir())) == files_before and
                _metric(_metrics(node), "mammo_partial_transfers_removed_total") -
                _metric(before, "mammo_partial_transfers_removed_total") == 50)

    wait_until(settled, 20, 0.2, "every partial transfer removed")
    seconds = time.monotonic() - t0
    time.sleep(0.5)
    fds_after = hp.open_fds(pid)
    leftovers = [t for t in hp.fd_targets(pid) if "/incoming/" in t]
    print(f"\n50 interrupted transfers (20 A-ABORT, 20 TCP reset, 10 stalled): incoming/ "
          f"{files_before} -> {len(list(incoming.iterdir()))} files, fds {fds_before} -> "
          f"{fds_after}, in {seconds:.1f} s")
    assert leftovers == []
    assert fds_after <= fds_before + 2  # sqlite/log handles may come and go; never 50
    assert echo(node.port) == 0
    assert node.log().count("transfer.partial_removed") >= 50


@pytest.mark.parametrize("kind,side", [("jpegls", 20000), ("jpegls", 256), ("j2k", 20000),
                                       ("j2k", 256)])
def test_decompression_bombs_are_refused_at_c_store(node: NodeProcess, tmp_path: Path,
                                                    kind: str, side: int) -> None:
    rss_before = peak_rss_mb(node.proc.pid)
    path = bomb_instance(tmp_path / "bomb.dcm", kind, side, tag=f"bomb-{kind}-{side}")
    syntax = JPEGLSLossless if kind == "jpegls" else JPEG2000Lossless
    status, comment = _store(node.port, path, syntax)
    assert status == 0xC004, (hex(status), comment)
    assert ("limits.max_rows" in comment) if side == 20000 else ("20000 x 20000" in comment)
    assert peak_rss_mb(node.proc.pid) - rss_before < 64


def test_unknown_character_set(node: NodeProcess, tmp_path: Path) -> None:
    study = small_study(tmp_path / "cs", 3, tag="redteam-charset")
    for i, f in enumerate(study):
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 999"  # not a defined term
        ds.save_as(f)
        if i == 0:  # non-ASCII bytes in the name of one copy: cannot be decoded
            bad = tmp_path / "cs-bad.dcm"
            raw = f.read_bytes().replace(b"TEST^REDTEAM-CHARSET0003",
                                         b"T\xc9ST^REDTEAM-CHARSET0003")
            ds2 = pydicom.dcmread(__import__("io").BytesIO(raw))
            ds2.SOPInstanceUID = ds2.file_meta.MediaStorageSOPInstanceUID = uid_from("cs-bad")
            ds2.save_as(bad)
    status, comment = _store(node.port, bad, pydicom.uid.ExplicitVRLittleEndian)
    assert status == 0xC003 and "Specific Character Set" in comment, (hex(status), comment)
    res = storescu(node.port, study)  # ASCII only: accepted and analysed
    assert res.returncode == 0, res.stdout + res.stderr
    study_uid = uid_from("redteam-charset", "study", "3")

    def result_objects() -> list[str]:
        with node_db(node.data_dir) as con:
            return [r[0] for r in con.execute(
                "SELECT o.relpath FROM result_objects o JOIN results r ON r.id = o.result_id "
                "JOIN studies s ON s.id = r.study_id WHERE s.study_uid = ? AND r.current",
                (study_uid,))]

    paths = wait_until(result_objects, 120, 0.5, "results for the ASCII study")
    for rel in paths:
        out = pydicom.dcmread(node.data_dir / rel, stop_before_pixels=True)
        assert out.get("SpecificCharacterSet") in (None, "", "ISO_IR 100", "ISO_IR 192")
        assert str(out.PatientName) == "TEST^REDTEAM-CHARSET0003"


def _j2k_header_only(rows: int, cols: int) -> bytes:
    """A JPEG 2000 main header (SOC, SIZ for rows x cols, 12 bits) and then garbage."""
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, cols, rows, 0, 0, cols, rows, 0, 0, 1) + \
        bytes([11, 1, 1])
    return b"\xff\x4f\xff\x51" + siz + bytes(range(256)) * 4


def _rle_bad_offsets() -> bytes:
    header = struct.pack("<16I", 2, 64, 50_000_000, *([0] * 13))
    return header + b"\x00" * 32


def _undecodable(path: Path, syntax: str, frame: bytes, sop: str, study: str, lat: str,
                 view: str) -> Path:
    ds = mg_dataset(np.zeros((256, 256), dtype=np.uint16), patient_id="UNDECODABLE",
                    study_uid=study, sop_uid=sop, laterality=lat, view=view, spacing_mm=0.2,
                    bits_stored=12)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def test_undecodable_images_are_counted_failures(node: NodeProcess, tmp_path: Path) -> None:
    before = _metrics(node)
    # Study 1: four views, none decodable -> a failed analysis (not "done" with nothing).
    study1 = uid_from("undecodable", "1")
    views = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
    for i, (lat, view) in enumerate(views):
        syntax, frame = ((JPEG2000Lossless, _j2k_header_only(256, 256)) if i % 2 else
                         (RLELossless, _rle_bad_offsets()))
        path = _undecodable(tmp_path / f"u{i}.dcm", syntax, frame,
                            uid_from("undecodable", "1", str(i)), study1, lat, view)
        status, comment = _store(node.port, path, syntax)
        assert status == 0x0000, comment  # the headers are fine: the decode fails later
    # Study 2: three good views and one undecodable -> a result, plus one counted failure.
    good = small_study(tmp_path / "good", 4, views=3, tag="redteam-partial")
    res = storescu(node.port, good)
    assert res.returncode == 0, res.stderr
    bad = _undecodable(tmp_path / "u-partial.dcm", JPEG2000Lossless, _j2k_header_only(256, 256),
                       uid_from("partial", "bad"), uid_from("redteam-partial", "study", "4"),
                       "L", "MLO")
    assert _store(node.port, bad, JPEG2000Lossless)[0] == 0x0000

    def states() -> dict[str, str]:
        with node_db(node.data_dir) as con:
            return dict(con.execute("SELECT study_uid, state FROM studies WHERE study_uid IN "
                                    "(?, ?)", (study1, uid_from("redteam-partial", "study",
                                                                "4"))).fetchall())

    wait_until(lambda: sorted(states().values()) == ["done", "failed"], 120, 0.5,
               "one study failed, the other done")
    with node_db(node.data_dir) as con:
        attempts = con.execute("SELECT j.attempts FROM jobs j JOIN studies s ON s.id = "
                               "j.study_id WHERE s.study_uid = ?", (study1,)).fetchone()[0]
        outcomes = dict(con.execute("SELECT outcome, COUNT(*) FROM instances i JOIN studies s "
                                    "ON s.id = i.study_id WHERE s.study_uid IN (?, ?) GROUP BY "
                                    "outcome", (study1, uid_from("redteam-partial", "study",
                                                                 "4"))).fetchall())
    assert attempts == 1  # not retried: the bytes will not change
    assert outcomes == {"failed": 5, "analysed": 3}, outcomes
    status = json.loads(node.cli("status", "--json").stdout)
    assert status["instances"]["failed"] >= 5
    reasons = " ".join(r["reason"] for r in status["not_analysed"] if r["outcome"] == "failed")
    assert "cannot decode" in reasons or "no image could be decoded" in reasons
    text = node.cli("status").stdout
    assert "failed" in text and "instances:" in text
    after = _metrics(node)
    assert _metric(after, "mammo_instances", outcome="failed") >= 5
    assert _metric(after, "mammo_analysis_failures_total") - \
        _metric(before, "mammo_analysis_failures_total") >= 1
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/", timeout=10) as r:
        page = r.read().decode()
    assert 'id="not-analysed"' in page and "cannot decode" in page
    print(f"\nundecodable: study of 4 undecodable images failed after {attempts} attempt; "
          f"partial study: 3 analysed + 1 failed; status {status['instances']}")


def test_echo_still_answers_after_all_that(node: NodeProcess) -> None:
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(echo(node.port))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == [0, 0, 0, 0]
    assert "Traceback" not in node.log()
