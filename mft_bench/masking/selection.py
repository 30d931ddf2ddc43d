"""Exact-count mask selection: which entries to remove given a magnitude per entry.

``keep_mask`` removes exactly ``n_remove`` entries (the smallest), ties included: it selects by index with
``torch.topk`` over the smaller side (remove-set or keep-set), so the count never depends on tied values. On this
CPU ``topk`` with k = 10% was measured faster than ``kthvalue`` (12 ms vs 20 ms on 885k entries) and it is the
reliable choice on GPU; ``torch.quantile`` is avoided (it fails above 2**24 elements).
"""

from __future__ import annotations

import hashlib

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
    if n_remove <= numel - n_remove:
        idx = torch.topk(flat, n_remove, largest=False, sorted=False).indices
        keep = torch.ones(numel, dtype=torch.bool, device=flat.device)
        keep[idx] = False
    else:
        idx = torch.topk(flat, numel - n_remove, largest=True, sorted=False).indices
        keep = torch.zeros(numel, dtype=torch.bool, device=flat.device)
        keep[idx] = True
    return keep.view(magnitude.shape)


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
