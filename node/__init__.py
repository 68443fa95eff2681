"""mammo-node: a DICOM-network AI node for mammography calcification analysis."""

__version__ = "0.1.0"
