"""Calcification-cluster detector shared by training and serving.

The node (``node.analysis.rois``) and the research harness (``models.detector.train``) both call
the same code here, as they share :func:`models.roi.crop_roi` for the classifier:

* :mod:`models.detector.anatomy` - breast mask, chest-wall side, pectoral muscle (MLO);
* :mod:`models.detector.candidates` - multi-scale blob candidates and their features;
* :mod:`models.detector.clusters` - grouping candidates into clusters, cluster features;
* :mod:`models.detector.trees` - boosted trees stored as JSON and evaluated with NumPy;
* :mod:`models.detector.model` - the detector file (``calc-detector.json``) and ``detect()``;
* :mod:`models.detector.insert` - synthetic clusters inserted into real normal images;
* :mod:`models.detector.train` / :mod:`models.detector.froc` - training and FROC evaluation.
"""
