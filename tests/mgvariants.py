"""The conformance matrix: Digital Mammography headers in every form the standard allows.

Each :class:`Variant` is one real mini-MIAS image (shipped subset) wrapped as an MG instance whose
header takes one legal (or, marked, common but non-conformant) form of what the node reads:

* views (PS3.16 CID 4014) and view modifiers (CID 4015: spot compression, magnification, ...)
  coded in ViewCodeSequence (current SCT, legacy SRT and SNM3 designators), in View Position
  alone (MQCM abbreviations such as "SCC", "MMLO"), or in neither;
* Patient Orientation per PS3.3 C.7.6.1.1.1 for every view (combined oblique values A\\FR,
  P\\FL, ...; see :func:`tests.testdata.standard_orientation`), a vendor's rotated form, empty,
  and the digitised-film habit of a view name there;
* Image Laterality vs Laterality vs neither;
* MONOCHROME1/2 with Presentation LUT Shape INVERSE/IDENTITY (PS3.3 C.8.11.3: INVERSE goes with
  MONOCHROME1) or absent; For Presentation and For Processing;
* VOI: window with VOI LUT Function LINEAR, LINEAR_EXACT, SIGMOID, several windows, VOI LUT
  Sequence alone, both (as GE sends), none;
* Pixel Intensity Relationship LOG/LIN with its sign (PS3.3 C.8.11.3.1.2), Pixel Padding Value,
  Bits Stored 10/12/14/16, signed pixels;
* Imager Pixel Spacing with and without Estimated Radiographic Magnification Factor, Pixel
  Spacing only, no spacing.

Variants are grouped into studies (:func:`studies`) so that the whole matrix goes through one
running node in a handful of studies. ``input_errors`` lists the dciodvfy errors a variant has on
purpose (a Type 1 attribute the wild leaves out); every other input must validate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import DigitalMammographyXRayImageStorageForProcessing

from node.dicom_header import modifier_term, view_term
from tests.testdata import mg_dataset, mias_pixels, standard_orientation, uid_from

Mutator = Callable[[Dataset], None]


@dataclass(frozen=True)
class Variant:
    name: str
    group: str
    refnum: str
    laterality: str  # of the pixels (mini-MIAS: odd right, even left)
    view: str
    mutate: Mutator | None = None
    # What the outputs must carry:
    out_laterality: str | None = None  # None: ``laterality``
    out_orientation: tuple[str, str] | None | str = "standard"  # "standard": of lat/view
    out_view_code: str | None = "sct"  # "sct": the CID 4014 SCT code of ``view``; or None
    out_modifiers: tuple[str, ...] = ()  # CID 4015 SCT codes in the CAD SR Image Library
    for_processing: bool = False
    input_errors: tuple[str, ...] = ()  # dciodvfy error substrings this input has on purpose

    @property
    def expected_laterality(self) -> str:
        return self.laterality if self.out_laterality is None else self.out_laterality

    @property
    def expected_orientation(self) -> tuple[str, str] | None:
        if self.out_orientation == "standard":
            return standard_orientation(self.laterality, self.view)
        return self.out_orientation  # type: ignore[return-value]

    @property
    def expected_view_code(self) -> str | None:
        if self.out_view_code == "sct":
            term = view_term(self.view)
            return term.sct if term else None
        return self.out_view_code


# ----------------------------------------------------------------------------- mutators


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def modifiers(*abbreviations: str, scheme: str = "SCT") -> Mutator:
    """ViewModifierCodeSequence items (CID 4015) and the matching MQCM View Position."""
    def apply(ds: Dataset) -> None:
        items = []
        for a in abbreviations:
            t = modifier_term(a)
            assert t is not None, a
            items.append(_code(t.sct if scheme == "SCT" else t.srt, scheme, t.meaning))
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = items
        prefix = "".join(a for a in abbreviations if a in ("M", "S"))
        suffix = "".join(a for a in abbreviations if a not in ("M", "S"))
        ds.ViewPosition = f"{prefix}{ds.ViewPosition}{suffix}"
        if "M" in abbreviations:
            ds.EstimatedRadiographicMagnificationFactor = 1.8
        if "S" in abbreviations or "M" in abbreviations:
            ds.PartialView = "NO"  # PS3.3: NO with Magnification or Spot Compression
    return apply


def legacy_view_code(scheme: str) -> Mutator:
    def apply(ds: Dataset) -> None:
        term = view_term(str(ds.ViewPosition))
        assert term is not None
        ds.ViewCodeSequence[0].CodeValue = term.srt
        ds.ViewCodeSequence[0].CodingSchemeDesignator = scheme
    return apply


def view_position_only(position: str) -> Mutator:
    def apply(ds: Dataset) -> None:
        del ds.ViewCodeSequence
        ds.ViewPosition = position
    return apply


def no_view(ds: Dataset) -> None:
    del ds.ViewCodeSequence
    del ds.ViewPosition


def laterality_only(ds: Dataset) -> None:
    ds.Laterality = ds.ImageLaterality
    del ds.ImageLaterality


def no_laterality(ds: Dataset) -> None:
    del ds.ImageLaterality


def both_lateralities(ds: Dataset) -> None:
    ds.Laterality = ds.ImageLaterality


def orientation(value: list[str] | None) -> Mutator:
    def apply(ds: Dataset) -> None:
        ds.PatientOrientation = value
    return apply


def rotated_orientation(ds: Dataset) -> None:
    """GE Senographe's form for a left CC: rows towards R, columns towards P (image turned
    90 degrees): legal, and copied as it is."""
    ds.PatientOrientation = ["R", "P"]


def monochrome1(ds: Dataset) -> None:
    bits = int(ds.BitsStored)
    px = ds.pixel_array.astype(np.uint16)
    ds.PixelData = (((1 << bits) - 1) - px).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PresentationLUTShape = "INVERSE"
    ds.PixelIntensityRelationshipSign = 1
    ds.WindowCenter = (1 << bits) / 2


def no_presentation_lut_shape(ds: Dataset) -> None:
    del ds.PresentationLUTShape


def window(centre: float | list[float], width: float | list[float], function: str | None
           ) -> Mutator:
    def apply(ds: Dataset) -> None:
        ds.WindowCenter, ds.WindowWidth = centre, width
        if function is None:
            if "VOILUTFunction" in ds:
                del ds.VOILUTFunction
        else:
            ds.VOILUTFunction = function
    return apply


def _voi_lut_item(bits_in: int) -> Dataset:
    """A gamma 0.8 VOI LUT over the stored range, 12-bit output."""
    n = 1 << bits_in
    lut = np.round(((np.arange(n) / (n - 1)) ** 0.8) * 4095).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [n, 0, 12]
    item.LUTExplanation = "GAMMA 0.8"
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data, 16-bit entries
    return item


def voi_lut_only(ds: Dataset) -> None:
    ds.VOILUTSequence = [_voi_lut_item(int(ds.BitsStored))]
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)


def voi_lut_and_window(ds: Dataset) -> None:
    ds.VOILUTSequence = [_voi_lut_item(int(ds.BitsStored))]
    ds.WindowCenter, ds.WindowWidth = [2048, 1900], [4096, 3000]
    ds.VOILUTFunction = "SIGMOID"


def no_voi(ds: Dataset) -> None:
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)


def bits_stored(bits: int) -> Mutator:
    def apply(ds: Dataset) -> None:
        px8 = (ds.pixel_array.astype(np.uint32) >> (int(ds.BitsStored) - 8))
        maxval = (1 << bits) - 1
        px = np.round(px8 * (maxval / 255.0)).astype(np.uint16)
        ds.PixelData = px.tobytes()
        ds.BitsStored, ds.HighBit = bits, bits - 1
        ds.WindowCenter, ds.WindowWidth = (maxval + 1) / 2, maxval + 1
    return apply


def signed_pixels(ds: Dataset) -> None:
    """Signed stored values (PixelRepresentation 1) centred on 0; the window is in the same
    (unit slope, zero intercept) values."""
    bits = int(ds.BitsStored)
    px = ds.pixel_array.astype(np.int32) - (1 << (bits - 1))
    ds.PixelRepresentation = 1
    ds.PixelData = px.astype(np.int16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 0, 1 << bits
    ds["PixelData"].VR = "OW"


def padding(value_from: str) -> Mutator:
    """Pixel Padding Value: the background (darkest 8-bit values of the film) set to it."""
    def apply(ds: Dataset) -> None:
        px = ds.pixel_array.astype(np.uint16)
        maxval = (1 << int(ds.BitsStored)) - 1
        pad = 0 if value_from == "zero" else maxval
        background = px < (12 * maxval // 255)
        px[background] = pad
        ds.PixelData = px.tobytes()
        ds.PixelPaddingValue = pad
        ds["PixelPaddingValue"].VR = "US"
    return apply


def for_processing(relationship: str, sign: int, mono1: bool) -> Mutator:
    """A For Processing image: LOG (values linear in log intensity) or LIN (linear in intensity,
    synthesised from the film's density), with the sign PS3.3 gives (+1: higher values = more
    intensity, i.e. less dense), in MONOCHROME1 or 2. No VOI (For Processing carries none)."""
    def apply(ds: Dataset) -> None:
        bits = int(ds.BitsStored)
        maxval = (1 << bits) - 1
        density = ds.pixel_array.astype(np.float64) / maxval  # 1 = dense (bright on film)
        if relationship == "LOG":
            value = density if sign < 0 else 1.0 - density
        else:  # intensity reaching the detector falls exponentially with density
            intensity = np.exp(-3.0 * density)
            value = (intensity - np.exp(-3.0)) / (1 - np.exp(-3.0))
            value = value if sign > 0 else 1.0 - value
        ds.PixelData = np.round(value * maxval).astype(np.uint16).tobytes()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = \
            DigitalMammographyXRayImageStorageForProcessing
        ds.PresentationIntentType = "FOR PROCESSING"
        ds.PixelIntensityRelationship = relationship
        ds.PixelIntensityRelationshipSign = sign
        ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
        ds.PresentationLUTShape = "INVERSE" if mono1 else "IDENTITY"
        no_voi(ds)
    return apply


def spacing(imager: float | None, ermf: float | None = None, pixel: float | None = None
            ) -> Mutator:
    def apply(ds: Dataset) -> None:
        for keyword in ("ImagerPixelSpacing", "PixelSpacing",
                        "EstimatedRadiographicMagnificationFactor"):
            if keyword in ds:
                delattr(ds, keyword)
        if imager is not None:
            ds.ImagerPixelSpacing = [imager, imager]
        if ermf is not None:
            ds.EstimatedRadiographicMagnificationFactor = ermf
        if pixel is not None:
            ds.PixelSpacing = [pixel, pixel]
            ds.PixelSpacingCalibrationType = "GEOMETRY"
            ds.PixelSpacingCalibrationDescription = "magnification-corrected"
    return apply


def chain(*mutators: Mutator) -> Mutator:
    def apply(ds: Dataset) -> None:
        for m in mutators:
            m(ds)
    return apply


# ----------------------------------------------------------------------------- the matrix

_RIGHT = ["mdb209", "mdb211", "mdb213", "mdb215", "mdb219", "mdb223", "mdb227", "mdb231",
          "mdb239", "mdb241", "mdb249", "mdb253"]
_LEFT = ["mdb210", "mdb212", "mdb214", "mdb216", "mdb220", "mdb222", "mdb226", "mdb236",
         "mdb238", "mdb240", "mdb242", "mdb248", "mdb252", "mdb256"]


def _ref(lat: str, n: int) -> str:
    pool = _RIGHT if lat == "R" else _LEFT
    return pool[n % len(pool)]


NO_LATERALITY = ("ImageLaterality",)
NO_VOI = ("WindowCenter", "VOILUTSequence")
NO_IMAGER_SPACING = ("ImagerPixelSpacing",)


def matrix() -> list[Variant]:
    v: list[Variant] = []
    n = 0

    def add(name: str, group: str, lat: str, view: str, mutate: Mutator | None = None,
            **kw: object) -> None:
        nonlocal n
        v.append(Variant(name, group, _ref(lat, n), lat, view, mutate, **kw))  # type: ignore
        n += 1

    # Every CID 4014 view, coded (SCT) with its MQCM View Position and PS3.3 orientation.
    for lat, view in [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"), ("L", "ML"),
                      ("R", "LM"), ("L", "LMO"), ("R", "XCCL"), ("L", "XCCM"), ("R", "SIO"),
                      ("L", "ISO"), ("R", "FB")]:
        add(f"{lat}{view}", "views", lat, view)
    # CID 4015 modifiers, coded; spot compression and magnification as in diagnostic work-up.
    add("R SCC spot compression", "modifiers", "R", "CC", modifiers("S"),
        out_modifiers=("399055006",))
    add("L MCC magnification", "modifiers", "L", "CC", modifiers("M"),
        out_modifiers=("399163009",))
    add("R SMMLO spot + magnification", "modifiers", "R", "MLO", modifiers("S", "M"),
        out_modifiers=("399055006", "399163009"))
    add("L CCID implant displaced", "modifiers", "L", "CC", modifiers("ID"),
        out_modifiers=("399209000",))
    add("R CCRL rolled lateral (SRT codes)", "modifiers", "R", "CC",
        modifiers("RL", scheme="SRT"), out_modifiers=("399197002",))
    # The view in View Position alone, legacy code designators, no view at all.
    add("L SCC View Position only", "encodings", "L", "CC", view_position_only("SCC"),
        out_modifiers=("399055006",), input_errors=("ViewCodeSequence",))
    add("R MMLO View Position only", "encodings", "R", "MLO", view_position_only("MMLO"),
        out_modifiers=("399163009",), input_errors=("ViewCodeSequence",))
    add("L MLO legacy SRT code", "encodings", "L", "MLO", legacy_view_code("SRT"))
    add("R CC SNM3 code (GE)", "encodings", "R", "CC", legacy_view_code("SNM3"))
    add("L no view", "encodings", "L", "CC", no_view, out_view_code=None,
        input_errors=("ViewCodeSequence",))
    # Laterality in Laterality only, in both, in neither.
    add("R Laterality only", "laterality", "R", "MLO", laterality_only,
        input_errors=NO_LATERALITY)
    add("L both lateralities", "laterality", "L", "MLO", both_lateralities,
        input_errors=("Laterality",))
    add("R no laterality", "laterality", "R", "CC", no_laterality, out_laterality="",
        input_errors=("Laterality",))
    # Patient Orientation forms.
    add("L CC rotated orientation R-P (GE)", "orientation", "L", "CC", rotated_orientation,
        out_orientation=("R", "P"))
    add("R MLO empty orientation", "orientation", "R", "MLO", orientation(None),
        out_orientation=None, input_errors=("PatientOrientation",))
    add("L MLO view name in orientation (film)", "orientation", "L", "MLO",
        orientation(["MLO"]), out_orientation=None, input_errors=("PatientOrientation",))
    # Photometric interpretation, Presentation LUT Shape, VOI.
    add("R MONOCHROME1 INVERSE", "voi", "R", "CC", monochrome1)
    add("L no Presentation LUT Shape", "voi", "L", "CC", no_presentation_lut_shape,
        input_errors=("PresentationLUTShape",))
    add("R window LINEAR", "voi", "R", "MLO", window(2048, 4096, "LINEAR"))
    add("L window LINEAR_EXACT", "voi", "L", "MLO", window(2048, 4096, "LINEAR_EXACT"))
    add("R window SIGMOID", "voi", "R", "CC", window(2048, 3000, "SIGMOID"))
    add("L three windows, no function", "voi", "L", "CC",
        window([2048, 1800, 2300], [4096, 2500, 3000], None))
    add("R VOI LUT Sequence only", "voi", "R", "MLO", voi_lut_only)
    add("L VOI LUT Sequence and SIGMOID windows (GE)", "voi", "L", "MLO", voi_lut_and_window)
    add("R no VOI", "voi", "R", "CC", no_voi, input_errors=NO_VOI)
    # Stored values.
    for bits in (10, 14, 16):
        add(f"{'RL'[bits % 2]} Bits Stored {bits}", "pixels", "RL"[bits % 2], "CC",
            bits_stored(bits))
    # PS3.3 C.8.11.3 enumerates Pixel Representation 0 for DX/MG; signed data occur all the same
    add("L signed pixels", "pixels", "L", "MLO", signed_pixels,
        input_errors=("Pixel Representation",))
    add("R Pixel Padding Value 0", "pixels", "R", "MLO", padding("zero"))
    add("L MONOCHROME1 Pixel Padding Value max", "pixels", "L", "CC",
        chain(monochrome1, padding("max")))
    add("R For Processing LOG -1 MONOCHROME2", "processing", "R", "CC",
        for_processing("LOG", -1, False), for_processing=True)
    add("L For Processing LOG +1 MONOCHROME1", "processing", "L", "CC",
        for_processing("LOG", 1, True), for_processing=True)
    add("R For Processing LIN +1 MONOCHROME1 (GE)", "processing", "R", "MLO",
        for_processing("LIN", 1, True), for_processing=True)
    add("L For Processing LIN -1 MONOCHROME2", "processing", "L", "MLO",
        for_processing("LIN", -1, False), for_processing=True)
    # Spacing.
    add("R Imager Pixel Spacing + ERMF 1.08", "spacing", "R", "CC", spacing(0.2, 1.08))
    add("L Imager Pixel Spacing only", "spacing", "L", "CC", spacing(0.2))
    add("R Pixel Spacing only", "spacing", "R", "MLO", spacing(None, pixel=0.2),
        input_errors=NO_IMAGER_SPACING)
    add("L no spacing", "spacing", "L", "MLO", spacing(None), input_errors=NO_IMAGER_SPACING)
    return v


def build(variant: Variant, study_uid: str, patient_id: str, instance_number: int
          ) -> Dataset:
    """The variant's dataset: mini-MIAS pixels at 12 bits, the standard header, mutated."""
    px = mias_pixels(variant.refnum).astype(np.uint16)
    px = (px << 4) | (px >> 4)
    ds = mg_dataset(px, patient_id=patient_id, study_uid=study_uid,
                    sop_uid=uid_from("matrix", variant.name, study_uid),
                    series_uid=uid_from("matrix-series", variant.group, variant.laterality,
                                        study_uid),
                    laterality=variant.laterality, view=variant.view, spacing_mm=0.2,
                    bits_stored=12, instance_number=instance_number)
    ds.SeriesDescription = variant.name[:64]
    if variant.mutate is not None:
        variant.mutate(ds)
    return ds


def studies(out_dir: Path, variants: list[Variant] | None = None
            ) -> dict[str, tuple[str, list[tuple[Variant, Path]]]]:
    """One study per group: group -> (Study Instance UID, [(variant, file)])."""
    out: dict[str, tuple[str, list[tuple[Variant, Path]]]] = {}
    for variant in variants or matrix():
        if variant.group not in out:
            out[variant.group] = (uid_from("matrix-study", variant.group), [])
        study_uid, items = out[variant.group]
        path = out_dir / variant.group / f"{len(items) + 1:02d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = build(variant, study_uid, f"MATRIX-{variant.group.upper()}"[:64], len(items) + 1)
        ds.save_as(path, enforce_file_format=True)
        items.append((variant, path))
    return out


def baseline(variant: Variant) -> Dataset:
    """The plain (MONOCHROME2, 12-bit, windowed) dataset of the variant's pixels."""
    return build(Variant(variant.name, variant.group, variant.refnum, variant.laterality,
                         variant.view), "1.2.3", "BASE", 1)

