"""The paper's mask baselines: random and magnitude masks on the same modules with the same removed counts."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from mft_bench.errors import MftBenchError
from mft_bench.masking.architectures import resolve_targets
from mft_bench.masking.selection import keep_mask, module_generator, removed_count
from mft_bench.masking.spec import MaskSpec

logger = logging.getLogger(__name__)

BASELINE_KINDS = ("random", "magnitude")


def random_mask(shape: torch.Size, n_remove: int, generator: torch.Generator) -> torch.Tensor:
    """Exactly ``n_remove`` entries removed, chosen uniformly at random (CPU, so reproducible on any device)."""
    numel = int(torch.Size(shape).numel())
    keep = torch.ones(numel, dtype=torch.bool)
    keep[torch.randperm(numel, generator=generator)[:n_remove]] = False
    return keep.view(shape)


def magnitude_mask(weight: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Exactly ``n_remove`` entries of smallest |W| removed."""
    return keep_mask(weight.detach().abs().to(torch.float32), n_remove)


def baseline_masks(
    model: nn.Module,
    spec: MaskSpec,
    kind: str = "random",
    seed: int = 0,
    removed_counts: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Baseline masks for the modules ``spec`` selects (wrapped or plain model), True = kept.

    Each matrix loses ``round(spec.mask_ratio * numel)`` entries, or ``removed_counts[name]`` when given (pass the
    trained MFT mask's counts to match a global-mode run matrix by matrix).
    """
    if kind not in BASELINE_KINDS:
        raise MftBenchError(f"mask baseline kind must be one of {', '.join(BASELINE_KINDS)}, got {kind!r}")
    masks: dict[str, torch.Tensor] = {}
    for name in resolve_targets(model, spec.layers, spec.modules):
        weight = model.get_submodule(name).weight
        if removed_counts is not None:
            if name not in removed_counts:
                raise MftBenchError(f"mask baseline: removed_counts has no entry for module '{name}'")
            n_remove = int(removed_counts[name])
        else:
            n_remove = removed_count(weight.numel(), spec.mask_ratio)
        if kind == "random":
            mask = random_mask(weight.shape, n_remove, module_generator(seed, f"random-baseline:{name}"))
        else:
            mask = magnitude_mask(weight, n_remove)
        masks[name] = mask.to(weight.device)
    logger.info("%s baseline masks for %d modules", kind, len(masks))
    return masks
