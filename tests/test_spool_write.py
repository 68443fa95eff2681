"""Spool.write_datasets: the files are pydicom's bytes, every one fsynced (file and folder) before
it returns, and a failure leaves nothing behind."""

from __future__ import annotations

import datetime as dt
import io
import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

import node.store as store
from bench.outputs import MODEL, study
from node.reports import ReportContext, SeriesNumbers, build_reports
from node.store import Spool, encode_file
from tests.testdata import mg_dataset


def _objects() -> list[Dataset]:
    analysis, sources = study(1024, 832, 2)
    ctx = ReportContext(analysis_key="spool", created=dt.datetime(2026, 1, 1, 12),
                        manufacturer="mammo-node", software_version="t",
                        threshold=MODEL.threshold, series=SeriesNumbers(tid1500=1, sc=2))
    return build_reports(analysis, sources, ctx, ["tid1500", "sc"])


def _pydicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_files_are_pydicoms_bytes_and_all_fsynced(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    objects = _objects()
    odd = mg_dataset(np.arange(301 * 301, dtype=np.uint16).reshape(301, 301) % 4000,
                     patient_id="ODD", study_uid="2.25.1", sop_uid="2.25.2", laterality="L",
                     view="CC", spacing_mm=0.1, bits_stored=12)
    odd.PixelData = odd.PixelData[:-1]  # an odd-length native value: padded as pydicom pads
    objects.append(odd)
    expected = [_pydicom_bytes(ds) for ds in objects]
    assert len(encode_file(objects[1])) == 3  # the SC's pixels are written from their buffer
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)
    spool = Spool(tmp_path / "spool")
    rels = spool.write_datasets(objects)
    assert [spool.path(r).read_bytes() for r in rels] == expected
    files = {spool.path(r).stat().st_ino for r in rels}
    folders = {spool.path(r).parent.stat().st_ino for r in rels}
    assert files <= set(synced) and folders <= set(synced)
    assert not list(spool.results.rglob("*.part"))


def test_a_failing_object_leaves_nothing(tmp_path: Path) -> None:
    objects = _objects()
    broken = Dataset()  # no file meta: pydicom refuses to write it as a file
    broken.SOPInstanceUID = "2.25.3"
    spool = Spool(tmp_path / "spool")
    with pytest.raises((AttributeError, ValueError)):
        spool.write_datasets([objects[0], objects[1], broken])
    assert [p for p in spool.results.rglob("*") if p.is_file()] == []


def test_objects_built_one_at_a_time_are_written_as_they_come(tmp_path: Path) -> None:
    """The worker hands write_datasets a generator (node.reports.iter_reports): each object is
    written while the next one is built, the files are the same bytes as from a list, and a
    builder that fails half-way leaves nothing behind."""
    from node.reports import iter_reports

    analysis, sources = study(1024, 832, 2)
    ctx = ReportContext(analysis_key="spool", created=dt.datetime(2026, 1, 1, 12),
                        manufacturer="mammo-node", software_version="t",
                        threshold=MODEL.threshold, series=SeriesNumbers(tid1500=1, sc=2))
    spool = Spool(tmp_path / "spool")
    listed = [spool.path(r).read_bytes()
              for r in spool.write_datasets(build_reports(analysis, sources, ctx, ["sc"]))]
    taken: list[int] = []

    def counted():  # type: ignore[no-untyped-def]
        for n, ds in enumerate(iter_reports(analysis, sources, ctx, ["sc"])):
            # the previous object is on its way to disk before this one is handed over
            assert len(list(spool.results.rglob("*.part"))) == n
            taken.append(n)
            yield ds

    streamed = [spool.path(r).read_bytes() for r in spool.write_datasets(counted())]
    assert streamed == listed and len(taken) == len(analysis.images) == 4

    def failing():  # type: ignore[no-untyped-def]
        it = iter_reports(analysis, sources, ctx, ["sc"])
        yield next(it)
        yield next(it)
        raise RuntimeError("the third SC could not be built")

    before = {p for p in spool.results.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="third SC"):
        spool.write_datasets(failing())
    assert {p for p in spool.results.rglob("*") if p.is_file()} == before
