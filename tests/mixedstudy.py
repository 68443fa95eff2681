"""A screening study as a PACS holds it: the four 2D views plus everything that comes with them.

Besides the four mini-MIAS MG views (tests.testdata.mias_four_view): a Breast Projection X-Ray
image (a fifth, analysed view), a synthesized 2D view (Image Type ...\\GENERATED_2D), a breast
tomosynthesis object, a vendor quality-control Secondary Capture (flat field, as Hologic sends),
an X-Ray Radiation Dose SR, a Grayscale Softcopy Presentation State and another system's
Mammography CAD SR. Only the first five are mammograms the node analyses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.testdata import mias_four_view, mias_to_mg, uid_from

TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
BPX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.13.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
RDSR = "1.2.840.10008.5.1.4.1.1.88.67"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"


@dataclass(frozen=True)
class MixedStudy:
    study_uid: str
    analysed: list[Path]  # 2D mammograms the node analyses
    not_analysed: list[Path]  # accepted with the study, never analysed

    @property
    def files(self) -> list[Path]:
        return [*self.analysed, *self.not_analysed]


def _retag(ds: Dataset, study: Dataset, name: str, sop_class: str, modality: str,
           series: str) -> Dataset:
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                    "ReferringPhysicianName", "StudyDescription", "SpecificCharacterSet"):
        if keyword in study:
            setattr(ds, keyword, study.data_element(keyword).value)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid_from("mixed", name, str(study.StudyInstanceUID))
    ds.SeriesInstanceUID = uid_from("mixed-series", series, str(study.StudyInstanceUID))
    ds.Modality = modality
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _document(study: Dataset, name: str, sop_class: str, title: tuple[str, str, str]
              ) -> Dataset:
    ds = _retag(Dataset(), study, name, sop_class, "SR", name)
    ds.Manufacturer = "Other Vendor CAD" if sop_class == CAD_SR else "HOLOGIC, Inc."
    ds.SeriesNumber, ds.InstanceNumber = 800, 1
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code(*title)]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = "20260101", "090000"
    return ds


def mixed_study(out_dir: Path, patient_id: str = "MIXED1") -> MixedStudy:
    out_dir.mkdir(parents=True, exist_ok=True)
    four = mias_four_view(out_dir / "2d", patient_id=patient_id)
    study = pydicom.dcmread(four[0], stop_before_pixels=True)
    analysed, others = list(four), []

    bpx = mias_to_mg("mdb213", patient_id=patient_id, study_uid=str(study.StudyInstanceUID),
                     view="XCCL")
    bpx = _retag(bpx, study, "bpx", BPX_FOR_PRESENTATION, "MG", "bpx")
    bpx.NumberOfFrames = 1
    analysed.append(out_dir / "bpx.dcm")
    bpx.save_as(analysed[-1], enforce_file_format=True)

    synthetic = mias_to_mg("mdb214", patient_id=patient_id,
                           study_uid=str(study.StudyInstanceUID), view="CC")
    synthetic = _retag(synthetic, study, "c-view", synthetic.SOPClassUID, "MG", "c-view")
    synthetic.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]
    synthetic.SeriesDescription = "L CC C-View"
    others.append(out_dir / "c-view.dcm")
    synthetic.save_as(others[-1], enforce_file_format=True)

    tomo = _retag(Dataset(), study, "tomo", TOMOSYNTHESIS, "MG", "tomo")
    tomo.ImageType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    tomo.SeriesNumber, tomo.InstanceNumber = 70, 1
    tomo.Manufacturer = "HOLOGIC, Inc."
    tomo.SamplesPerPixel, tomo.PhotometricInterpretation = 1, "MONOCHROME2"
    tomo.Rows = tomo.Columns = 64
    tomo.NumberOfFrames = 3
    tomo.BitsAllocated, tomo.BitsStored, tomo.HighBit, tomo.PixelRepresentation = 16, 12, 11, 0
    tomo.PixelData = np.zeros((3, 64, 64), np.uint16).tobytes()
    others.append(out_dir / "tomo.dcm")
    tomo.save_as(others[-1], enforce_file_format=True)

    qc = mias_to_mg("mdb215", patient_id=patient_id, study_uid=str(study.StudyInstanceUID))
    qc = _retag(qc, study, "flat-field", SECONDARY_CAPTURE, "MG", "flat-field")
    qc.ViewPosition = "FLATFIELD"
    qc.QualityControlImage = "YES"
    qc.SeriesDescription = "Flat Field Tomo"
    qc.ConversionType = "WSD"
    others.append(out_dir / "flat-field.dcm")
    qc.save_as(others[-1], enforce_file_format=True)

    for name, sop_class, title in (
            ("rdsr", RDSR, ("113701", "DCM", "X-Ray Radiation Dose Report")),
            ("other-cad", CAD_SR, ("111036", "DCM", "Mammography CAD Report"))):
        doc = _document(study, name, sop_class, title)
        others.append(out_dir / f"{name}.dcm")
        doc.save_as(others[-1], enforce_file_format=True)

    ps = _retag(Dataset(), study, "gsps", GSPS, "PR", "gsps")
    ps.SeriesNumber, ps.InstanceNumber = 900, 1
    ps.ContentLabel = "MARKS"
    ps.PresentationCreationDate, ps.PresentationCreationTime = "20260101", "090000"
    others.append(out_dir / "gsps.dcm")
    ps.save_as(others[-1], enforce_file_format=True)
    return MixedStudy(str(study.StudyInstanceUID), analysed, others)
