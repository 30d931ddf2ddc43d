"""What to mask: the validated mask specification shared by MFT and its baselines."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mft_bench.errors import MftBenchError

INITS = ("normal", "magnitude")
LOCAL, GLOBAL_ABS_EXACT, GLOBAL_SIGNED_THRESHOLD = "local", "global-abs-exact", "global-signed-threshold"
MODES = (LOCAL, GLOBAL_ABS_EXACT, GLOBAL_SIGNED_THRESHOLD)
# the one line for recipes written when "global" named the exact-count |score| mode alone
AMBIGUOUS_GLOBAL = (
    "'global' is ambiguous: say global-abs-exact (mft-bench's: round(mask_ratio x total) entries of smallest |score| "
    "across the masked matrices, exact count) or global-signed-threshold (the official code's: every entry whose "
    "signed score is below one threshold)"
)


@dataclass
class MaskSpec:
    """Which linear modules to mask and how.

    ``mask_ratio`` is the REMOVED fraction (the official config's ``sparsity 0.9`` means keep 90%, i.e. 0.1 here).
    ``modules=None`` means the architecture's default projections (see ``architectures.py``).
    ``mode``: ``local`` removes ``round(mask_ratio * numel)`` entries of smallest |score| per matrix (the paper's);
    ``global-abs-exact`` removes ``round(mask_ratio * total)`` entries of smallest |score| across all masked matrices
    together (exact count, mft-bench's); ``global-signed-threshold`` is the official code's global mode
    (``SupermaskLinearThreshold``): an entry is removed while its SIGNED score is below ``threshold``, a constant
    for the whole run, so the removed count follows the scores. ``threshold=None`` there takes the official
    ``percentile`` helper of all initial scores at ``mask_ratio`` (about that fraction removed at the start).
    """

    layers: list[int]
    modules: list[str] | None = None
    mask_ratio: float = 0.1
    init: str = "normal"
    seed: int = 0
    mode: str = LOCAL
    threshold: float | None = None

    def __post_init__(self) -> None:
        try:
            self.layers = [int(i) for i in self.layers]
        except (TypeError, ValueError) as exc:
            raise MftBenchError(f"mask.layers must be a list of integers, got {self.layers!r}") from exc
        if not self.layers:
            raise MftBenchError("mask.layers must name at least one decoder layer index")
        if any(i < 0 for i in self.layers):
            raise MftBenchError(f"mask.layers must be non-negative layer indices, got {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise MftBenchError(f"mask.layers has duplicates: {self.layers}")
        if self.modules is not None:
            if isinstance(self.modules, str) or not self.modules:
                raise MftBenchError(
                    f"mask.modules must be a non-empty list of module names or null, got {self.modules!r}"
                )
            self.modules = [str(m) for m in self.modules]
        if isinstance(self.mask_ratio, bool) or not isinstance(self.mask_ratio, (int, float)):
            raise MftBenchError(f"mask.mask_ratio must be a number in (0, 1), got {self.mask_ratio!r}")
        if not 0.0 < float(self.mask_ratio) < 1.0:
            raise MftBenchError(f"mask.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        self.mask_ratio = float(self.mask_ratio)
        if self.init not in INITS:
            raise MftBenchError(f"mask.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.mode == "global":
            raise MftBenchError(f"mask.mode {AMBIGUOUS_GLOBAL}")
        if self.mode not in MODES:
            raise MftBenchError(f"mask.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.threshold is not None:
            if self.mode != GLOBAL_SIGNED_THRESHOLD:
                raise MftBenchError(f"mask.threshold applies to mode {GLOBAL_SIGNED_THRESHOLD} only (mode is "
                                    f"{self.mode}): remove it, or set that mode")
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                    or not math.isfinite(self.threshold):
                raise MftBenchError(f"mask.threshold must be a finite number, got {self.threshold!r}")
            self.threshold = float(self.threshold)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MftBenchError(f"mask.seed must be an integer, got {self.seed!r}")
