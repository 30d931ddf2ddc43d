"""The model's forward passes while generating: the shared prompt prefix, prefill, and one decode step.

Rows are left-padded with an attention mask, and positions are derived from the mask (as ``generate`` does), so a
padded row sees the same positions as the same prompt alone. Prompts that start with the same tokens (few-shot
exemplars shared by every item) have that prefix computed once (``prefix``); each prefill then copies its
keys/values and runs only the prompts' own tokens, with the positions and mask of the whole prompt: the same
computation up to floating-point reduction order. Prefill runs in groups of ``PREFILL_ROWS`` neighbours in
length order, merged into one cache, so padding is limited to each group's longest prompt (every padded
position would also attend to the whole shared prefix).
"""

from __future__ import annotations

import copy
import inspect
import os
from typing import Any

import torch

from mft_bench.evaluation.backends.hf.kv_cache import concat_rows, mergeable
from mft_bench.evaluation.backends.hf.transformers_internals import cache_argument, cache_of

MIN_SHARED_PREFIX = 32  # tokens; a shorter common prefix is not worth a separate forward pass
PREFILL_ROWS = 8  # prompts per prefill forward pass

# What a prefill returns: (cache, attention mask, each row's last position, each row's last logits).
Prefilled = tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]


class ModelForward:
    """The forward passes of generation with ``model``, whose padding token is ``pad_id``."""

    def __init__(self, model: Any, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        parameters = set(inspect.signature(model.forward).parameters)
        self.cache_arg = cache_argument(parameters)
        # prefill passes want the last position's logits only
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def shared_prefix(self, prompts: list[list[int]]) -> tuple[Any, int] | None:
        """(cache, length) of the prefix all ``prompts`` share, when it is long enough and the cache can be
        copied row-wise; else None."""
        shared = shared_prefix_length(prompts)
        if shared < MIN_SHARED_PREFIX:
            return None
        device = self.device
        ids = torch.tensor([prompts[0][:shared]], device=device)
        out = self.model(input_ids=ids, position_ids=torch.arange(shared, device=device)[None], use_cache=True,
                         **self.last_logits)
        cache = cache_of(out)
        return (cache, shared) if mergeable(cache) else None

    def prefill(
        self, prompts: list[list[int]], prefix: tuple[Any, int] | None = None, room: int = 0, rows: int = 0,
    ) -> Prefilled:
        """``prefill_padded`` in groups of ``PREFILL_ROWS`` prompts (neighbours in length order), merged into one
        cache (with ``room`` free columns and ``rows`` rows, see ``kv_cache.concat_rows``)."""
        first = self.prefill_padded(prompts[:PREFILL_ROWS], prefix)
        if len(prompts) <= PREFILL_ROWS:
            return first
        if not mergeable(first[0]):  # e.g. sliding-window caches: one padded pass
            return self.prefill_padded(prompts, prefix)
        parts = [first] + [self.prefill_padded(prompts[start:start + PREFILL_ROWS], prefix)
                           for start in range(PREFILL_ROWS, len(prompts), PREFILL_ROWS)]
        cache, mask = concat_rows([(part[0], part[1]) for part in parts], prefix[1] if prefix is not None else 0,
                                  room, rows)
        return cache, mask, torch.cat([part[2] for part in parts]), torch.cat([part[3] for part in parts])

    def prefill_padded(self, prompts: list[list[int]], prefix: tuple[Any, int] | None = None) -> Prefilled:
        """Left-padded forward pass over ``prompts``: (cache, attention mask, last positions, last logits).

        With ``prefix`` (the cache of the first ``n`` tokens every prompt starts with, and ``n``) only the
        prompts' remaining tokens run, over copies of that cache; the mask and positions cover whole prompts."""
        device = self.device
        shared_cache, shared = prefix if prefix is not None else (None, 0)
        own = [ids[shared:] for ids in prompts]
        width = max(len(ids) for ids in own)
        input_ids = torch.full((len(own), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(own), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for r, ids in enumerate(own):
            if ids:
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                mask[r, shared + width - len(ids):] = 1
        mask = mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = dict(self.last_logits)
        if shared_cache is not None:
            cache = copy.deepcopy(shared_cache)
            cache.batch_repeat_interleave(len(own))
            extra[self.cache_arg] = cache
        out = self.model(input_ids=input_ids.to(device), attention_mask=_unless_all_ones(mask),
                         position_ids=positions[:, shared:], use_cache=True, **extra)
        return cache_of(out), mask, positions[:, -1], out.logits[:, -1].float()

    def step(self, tokens: list[int], mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """One decode step: each row's token ``tokens[j]`` at ``positions[j]`` over ``cache`` (which grows by a
        column; ``mask`` covers it); the rows' next-token logits (float32)."""
        out = self.model(input_ids=torch.tensor(tokens, device=self.device)[:, None],
                         attention_mask=_unless_all_ones(mask), position_ids=positions[:, None], use_cache=True,
                         **{self.cache_arg: cache})
        return out.logits[:, -1].float()


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Leading tokens common to all ``prompts`` (two or more), leaving each at least one token of its own (a
    prompt's next-token logits come from its last token)."""
    if len(prompts) < 2:
        return 0
    return min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _unless_all_ones(mask: torch.Tensor) -> torch.Tensor | None:
    # No padding: no mask, so attention takes its plain causal path (as `generate` does); same result, faster.
    return None if bool(mask.all()) else mask
