"""Every place the hf backend relies on transformers internals rather than its public API.

Tested on transformers 5.24 (``pyproject.toml`` bounds it below 5.25); a newer version must pass
``tests/evaluation/test_backends.py`` before the bound moves. What is relied on:

- the KV cache's per-layer objects: ``DynamicLayer`` (``kv_cache.BufferedLayer`` subclasses it, overriding
  ``update`` and ``batch_select_indices``, and reads/writes its ``keys``, ``values`` and ``is_initialized``),
  and a layer of a cache the model already holds turned into a ``BufferedLayer`` by swapping its class
  (``make_layer``), so the model keeps the same cache object;
- the attention routing: a function registered with ``AttentionInterface`` (and ``sdpa_mask`` with
  ``AttentionMaskInterface``) and ``config._attn_implementation`` pointed at it for the duration
  (``attention_routed``), falling back to transformers' own ``sdpa_attention_forward``;
- the forward's cache argument and output key (``cache`` in transformers 5, ``past_key_values`` in models
  written for earlier versions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from transformers.cache_utils import DynamicLayer

__all__ = ["DynamicLayer", "attention_routed", "cache_argument", "cache_of", "is_layered_cache", "make_layer",
           "sdpa_attention_forward"]


def make_layer(layer: Any, cls: type) -> None:
    """Turn the cache layer ``layer`` into a ``cls`` (a ``DynamicLayer`` subclass adding storage only) in place."""
    layer.__class__ = cls


def is_layered_cache(cache: Any, layer_types: tuple[type, ...]) -> bool:
    """Whether ``cache`` is made of initialized per-layer objects, each exactly one of ``layer_types``, and can
    select rows (``batch_select_indices``)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and hasattr(cache, "batch_select_indices") and all(
        type(layer) in layer_types and getattr(layer, "is_initialized", False) for layer in layers)


def cache_argument(forward_parameters: set[str]) -> str:
    """The name a model's forward takes its KV cache under."""
    return "cache" if "cache" in forward_parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache of a forward's output."""
    return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


@contextlib.contextmanager
def attention_routed(model: Any, name: str, attention: Callable[..., Any]) -> Iterator[bool]:
    """Run ``model``'s attention through ``attention`` (registered as ``name``) for the duration, when the model
    runs on transformers' sdpa; yields whether it does (others keep their own attention)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    config._attn_implementation = name
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"


def sdpa_attention_forward(*args: Any, **kwargs: Any) -> Any:
    """transformers' own sdpa attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as forward

    return forward(*args, **kwargs)
