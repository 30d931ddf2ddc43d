"""Mask statistics for reports: per-matrix removed counts and the overlap between two masks."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from mft_bench.errors import MftBenchError

_LAYER = re.compile(r"\.(\d+)\.")


def split_name(name: str) -> tuple[int | None, str]:
    """``model.layers.2.self_attn.q_proj`` -> (2, ``self_attn.q_proj``): layer index and layer-relative name."""
    match = _LAYER.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end():]


def mask_statistics(masks: Mapping[str, torch.Tensor]) -> list[dict]:
    """One row per matrix: name, layer, module (layer-relative), numel, removed, removed_fraction."""
    rows = []
    for name, mask in masks.items():
        layer, module = split_name(name)
        numel = mask.numel()
        removed = numel - int(mask.sum())
        rows.append(dict(name=name, layer=layer, module=module, numel=numel, removed=removed,
                         removed_fraction=removed / numel if numel else 0.0))
    return rows


def removed_counts(masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{name: removed entries}``: pass to ``baseline_masks(removed_counts=...)`` to match a mask exactly."""
    return {name: mask.numel() - int(mask.sum()) for name, mask in masks.items()}


def mask_overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Jaccard index of the removed sets, over (matrix, entry) pairs of all matrices in either mask.

    1.0 when both remove exactly the same entries (or nothing at all); a matrix present in only one mask counts
    as nothing removed in the other.
    """
    inter = union = 0
    for name in list(a) + [n for n in b if n not in a]:
        ra = ~a[name].cpu() if name in a else None
        rb = ~b[name].cpu() if name in b else None
        if ra is not None and rb is not None:
            if ra.shape != rb.shape:
                raise MftBenchError(f"mask_overlap: module '{name}' has shape {tuple(ra.shape)} vs {tuple(rb.shape)}")
            inter += int((ra & rb).sum())
            union += int((ra | rb).sum())
        else:
            union += int((ra if ra is not None else rb).sum())
    return inter / union if union else 1.0
