"""Every coded concept the result objects write, in one place.

From pydicom's code dictionary where it has the concept with the standard's meaning; written out
where it lacks one or its meaning differs from PS3.16 (noted on the line). The TID 1500 SR and the
Mammography CAD SR share the concepts they both use (the same code in both documents).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: What the content-item constructors accept as a concept name or value.
Concept = hd.sr.CodedConcept | Code

_C = hd.sr.CodedConcept

# --------------------------------------------------------------------------- findings, both SRs
CALCIFICATION_CLUSTER = codes.SCT.CalcificationCluster  # (129769006, SCT)
PROBABILITY_OF_CANCER = codes.DCM.ProbabilityOfCancer  # (111047, DCM)
CERTAINTY_OF_FINDING = _C("111012", "DCM", "Certainty of Finding")
TRACKING_IDENTIFIER = codes.DCM.TrackingIdentifier  # (112039, DCM)
TRACKING_UID = codes.DCM.TrackingUniqueIdentifier  # (112040, DCM)
BREAST = codes.SCT.Breast
LEFT = codes.SCT.Left
RIGHT = codes.SCT.Right
PERCENT = codes.UCUM.Percent
SQUARE_MILLIMETER = codes.UCUM.SquareMillimeter
DEVICE = codes.DCM.Device
MAMMOGRAPHY = codes.SCT.Mammography
ENGLISH_US = _C("en-US", "RFC5646", "English (United States)")

# --------------------------------------------------------------------------- TID 1500 SR
PATHOLOGY = codes.DCM.Pathology  # (111042, DCM)
MALIGNANT = codes.SCT.Malignant  # (21594007, SCT)
BENIGN = codes.SCT.Benign  # (30807003, SCT)
ABSENT = codes.SCT.Absent  # (272519000, SCT)
AREA = codes.SCT.Area  # (42798000, SCT)
COMMENT = codes.DCM.Comment  # (121106, DCM): the label OHIF shows
SOURCE_OF_MEASUREMENT = codes.DCM.SourceOfMeasurement
IMAGING_MEASUREMENTS = codes.DCM.ImagingMeasurements
QUALITATIVE_EVALUATIONS = _C("C0034375", "UMLS", "Qualitative Evaluations")

# --------------------------------------------------------------------------- Mammography CAD SR
MAMMOGRAPHY_CAD_REPORT = _C("111036", "DCM", "Mammography CAD Report")
IMAGE_LIBRARY = _C("111028", "DCM", "Image Library")
CAD_SUMMARY = _C("111017", "DCM", "CAD Processing and Findings Summary")
WITH_FINDINGS = _C("111242", "DCM", "All algorithms succeeded; with findings")
WITHOUT_FINDINGS = _C("111241", "DCM", "All algorithms succeeded; without findings")
# pydicom's meaning of these two holds a zero-width space (U+200B): written by hand.
INDIVIDUAL_IMPRESSION = _C("111034", "DCM", "Individual Impression/Recommendation")
IMPRESSION_ANALYSIS = _C("111233", "DCM", "Individual Impression/Recommendation Analysis")
RENDERING_INTENT = _C("111056", "DCM", "Rendering Intent")
PRESENTATION_REQUIRED = _C("111150", "DCM",
                           "Presentation Required: Rendering device is expected to present")
PRESENTATION_OPTIONAL = _C("111151", "DCM", "Presentation Optional: Rendering device may present")
SINGLE_IMAGE_FINDING = _C("111059", "DCM", "Single Image Finding")
CENTER = _C("111010", "DCM", "Center")
OUTLINE = _C("111041", "DCM", "Outline")
ALGORITHM_NAME = _C("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = _C("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = _C("111002", "DCM", "Algorithm Parameters")
SUMMARY_OF_DETECTIONS = _C("111064", "DCM", "Summary of Detections")
SUMMARY_OF_ANALYSES = _C("111065", "DCM", "Summary of Analyses")
SUCCEEDED = _C("111222", "DCM", "Succeeded")
SUCCESSFUL_DETECTIONS = _C("111063", "DCM", "Successful Detections")
SUCCESSFUL_ANALYSES = _C("111062", "DCM", "Successful Analyses")
DETECTION_PERFORMED = _C("111022", "DCM", "Detection Performed")
ANALYSIS_PERFORMED = _C("111004", "DCM", "Analysis Performed")
IMAGE_LATERALITY = _C("111027", "DCM", "Image Laterality")
IMAGE_VIEW = _C("111031", "DCM", "Image View")
IMAGE_VIEW_MODIFIER = _C("111032", "DCM", "Image View Modifier")
ORIENTATION_ROW = _C("111044", "DCM", "Patient Orientation Row")
ORIENTATION_COLUMN = _C("111043", "DCM", "Patient Orientation Column")
STUDY_DATE = _C("111060", "DCM", "Study Date")
HORIZONTAL_SPACING = _C("111026", "DCM", "Horizontal Pixel Spacing")
VERTICAL_SPACING = _C("111066", "DCM", "Vertical Pixel Spacing")
MICROMETER = _C("um", "UCUM", "micrometer")
#: Image Laterality values of the CAD Image Library (CID 6022: the breast, not the side).
BREAST_OF_SIDE = {"L": _C("80248007", "SCT", "Left breast"),
                  "R": _C("73056007", "SCT", "Right breast")}

# --------------------------------------------------------------------------- Secondary Capture
SOURCE_IMAGE_FOR_PROCESSING = _C("121322", "DCM", "Source image for image processing operation")
