"""In-process node parts for the model lifecycle tests: a data directory and database, stored
studies, the model manager, the worker with the real report builders, the shadow runner."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import select

from node.activemodel import ModelManager
from node.analysis.result import StudyAnalyser
from node.completion import complete_ready_studies
from node.config import Settings, parse_settings
from node.db import Database, Instance, Series, Study
from node.dicom_header import is_for_processing, laterality_and_view
from node.modelstore import ModelStore
from node.service import load_analyser
from node.shadow import ShadowRunner
from node.store import Spool
from node.worker import AnalysisWorker, ReportOptions
from tests.modelfixtures import SHIPPED_CARD


@dataclass
class Env:
    settings: Settings
    db: Database
    spool: Spool
    store: ModelStore

    @property
    def data_dir(self) -> Path:
        return self.settings.node.data_dir


def make_env(root: Path, **sections: dict[str, object]) -> Env:
    raw: dict[str, dict[str, object]] = {
        "node": {"data_dir": str(root / "data"), "min_free_mb": 1},
        "model": {"card": str(SHIPPED_CARD), "device": "cpu"},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    settings = parse_settings(raw, base_dir=root)
    spool = Spool(settings.node.data_dir)
    db = Database(settings.database_url)
    db.create_schema()
    return Env(settings, db, spool, ModelStore(db, settings.node.data_dir))


def store_files(env: Env, files: list[Path]) -> str:
    """Store one study's files as the receiver does (durable file, then the rows) and complete
    it; returns its Study Instance UID. (The receiver itself is tested over DICOM elsewhere.)"""
    study_uid = ""
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        tmp = env.spool.incoming / f"{ds.SOPInstanceUID}.tmp"
        shutil.copyfile(f, tmp)
        relpath, size, sha = env.spool.adopt(tmp)
        lat, view = laterality_and_view(ds)
        study_uid = str(ds.StudyInstanceUID)
        with env.db.session() as s:
            study = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar()
            if study is None:
                study = Study(study_uid=study_uid, state="receiving",
                              accession_number=str(ds.get("AccessionNumber", "")) or None)
                s.add(study)
                s.flush()
            series = s.execute(select(Series).where(
                Series.series_uid == str(ds.SeriesInstanceUID))).scalar()
            if series is None:
                series = Series(study_id=study.id, series_uid=str(ds.SeriesInstanceUID),
                                modality="MG")
                s.add(series)
                s.flush()
            s.add(Instance(study_id=study.id, series_id=series.id, sop_uid=str(ds.SOPInstanceUID),
                           sop_class_uid=str(ds.SOPClassUID),
                           transfer_syntax=str(ds.file_meta.TransferSyntaxUID), relpath=relpath,
                           size=size, sha256=sha, laterality=lat, view=view,
                           for_processing=is_for_processing(ds)))
    assert study_uid in complete_ready_studies(env.db, 0, True)
    return study_uid


def manager(env: Env, default: StudyAnalyser | None = None) -> ModelManager:
    return ModelManager(env.settings, env.db, load_analyser, default=default)


def worker(env: Env, models: ModelManager, destinations: tuple[str, ...] = ("dest",)
           ) -> tuple[AnalysisWorker, ShadowRunner]:
    from node.reports import build_reports

    w = AnalysisWorker(env.db, env.spool, models.analyser, build_reports,
                       ReportOptions(manufacturer="mammo-node", sr_series_number=9901,
                                     sc_series_number=9902, threshold=models.analyser.model
                                     .threshold, software_version="mammo-node test"),
                       destinations=list(destinations))
    shadow = ShadowRunner(env.db, env.spool, models)
    w.on_analysed = shadow.on_analysed
    return w, shadow
