"""The paper's mask baselines on the modules MFT masks: random, magnitude (unstructured) and L1 rows (structured).

- ``random``: exactly ``round(mask_ratio * numel)`` entries per matrix, uniformly at random;
- ``magnitude``: the same count of entries with the smallest |W| (unstructured);
- ``l1_rows``: whole output rows with the smallest mean |W|, the "L1 mask" of the official code when the paper's
  figure was made (``scripts/apply_masks.py`` at d1d7a72, ``generate_l1_masks``; made unstructured in 43d5384).
  As there: per matrix, score each output row by its mean |W| (float32 here; the official script loads the
  model in float32), remove the ``min(int((1 - keep) * rows), rows - 1)`` lowest rows, where ``keep`` is the
  config's ``sparsity`` (0.9, the kept fraction; ``1 - mask_ratio`` here). That count truncates
  ``0.0999...98 * rows``: LLaMA-2-7B's 4096- and 11008-row matrices lose 409 and 1100 rows, where
  ``round(mask_ratio * rows)`` would give 410 and 1101; the official count is kept. Ties in the row score
  (absent in real weights) go to the lower row index (a stable sort; the official ``sort()`` promises no order).
  GPT-2's ``Conv1D`` stores (in, out): its output units are columns, and those are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from mft_bench.errors import MftBenchError
from mft_bench.masking.architectures import is_transposed, resolve_targets
from mft_bench.masking.selection import keep_mask, module_generator, removed_count
from mft_bench.recipe import MaskSpec

logger = logging.getLogger(__name__)

BASELINE_KINDS = ("random", "magnitude", "l1_rows")


def random_mask(shape: torch.Size, n_remove: int, generator: torch.Generator) -> torch.Tensor:
    """Exactly ``n_remove`` entries removed, chosen uniformly at random (CPU, so reproducible on any device)."""
    numel = int(torch.Size(shape).numel())
    keep = torch.ones(numel, dtype=torch.bool)
    keep[torch.randperm(numel, generator=generator)[:n_remove]] = False
    return keep.view(shape)


def magnitude_mask(weight: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Exactly ``n_remove`` entries of smallest |W| removed."""
    return keep_mask(weight.detach().abs().to(torch.float32), n_remove)


def l1_rows_removed(rows: int, mask_ratio: float) -> int:
    """Output rows the official L1 baseline removes from a matrix: ``min(int((1 - keep) * rows), rows - 1)`` with
    ``keep = 1 - mask_ratio`` (the official config's ``sparsity``), computed in the same float arithmetic."""
    keep = 1.0 - mask_ratio
    return min(int((1 - keep) * rows), rows - 1)


def l1_rows_mask(weight: torch.Tensor, n_rows: int, transposed: bool = False) -> torch.Tensor:
    """Keep-mask shaped like ``weight`` with the ``n_rows`` output units of smallest mean |W| removed whole
    (rows of an (out, in) weight; columns when ``transposed``, GPT-2's (in, out) ``Conv1D``)."""
    rows_first = weight.detach().t() if transposed else weight.detach()
    score = rows_first.abs().to(torch.float32).mean(dim=1)
    keep_rows = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    keep_rows[torch.sort(score, stable=True).indices[:n_rows]] = False
    mask = keep_rows[:, None].expand(rows_first.shape)
    return (mask.t() if transposed else mask).contiguous()


def baseline_masks(
    model: nn.Module,
    spec: MaskSpec,
    kind: str = "random",
    seed: int = 0,
    removed_counts: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Baseline masks for the modules ``spec`` selects (wrapped or plain model), True = kept.

    ``random``/``magnitude``: each matrix loses ``round(spec.mask_ratio * numel)`` entries, or
    ``removed_counts[name]`` when given (pass the trained MFT mask's counts to match a global-mode run matrix by
    matrix). ``l1_rows``: each matrix loses ``l1_rows_removed(rows, spec.mask_ratio)`` whole output rows (see the
    module docstring); ``removed_counts`` does not apply.
    """
    if kind not in BASELINE_KINDS:
        raise MftBenchError(f"mask baseline kind must be one of {', '.join(BASELINE_KINDS)}, got {kind!r}")
    if kind == "l1_rows" and removed_counts is not None:
        raise MftBenchError("mask baseline 'l1_rows' removes whole rows by the official count; "
                            "removed_counts (entry counts) cannot be matched, leave it unset")
    masks: dict[str, torch.Tensor] = {}
    for name in resolve_targets(model, spec.layers, spec.modules):
        module = model.get_submodule(name)
        weight = module.weight
        if kind == "l1_rows":
            transposed = bool(getattr(module, "transposed", is_transposed(module)))  # a wrapper records it
            rows = weight.shape[1] if transposed else weight.shape[0]
            masks[name] = l1_rows_mask(weight, l1_rows_removed(rows, spec.mask_ratio), transposed)
            continue
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
