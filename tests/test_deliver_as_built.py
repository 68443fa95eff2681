"""The C-STORE transport sends each result object as it was built and written: the bytes the
destination receives are the file's own (no decode, no re-encode), and a destination that
accepts only Implicit VR Little Endian still gets a converted, equal dataset. Real pynetdicom
SCPs on 127.0.0.1; a real Grad-CAM SC and TID 1500 SR built by the node's builders."""

from __future__ import annotations

import datetime as dt
import threading
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filereader import read_preamble
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from node.analysis.result import Finding, ImageAnalysis, ModelInfo, StudyAnalysis
from node.config import Destination
from node.deliver import CStoreTransport
from node.reports import ReportContext, SeriesNumbers, build_reports
from node.store import Spool
from tests.netutil import free_port
from tests.testdata import mg_dataset


def _built(tmp_path: Path) -> list[Path]:
    """A TID 1500 SR and a Grad-CAM SC of a one-image analysis, written by the spool."""
    rng = np.random.default_rng(3)
    src = mg_dataset(rng.integers(0, 4096, (512, 400), dtype=np.uint16), patient_id="P1",
                     study_uid="1.2.826.0.1.3680043.8.498.1", sop_uid="1.2.826.0.1.3680043.8.498.2",
                     laterality="L", view="CC", spacing_mm=0.1, bits_stored=12)
    display = rng.integers(0, 255, (512, 400), dtype=np.uint8)
    cam = np.zeros((512, 400), np.float32)
    cam[200:260, 150:210] = 0.8
    image = ImageAnalysis(str(src.SOPInstanceUID), str(src.SOPClassUID), "L", "CC", 512, 400,
                          0.1, "header", True, display=display, cam=cam, display_scale=1.0)
    image.findings.append(Finding(index=1, sop_instance_uid=image.sop_instance_uid,
                                  laterality="L", view="CC", centre_xy=(180.0, 230.0),
                                  outline_xy=((170.0, 220.0), (190.0, 220.0), (190.0, 240.0),
                                              (170.0, 240.0), (170.0, 220.0)),
                                  radius_mm=1.5, n_calcifications=5, probability=0.7,
                                  detection_score=0.8))
    model = ModelInfo(name="m", version="1", architecture="a", threshold=0.5)
    analysis = StudyAnalysis(str(src.StudyInstanceUID), model, [image])
    context = ReportContext(analysis_key="k" * 64,
                            created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), manufacturer="T",
                            software_version="t", threshold=0.5,
                            series=SeriesNumbers(tid1500=9901, sc=9902))
    objects = build_reports(analysis, {image.sop_instance_uid: src}, context)
    spool = Spool(tmp_path / "spool")
    return [spool.root / spool.write_dataset(ds) for ds in objects]


def _after_meta(path: Path) -> bytes:
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        return fh.read()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_objects_go_as_built_or_converted(tmp_path: Path, syntax: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    files = _built(tmp_path)
    decoded: list[str] = []  # every full read of a result file (the meta header alone is fine)
    real_dcmread = pydicom.dcmread

    def counting_dcmread(fp, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not kwargs.get("stop_before_pixels"):
            decoded.append(str(fp))
        return real_dcmread(fp, *args, **kwargs)

    import pynetdicom.association

    monkeypatch.setattr(pydicom, "dcmread", counting_dcmread)
    monkeypatch.setattr(pynetdicom.association, "dcmread", counting_dcmread)
    received: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def on_store(ev: evt.Event) -> int:
        with lock:
            received.append((str(ev.context.transfer_syntax), ev.request.DataSet.getvalue()))
        return 0x0000

    from pynetdicom import _config

    # this SCP keeps each dataset in memory (the node's Receiver, run by other tests in the
    # same process, switches pynetdicom to receiving into files)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    ae = AE(ae_title="PACS")
    for cls in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(cls, [syntax])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        out = CStoreTransport("MAMMO_AI").send(
            Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port), files)
    finally:
        server.shutdown()
    assert out.ok, out
    # read back and re-encoded only for the destination that cannot take them as written
    assert len(decoded) == (0 if syntax == ExplicitVRLittleEndian else len(files))
    monkeypatch.setattr(pydicom, "dcmread", real_dcmread)
    monkeypatch.setattr(pynetdicom.association, "dcmread", real_dcmread)
    assert [ts for ts, _ in received] == [syntax] * len(files)
    for path, (_, data) in zip(files, received, strict=True):
        if syntax == ExplicitVRLittleEndian:  # the very bytes written: never re-encoded
            assert data == _after_meta(path)
        else:  # converted by pynetdicom for an Implicit-only destination: the same content
            got = pydicom.dcmread(BytesIO(data), force=True)
            got.file_meta = pydicom.Dataset()
            got.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ref = pydicom.dcmread(path)
            assert got.SOPInstanceUID == ref.SOPInstanceUID
            if "PixelData" in ref:
                assert got.PixelData == ref.PixelData
