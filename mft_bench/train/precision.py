"""Training precision: which dtype the trained weights live in, which the compute runs in, which the exports take.

``mixed`` (the default, and what the official code's DeepSpeed bf16 mode did): every trained tensor is kept and
updated in fp32, the forward and backward run under autocast in the backbone's dtype, and exports are cast back to
that dtype. Frozen weights (MFT's, LoRA's base) stay in the backbone's dtype. ``pure`` trains the weights in the
backbone's dtype itself: with bf16 and lr 2e-5 most AdamW updates are below half an ulp and are lost.
"""

from __future__ import annotations

from typing import Any

import torch


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def keep_trainable_in_fp32(model: torch.nn.Module) -> int:
    """Cast every parameter that requires a gradient to fp32 in place (the master copy); returns how many."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def autocast_arguments(compute_dtype: str) -> dict[str, bool]:
    """``TrainingArguments`` keywords that run forward and backward under autocast in ``compute_dtype``."""
    return {"bf16": compute_dtype == "bfloat16", "fp16": compute_dtype == "float16"}


def cast_floating(state_dict: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The state dict with every floating tensor in ``dtype`` (integer buffers untouched)."""
    return {name: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for name, t in state_dict.items()}
