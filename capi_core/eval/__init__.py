"""Frozen-feature evaluation: features, weighted k-NN, probes, register diagnostics and pictures.

- ``features``: batched, frozen extraction of per-layer tokens split into [cls] / registers / patches.
- ``knn``: weighted k-NN top-1 (%), also the trainer's online metric ``probe/knn_top1``.
- ``probes``: k-NN, linear ([cls], mean), CAPI attentive, AbMILP and efficient probing, selected on a
  held-out part of the training split only.
- ``diagnostics``: high-norm token detector, norm profiles, attention-flow statistics.
- ``pictures``: PCA-RGB of patch features, attention maps and token-norm heat maps as PNGs.
- ``evaluate``: all of the above on one checkpoint, as one typed report (what ``capi eval run`` writes).
"""
