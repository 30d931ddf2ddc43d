"""How many sequences' keys and values fit the memory the generation has: fewer rows at a time, not an OOM.

A LLaMA-2-7B row of 8-shot GSM8K (~900 prompt + 512 new tokens) holds ~0.7 GiB of keys and values in bf16; 64 of
them beside the model overflow an 80 GB card. The hf backend caps its batch to the rows whose full-length cache fits
a share of the free memory (measured when a group starts), which changes no result: a row's tokens depend on its
own prompt only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Share of the free memory the KV cache may take: prefill activations, logits and the allocator's slack need room.
KV_SHARE = 0.8


def kv_bytes_per_token(model: Any) -> int | None:
    """Bytes of keys and values one token holds across all layers (None when the config does not say)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (layers and heads and hidden):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    dtype = next(model.parameters()).dtype
    return int(layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8)


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: the GPU's as CUDA reports it, the host's available memory for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rows_that_fit(model: Any, tokens_per_row: int, wanted: int, free_bytes: int | None) -> int:
    """``wanted`` rows, or fewer (at least one) when their caches of ``tokens_per_row`` would not fit."""
    per_token = kv_bytes_per_token(model)
    if not per_token or free_bytes is None or tokens_per_row <= 0:
        return wanted
    fit = max(1, int(KV_SHARE * free_bytes // (per_token * tokens_per_row)))
    if fit < wanted:
        logger.warning("generation: %d rows of %d tokens fit %.1f GiB free (%d asked): running %d at a time",
                       fit, tokens_per_row, free_bytes / 2**30, wanted, fit)
    return min(wanted, fit)
