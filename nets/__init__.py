"""Network parts both families build on: the EfficientNet backbone and its input
statistics, the FPN and NAS-FPN necks, norms, and the per-group loss normalizer.

Family-neutral: nothing here imports `detection` or `segmentation`, and neither family
imports the other; both import from here. No Prefect.
"""
