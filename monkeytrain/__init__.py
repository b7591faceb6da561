"""monkeytrain: train image classifiers on image-folder datasets with one Accelerate loop."""

__version__ = "0.1.0"
