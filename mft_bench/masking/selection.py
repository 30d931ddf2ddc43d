"""Exact-count mask selection: which entries to remove given a magnitude per entry.

``keep_mask`` removes exactly ``n_remove`` entries (the smallest), ties included: the final choice is always made
by index with ``torch.topk``, so the count never depends on tied values. A full ``topk`` over a matrix (12 ms on
885k entries on CPU, ~10% of a one-micro-batch MFT step over 28 matrices) is avoided for large matrices: the cut
is first bracketed between two order statistics of a small strided sample, every entry below the bracket is
removed by one comparison, and ``topk`` runs only over the ~3% of entries inside it (the same set as a full
``topk`` whenever the cut is not tied; exact in every case; a missed bracket falls back to the full ``topk``).
``torch.quantile`` is avoided (it fails above 2**24 elements); ``kthvalue`` was slower than ``topk`` here.
"""

from __future__ import annotations

import hashlib
import math

import torch


def removed_count(numel: int, mask_ratio: float) -> int:
    """Entries removed from a matrix of ``numel`` entries: ``round(mask_ratio * numel)``, within [0, numel]."""
    return min(numel, max(0, round(mask_ratio * numel)))


def keep_mask(magnitude: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Bool tensor shaped like ``magnitude``: False at exactly ``n_remove`` entries of smallest value."""
    flat = magnitude.detach().reshape(-1)
    numel = flat.numel()
    if n_remove <= 0:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if n_remove >= numel:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if numel >= BRACKET_MIN_NUMEL:
        keep = _bracketed_keep(flat, n_remove)
        if keep is not None:
            return keep.view(magnitude.shape)
    return _topk_keep(flat, n_remove).view(magnitude.shape)


BRACKET_MIN_NUMEL = 1 << 16  # below this a full topk is already cheap
SAMPLE_SIZE = 4096  # enough to bracket the cut within ~4% of the entries


def _topk_keep(flat: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Exact selection by one ``topk`` over the smaller side (remove-set or keep-set)."""
    numel = flat.numel()
    if n_remove <= numel - n_remove:
        idx = torch.topk(flat, n_remove, largest=False, sorted=False).indices
        keep = torch.ones(numel, dtype=torch.bool, device=flat.device)
        keep[idx] = False
    else:
        idx = torch.topk(flat, numel - n_remove, largest=True, sorted=False).indices
        keep = torch.zeros(numel, dtype=torch.bool, device=flat.device)
        keep[idx] = True
    return keep


def _bracketed_keep(flat: torch.Tensor, n_remove: int) -> torch.Tensor | None:
    """Exact selection in a few linear passes, or None when the sampled bracket misses the cut.

    With ``lo <= hi`` taken from the sample around the target rank (±4 standard deviations of a sample rank),
    every entry ``< lo`` is removed, every entry ``> hi`` kept, and the remaining ``n_remove - below`` removals
    are the smallest entries with ``lo <= value <= hi`` (by ``topk``). Correct whenever
    ``below <= n_remove <= below + inside``, which is checked.
    """
    numel = flat.numel()
    # An odd stride, so the sample does not line up with the rows or columns of a matrix.
    sample = torch.sort(flat[:: (numel // SAMPLE_SIZE) | 1]).values
    m = sample.numel()
    q = n_remove / numel
    margin = int(4 * math.sqrt(m * q * (1 - q))) + 8
    lo_rank, hi_rank = int(q * m) - margin, int(q * m) + margin
    if lo_rank < 0 or hi_rank >= m:  # the cut is near an end: the plain topk over the small side is cheap
        return None
    below = flat < sample[lo_rank]
    inside = (flat <= sample[hi_rank]).logical_xor_(below)  # lo <= value <= hi (below implies <= hi)
    n_below = int(torch.count_nonzero(below))
    need = n_remove - n_below
    idx = torch.nonzero(inside).squeeze(1)
    if need < 0 or need > idx.numel():
        return None
    keep = below.logical_not_()
    if need:
        keep[idx[torch.topk(flat[idx], need, largest=False, sorted=False).indices]] = False
    return keep


def global_keep_masks(magnitudes: list[torch.Tensor], mask_ratio: float) -> list[torch.Tensor]:
    """The paper's global mode: remove ``round(mask_ratio * total)`` smallest entries across all matrices."""
    sizes = [m.numel() for m in magnitudes]
    device = magnitudes[0].device
    flat = torch.cat([m.detach().reshape(-1).to(device=device, dtype=torch.float32) for m in magnitudes])
    keep = keep_mask(flat, removed_count(flat.numel(), mask_ratio))
    return [
        part.view(m.shape).to(m.device) for part, m in zip(torch.split(keep, sizes), magnitudes, strict=True)
    ]


def module_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, module name): reproducible, independent of global RNG and of which
    other modules are masked."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
