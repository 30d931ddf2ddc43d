"""The attention the model runs while generating: transformers' sdpa, computed where the keys/values are.

transformers' sdpa copies each key/value head once per query head it serves (versions before ``pack_gqa`` do
when a mask is given); a decode step instead groups the query heads by their key/value head. And the prompts of
a group often share a long prefix (few-shot exemplars): a decode step then reads that prefix's keys/values once
for the whole batch, not once per row, which is most of a decode step's memory traffic otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from mft_bench.evaluation.backends.hf.transformers_internals import attention_routed, sdpa_attention_forward

GENERATION_ATTENTION = "mft_bench_generation_sdpa"
# Cache columns holding the same prompt prefix in every row, while ``generation_attention_in_force`` runs.
shared_columns: contextvars.ContextVar[int] = contextvars.ContextVar("mft_bench_shared_columns", default=0)
_NOT_SUPPORTED = ("position_bias", "softcap", "sliding_window", "s_aux", "sinks")


def generation_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, computed on the key/value heads as they are where transformers would first
    copy them once per query head (versions before ``pack_gqa`` do when a mask is given; without a mask its
    ``enable_gqa`` call is slower on CPU than the grouping below):

    - a decode step (one query token, inference) takes each key/value head's group of query heads as one block
      of queries over that head: with a mask, bitwise what transformers computes where it groups them the same
      way itself (``pack_gqa``); older versions' copies, and the ``enable_gqa`` call, give the same up to
      floating-point summation order;
    - over a cache whose first ``P`` columns (``shared_columns``) hold the same prompt prefix in every row, a
      decode step reads those keys/values once, from row 0, in one matmul over all rows' queries, joined with
      each row's own columns in one softmax (the same attention up to floating-point summation order), and a
      prefill of the prompts' own tokens runs sdpa with ``enable_gqa``."""
    ours = not (module.training or dropout or any(kwargs.get(name) is not None for name in _NOT_SUPPORTED)
                or (attention_mask is not None and attention_mask.shape[1] != 1))  # (per-head masks)
    shared = shared_columns.get()
    prefix = 0 < shared < key.shape[2]
    if ours and query.shape[2] == 1:
        if prefix:
            return _shared_prefix_decode(query, key, value, attention_mask, scaling, shared), None
        batch, heads, _, dim = query.shape
        grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)  # query head h: kv head h // group
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None
    if ours and prefix and attention_mask is not None and attention_mask.dtype == torch.bool:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _shared_prefix_decode(query, key, value, attention_mask, scaling, shared: int) -> torch.Tensor:
    """A decode step's attention (``generation_attention``) when the first ``shared`` cache columns are the same
    in every row: (batch, 1, heads, dim)."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads  # query heads per key/value head (grouped-query attention)
    q = query.reshape(batch, kv_heads, group, dim)
    q_by_head = q.transpose(0, 1).reshape(kv_heads, batch * group, dim)
    shared_scores = torch.matmul(q_by_head, key[0, :, :shared].transpose(-1, -2))
    shared_scores = shared_scores.view(kv_heads, batch, group, shared).transpose(0, 1)
    own_scores = torch.matmul(q, key[:, :, shared:].transpose(-1, -2))
    scale = dim ** -0.5 if scaling is None else scaling
    shared_scores, own_scores = shared_scores * scale, own_scores.mul_(scale)
    if attention_mask is not None:  # every row attends to the prefix: only its own columns can be masked
        own_mask = attention_mask[:, :, -1:, shared:]  # (batch, 1, 1, own columns)
        if own_mask.dtype == torch.bool:
            own_scores.masked_fill_(~own_mask, float("-inf"))
        else:
            own_scores.add_(own_mask)
    scores = torch.cat([shared_scores, own_scores], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    shared_probs = probs[..., :shared].transpose(0, 1).reshape(kv_heads, batch * group, shared)
    out = torch.matmul(shared_probs, value[0, :, :shared]).view(kv_heads, batch, group, dim).transpose(0, 1)
    out = out + torch.matmul(probs[..., shared:], value[:, :, shared:])
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous()


@contextlib.contextmanager
def generation_attention_in_force(model: Any, shared: int) -> Iterator[None]:
    """Route the model's attention through ``generation_attention`` for the duration, with ``shared`` prefix
    columns, when it runs on transformers' sdpa (others keep their own; a shared prefix is then still computed
    only once)."""
    with attention_routed(model, GENERATION_ATTENTION, generation_attention) as routed:
        if not routed:
            yield
            return
        token = shared_columns.set(shared)
        try:
            yield
        finally:
            shared_columns.reset(token)
