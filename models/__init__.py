"""Model research harness: architectures, ROI datasets, training, evaluation and model cards.

This package never imports ``node``; the node imports ``models.card`` and ``models.roi`` so that
training and serving share one definition of the card and of the ROI crop.
"""
