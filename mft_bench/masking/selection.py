"""Exact-count mask selection: which entries to remove given a magnitude per entry.

``keep_mask`` removes exactly ``n_remove`` entries: every entry below the cut value (the ``n_remove``-th smallest),
then entries equal to it, lowest index first. The result is therefore one function of the values, whichever path
computed it (a resumed run, which starts without a hint, selects the same masks as an uninterrupted one).

The cut is first bracketed, ``lo <= cut <= hi``: every entry below ``lo`` is removed by one comparison and the
order statistics are taken only among the entries inside the bracket. For large matrices the bracket comes from
the previous cut of the same scores when a ``CutHint`` is passed (scores move little per optimizer step: a small
fraction of entries falls inside, and their indices are found 8 at a time), else from two order statistics of a
strided sample (~4% inside); a missed bracket is detected by counting and the next one is tried, the last being
everything. A full ``topk`` per matrix (12 ms on 885k entries on CPU) is avoided; ``torch.quantile`` fails above
2**24 elements.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch


def removed_count(numel: int, mask_ratio: float) -> int:
    """Entries removed from a matrix of ``numel`` entries: ``round(mask_ratio * numel)``, within [0, numel]."""
    return min(numel, max(0, round(mask_ratio * numel)))


BRACKET_MIN_NUMEL = 1 << 16  # below this one pass over everything is already cheap
SAMPLE_SIZE = 4096  # enough to bracket the cut within ~4% of the entries
HINT_WIDTH_LIMITS = (1e-4, 0.5)  # relative half-width of a hinted bracket
FIRST_HINT_NARROWING = 8  # first hint: the found bracket's width over this
HINT_SHRINK = 0.5  # the most a hinted width shrinks per selection
HINT_MOVE_MARGIN = 8  # a hinted width is at least this many times the cut's last relative move


@dataclass
class CutHint:
    """Where the previous selection over the same scores cut, and a relative half-width for the next bracket,
    ``value ± width·|value|``: at first an eighth of that of the bracket that found the cut (a sampled bracket's
    width is the sample's uncertainty, ~4% of the entries, far more than an optimizer step moves the cut), then
    eight times the last relative move of the cut, shrinking at most by half per selection and growing fourfold
    after a miss (within HINT_WIDTH_LIMITS). ``keep_mask`` updates it; it affects only speed, never the result.
    The cost of a selection falls with its width down to ~0.005 and is nearly flat below (28 SmolLM2 matrices:
    ~180 ms at a relative width of 0.1, ~120 at 0.02, ~80 at 0.002), while a miss costs a second, sampled
    bracket: so start narrow (runs are short: the default recipe has 8 MFT steps) and keep a wide margin."""

    value: float | None = None
    width: float = HINT_WIDTH_LIMITS[1]
    misses: int = 0  # hinted brackets that missed the cut (diagnostics, tests)

    def bracket(self) -> tuple[float, float] | None:
        if self.value is None:
            return None
        half = self.width * abs(self.value)
        return self.value - half, self.value + half

    def update(self, cut: float, bracket: tuple[float, float], missed: bool) -> None:
        if self.value is None:
            width = (bracket[1] - bracket[0]) / 2 / abs(cut) / FIRST_HINT_NARROWING if cut else math.inf
        elif self.value != 0.0:
            move = abs(cut - self.value) / abs(self.value)
            width = max(HINT_MOVE_MARGIN * move, self.width * (4 if missed else HINT_SHRINK))
        else:
            width = self.width
        self.width = min(max(width, HINT_WIDTH_LIMITS[0]), HINT_WIDTH_LIMITS[1])
        self.misses += missed
        self.value = cut


def keep_mask(
    magnitude: torch.Tensor, n_remove: int, hint: CutHint | None = None, nonnegative: bool = False,
) -> torch.Tensor:
    """Bool tensor shaped like ``magnitude``: False at exactly ``n_remove`` entries of smallest value, ties at the
    cut removed lowest index first. ``nonnegative``: every value is an ``abs()`` result (>= 0, never -0.0), which
    allows a faster comparison."""
    flat = magnitude.detach().reshape(-1)
    numel = flat.numel()
    if n_remove <= 0:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if n_remove >= numel:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    hinted = hint.bracket() if hint is not None and numel >= BRACKET_MIN_NUMEL else None

    def brackets():  # each computed only if the one before missed
        if hinted is not None:
            yield hinted
        if numel >= BRACKET_MIN_NUMEL:
            yield _sample_bracket(flat, n_remove)
        yield -math.inf, math.inf  # everything: cannot miss

    for i, (lo, hi) in enumerate(brackets()):
        found = _keep_in_bracket(flat, n_remove, lo, hi, nonnegative)
        if found is not None:
            keep, cut = found
            if hint is not None:
                hint.update(cut, (lo, hi), missed=hinted is not None and i > 0)
            return keep.view(magnitude.shape)
    raise AssertionError("the unbounded bracket cannot miss")  # pragma: no cover


def _sample_bracket(flat: torch.Tensor, n_remove: int) -> tuple[float, float]:
    """Two order statistics of a strided sample around the target rank (±4 standard deviations of a sample
    rank); open on a side where the cut is too near that end for the sample to bound it."""
    numel = flat.numel()
    # An odd stride, so the sample does not line up with the rows or columns of a matrix.
    sample = flat[:: (numel // SAMPLE_SIZE) | 1].contiguous()
    m = sample.numel()
    q = n_remove / numel
    margin = int(4 * math.sqrt(m * q * (1 - q))) + 8
    lo_rank, hi_rank = int(q * m) - margin, int(q * m) + margin
    # kthvalue is 1-based; two order statistics are cheaper than sorting the sample.
    lo = float(torch.kthvalue(sample, lo_rank + 1).values) if lo_rank >= 0 else -math.inf
    hi = float(torch.kthvalue(sample, hi_rank + 1).values) if hi_rank < m else math.inf
    return lo, hi


def _keep_in_bracket(
    flat: torch.Tensor, n_remove: int, lo: float, hi: float, nonnegative: bool = False,
) -> tuple[torch.Tensor, float] | None:
    """(keep mask, cut value) in a few linear passes, or None when the cut is not inside ``[lo, hi]``.

    Entries ``< lo`` are removed, entries ``> hi`` kept, and the remaining ``n_remove - below`` removals are
    resolved among the entries inside, which hold every entry equal to the cut: the result does not depend on
    the bracket. Correct whenever ``below <= n_remove <= below + inside``, which is checked.
    """
    numel = flat.numel()
    keys, lo_key, hi_key = _comparison_keys(flat, lo, hi, nonnegative)
    if keys is flat:
        # "not below" rather than ">= lo": a NaN is then kept, as its bit pattern (above +inf's) is by the int path
        keep = (flat < lo).logical_not_()
        kept = int(torch.count_nonzero(keep))
    else:
        # int32 keys (CPU): compared into an int32 buffer, then cast to bool. ATen vectorizes a comparison whose
        # output has its inputs' dtype but not one that writes bool: 0.34 vs 0.63 ms for 885k entries, and the
        # count summed from the int32 flags 0.18 vs 0.30 ms for count_nonzero over the bools (2 threads).
        flags = scratch(numel, torch.int32, flat.device, "flags")
        kept = int(torch.ge(keys, lo_key, out=flags).sum(dtype=torch.int32))
        keep = torch.empty(numel, dtype=torch.bool, device=flat.device).copy_(flags)
    need = n_remove - (numel - kept)
    if need < 0:
        return None
    inside = scratch(numel, torch.bool, flat.device, "inside")
    if keys is flat:
        torch.le(keys, hi_key, out=inside)
    else:  # through the int32 buffer, as above
        inside.copy_(torch.le(keys, hi_key, out=flags))
    idx = _true_indices(inside.logical_and_(keep))  # lo <= value <= hi
    if need > idx.numel():
        return None
    if not need:
        return keep, lo
    values = flat.index_select(0, idx)
    cut = torch.kthvalue(values, need).values
    lower = values < cut
    tied = torch.nonzero(values == cut).squeeze(1)[: need - int(torch.count_nonzero(lower))]
    keep.index_fill_(0, idx[lower], False)
    keep.index_fill_(0, idx.index_select(0, tied), False)  # idx is ascending: lowest indices first
    return keep, float(cut)


def _comparison_keys(flat: torch.Tensor, lo: float, hi: float, nonnegative: bool) -> tuple[torch.Tensor, Any, Any]:
    """What to compare with ``lo`` and ``hi``: for float32 values known to be >= 0 (magnitudes) on CPU, their
    int32 bit patterns, which order the same way and compare ~25% faster; else the values themselves."""
    if not (nonnegative and flat.dtype == torch.float32 and flat.device.type == "cpu"):
        return flat, lo, hi

    def key(bound: float) -> int:
        if bound < 0:  # no value >= 0 is below (or at) a negative bound: -1 is below every key
            return -1
        # float32 rounding as torch applies to a Python scalar; "+ 0.0" turns -0.0 into 0.0
        return int(torch.tensor(bound + 0.0, dtype=torch.float32).view(torch.int32))

    return flat.view(torch.int32), key(lo), key(hi)


def _true_indices(mask: torch.Tensor) -> torch.Tensor:
    """Ascending indices of the True entries of a 1-D bool tensor. When few are True, words of 8 entries are
    scanned first (``nonzero`` costs ~2 ns per entry on CPU, the 8-byte view ~0.25) and only nonzero words are
    expanded."""
    numel = mask.numel()
    if numel % 8 or mask.data_ptr() % 8 or mask.device.type != "cpu":
        return torch.nonzero(mask).squeeze(1)
    words = torch.nonzero(mask.view(torch.int64)).squeeze(1)
    if words.numel() * 8 > numel // 4:  # dense: the plain scan is cheaper than the expansion
        return torch.nonzero(mask).squeeze(1)
    rows, cols = torch.nonzero(mask.view(-1, 8).index_select(0, words), as_tuple=True)
    return words.index_select(0, rows).mul_(8).add_(cols)


def keep_mask_of_abs(values: torch.Tensor, n_remove: int, hint: CutHint | None = None) -> torch.Tensor:
    """``keep_mask(values.abs(), n_remove, hint)``, with ``|values|`` written into a reused work buffer: a fresh
    buffer per call costs more in page faults than the abs itself on CPU."""
    flat = values.detach().reshape(-1)
    magnitude = torch.abs(flat, out=scratch(flat.numel(), flat.dtype, flat.device, "magnitude"))
    return keep_mask(magnitude, n_remove, hint, nonnegative=True).view(values.shape)


_scratch = threading.local()  # per thread, so that concurrent callers never share a buffer


def scratch(numel: int, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    """A 1-D work tensor of ``numel`` entries, reused across calls on this thread (CPU only; CUDA's caching
    allocator already reuses memory). Its contents are overwritten by the next call with the same name."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def global_keep_masks(
    magnitudes: list[torch.Tensor], mask_ratio: float, hint: CutHint | None = None
) -> list[torch.Tensor]:
    """Mode ``global-abs-exact``: remove the ``round(mask_ratio * total)`` smallest entries across all matrices
    (pass magnitudes), ties lowest index first in the matrices' order."""
    sizes = [m.numel() for m in magnitudes]
    device = magnitudes[0].device
    flat = torch.cat([m.detach().reshape(-1).to(device=device, dtype=torch.float32) for m in magnitudes])
    keep = keep_mask(flat, removed_count(flat.numel(), mask_ratio), hint)
    return [
        part.view(m.shape).to(m.device) for part, m in zip(torch.split(keep, sizes), magnitudes, strict=True)
    ]


def official_percentile(values: torch.Tensor, q: float) -> float:
    """The official code's ``percentile(t, q)`` (``scripts/finetune.py``): the ``1 + round(q * (numel - 1))``-th
    smallest value (Python's ``round``: halves to even)."""
    flat = values.detach().reshape(-1)
    k = 1 + round(float(q) * (flat.numel() - 1))
    return float(flat.kthvalue(k).values)


def signed_threshold_keep(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mode ``global-signed-threshold``, as the official ``GetSubnetThreshold``: an entry is removed where its signed
    score is below ``threshold`` (``scores < threshold``); one equal to it, or NaN, is kept."""
    return torch.lt(scores.detach(), threshold).logical_not_()


def signed_threshold_for_ratio(scores: list[torch.Tensor], mask_ratio: float) -> float:
    """One threshold for all ``scores`` (signed, concatenated): their official ``percentile`` at ``mask_ratio``, so
    that about that fraction starts removed."""
    device = scores[0].device
    flat = torch.cat([s.detach().reshape(-1).to(device=device, dtype=torch.float32) for s in scores])
    return official_percentile(flat, mask_ratio)


def module_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, module name): reproducible, independent of global RNG and of which
    other modules are masked."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
