"""Apply masks to the weights (zeros written in the weights' own dtype) and export a plain dense checkpoint."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mft_bench.errors import MftBenchError
from mft_bench.masking.masked_linear import wrappers

logger = logging.getLogger(__name__)


def remove_wrappers(model: nn.Module) -> list[str]:
    """Put the original modules back (same weight/bias Parameters); scores are dropped. Returns the names."""
    found = wrappers(model)
    for name, wrapper in found.items():
        parent_name, _, attr = name.rpartition(".")
        base = wrapper.base_module
        base.weight = wrapper.weight
        base.bias = wrapper.bias
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, base)
    return list(found)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """In place: remove any MFT wrappers, then zero every weight entry whose mask is False.

    Works on a wrapped model and on a plain one (e.g. baseline masks on the FFT model). Returns ``model``.
    """
    for name, mask in masks.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError as exc:
            raise MftBenchError(f"apply_masks: module '{name}' does not exist in the model") from exc
        if tuple(weight.shape) != tuple(mask.shape):
            raise MftBenchError(
                f"apply_masks: module '{name}' has weight shape {tuple(weight.shape)}, mask is {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise MftBenchError(f"apply_masks: mask for '{name}' must be torch.bool (True = kept), got {mask.dtype}")
    unwrapped = remove_wrappers(model)
    missing = [n for n in unwrapped if n not in masks]
    if missing:
        logger.warning("apply_masks: %d wrapped modules had no mask and are left dense: %s",
                       len(missing), ", ".join(missing[:4]))
    removed = 0
    with torch.no_grad():
        for name, mask in masks.items():
            weight = model.get_submodule(name).weight
            drop = ~mask.to(weight.device)
            weight.masked_fill_(drop, 0)
            removed += int(drop.sum())
    logger.info("applied %d masks (%d weights zeroed)", len(masks), removed)
    return model


def export_dense(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    tokenizer=None,
) -> Path:
    """Apply ``masks`` in place and ``save_pretrained`` a plain safetensors checkpoint (model's own dtype) that
    ``AutoModelForCausalLM.from_pretrained`` (and vLLM, lm-eval) load without mft-bench."""
    apply_masks(model, masks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # transformers 5 writes safetensors only
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if not any(out.glob("*.safetensors")):
        raise MftBenchError(f"export: save_pretrained wrote no .safetensors file into {out}")
    logger.info("exported dense masked model to %s", out)
    return out
