"""Mask Fine-Tuning core: wrap projections, learn masks through scores, baselines, bit-packed io, dense export.

>>> spec = MaskSpec(layers=[2, 3], mask_ratio=0.1)   # mft_bench.recipe.MaskSpec, a recipe's ``mask``
>>> names = attach_masks(model, spec, seed=0)   # in place; only the scores train
>>> masks = current_masks(model)                # {name: bool mask, True = kept}
>>> save_masks(masks, "mask.safetensors", base_model=model)
>>> apply_masks(model, masks)                   # plain PreTrainedModel with zeros
"""

from mft_bench.masking.architectures import default_modules, layers_path, maskable_module_names, resolve_targets
from mft_bench.masking.baselines import baseline_masks
from mft_bench.masking.export import apply_masks, export_dense, remove_wrappers
from mft_bench.masking.mask_io import (
    base_weights_hash,
    bits_per_weight,
    load_masks,
    read_mask_metadata,
    save_masks,
)
from mft_bench.masking.masked_linear import (
    MaskedLinear,
    attach_masks,
    current_masks,
    invalidate_masks,
    mask_parameters,
    masked_module_names,
    refresh_masks,
)
from mft_bench.masking.selection import keep_mask, removed_count
from mft_bench.masking.stats import mask_overlap, mask_statistics, removed_counts

__all__ = [
    "MaskedLinear", "apply_masks", "attach_masks", "base_weights_hash", "baseline_masks",
    "bits_per_weight", "current_masks", "default_modules", "export_dense", "invalidate_masks", "keep_mask",
    "layers_path", "load_masks", "mask_overlap", "mask_parameters", "mask_statistics", "maskable_module_names",
    "masked_module_names", "read_mask_metadata", "refresh_masks", "remove_wrappers", "removed_count",
    "removed_counts", "resolve_targets", "save_masks",
]
