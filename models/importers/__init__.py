"""Importers from public mammography datasets and a site's own images to the ROI dataset
format (models/README.md): ``python -m models import KIND SRC --out DIR``.

=============  ==============================================================================
kind           source
=============  ==============================================================================
cbis-ddsm      TCIA CBIS-DDSM case-description CSVs + DICOM tree (or JPEG re-distribution)
inbreast       INbreast.csv + AllDICOMs/ + AllXML/ (plist ROIs)
vindr-mammo    finding_annotations.csv + images/<study>/<image>.dicom
cmmd           CMMD_clinicaldata_revision.xlsx + the TCIA DICOM tree (image-level labels)
dicom-csv      a folder of DICOM files, or the node's data directory, + a CSV of outcomes
=============  ==============================================================================

Every importer writes ``rois.csv`` (patient pseudonyms for grouped folds), the patches,
``skipped.csv`` (what was left out and why) and ``import.json`` (counts and options).
"""

from models.importers.cbis_ddsm import import_cbis_ddsm
from models.importers.cmmd import import_cmmd
from models.importers.dicom_csv import import_dicom_csv
from models.importers.inbreast import import_inbreast
from models.importers.vindr import import_vindr

__all__ = ["import_cbis_ddsm", "import_cmmd", "import_dicom_csv", "import_inbreast",
           "import_vindr"]
