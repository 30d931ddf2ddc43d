"""mft-bench: Mask Fine-Tuning (arXiv 2503.22764) trained, evaluated and compared against its baselines."""

__version__ = "0.1.0"
