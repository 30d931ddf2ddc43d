"""The decode loop of continuous batching: which rows are in the batch at each step.

``generate`` keeps computing a finished row until the batch's longest row ends, and answers of very different
lengths make that a large share of all row-steps. Here a row that is finished (EOS, one of its own stop strings,
its own ``max_new_tokens``) leaves the batch at once, and a waiting prompt takes its place at the next step, so
the batch stays full until the last rows. Stop strings are checked on the decoded *completion* only (not the
prompt's tail, which transformers' ``StopStringCriteria`` would include), per row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mft_bench.evaluation.backends.hf.forward import PREFILL_ROWS
from mft_bench.evaluation.backends.hf.kv_cache import (
    admit, buffer_layers, compaction, drop_dead_columns, mergeable, without_first_rows,
)
from mft_bench.evaluation.backends.hf.sampling import Sampler, next_tokens
from mft_bench.evaluation.backends.kv_budget import free_memory_bytes, rows_that_fit
from mft_bench.evaluation.base import GenerationRequest

if TYPE_CHECKING:
    from mft_bench.evaluation.backends.hf.engine import HFBackend

Finished = list[tuple[int, list[int]]]  # (row, its generated tokens) for each row finished since the last yield


@dataclass
class Rows:
    """Rows held in one KV cache, in batch order: the running batch, or prefilled rows waiting to join it."""

    cache: Any
    mask: torch.Tensor  # attention mask over the cache's columns
    last: torch.Tensor  # each row's last position
    ids: list[int]  # the row (sequence number) at each batch position
    tokens: list[int]  # each row's last chosen token: its input at the next step
    alive: list[bool]  # False: finished, kept only in a cache that cannot drop rows

    def select(self, keep: list[int], device: torch.device) -> Rows:
        """Only the batch positions ``keep``, in that order (the cache changes in place)."""
        index = torch.tensor(keep, device=device)
        self.cache.batch_select_indices(index)
        return Rows(self.cache, self.mask[index], self.last[index], [self.ids[j] for j in keep],
                    [self.tokens[j] for j in keep], [True] * len(keep))

    def without_first(self, count: int) -> Rows:
        """These rows but the first ``count`` (the cache keeps views of the rest)."""
        return Rows(without_first_rows(self.cache, count), self.mask[count:], self.last[count:], self.ids[count:],
                    self.tokens[count:], self.alive[count:])


class DecodeLoop:
    """Token-by-token decoding of ``prompts`` over one KV cache, at most ``backend.batch_size`` rows at a time,
    in row order (``prompts`` come longest first).

    A finished row leaves the batch at once and a waiting row takes its place at the next step: pending prompts
    are prefilled a group (``PREFILL_ROWS``) at a time as soon as a row is free, and the group's rows wait,
    prefilled (``staged``), for free rows (``kv_cache.admit`` writes them into the cache's spare rows: only they
    are copied). A row's tokens depend only on its own prompt (and seed): every row has its own positions, mask
    and generator. A cache that cannot be merged or pruned (not a plain ``DynamicCache``) keeps finished rows,
    ignored, and takes new rows only once its whole batch is finished.
    """

    def __init__(self, backend: HFBackend, prompts: list[list[int]], requests: list[GenerationRequest],
                 sampler: Sampler | None, prefix: tuple[Any, int] | None):
        self.backend = backend
        self.model_forward = backend.model_forward
        self.prompts = prompts
        self.requests = requests
        self.sampler = sampler
        self.prefix = prefix
        self.shared = prefix[1] if prefix is not None else 0  # prefix columns every row starts with
        self.eos = set(backend.eos_ids)
        self.stops = [r.stop for r in requests]
        # tokens decoded to look for a stop string: more than the longest one can take
        self.window = 4 * max((len(s) for row in self.stops for s in row), default=0) + 8
        self.generated: list[list[int]] = [[] for _ in requests]
        self.finished: list[int] = []  # rows finished since the last yield
        self.pending = list(range(len(requests)))  # already longest prompt first
        self.pending.reverse()  # pop() from the end
        self.batch: Rows | None = None  # the rows being decoded (None: no cache)
        self.staged: Rows | None = None  # prefilled rows waiting for free batch rows
        self.mergeable = False  # whether the cache can drop and take rows (decided by the first prefill)
        self.device = torch.device("cpu")
        self.batch_rows = 0  # most rows decoded together (the KV budget may allow fewer than batch_size)
        self.capacity = 0  # cache rows to allocate (a short call needs fewer)

    def run(self) -> Iterator[Finished]:
        """Decode everything, yielding the rows finished since the last yield (only ever between two steps)."""
        self._size_batch()
        while True:
            self._fill()
            if self.finished:
                yield [(row, self.generated[row]) for row in self.finished]
                self.finished.clear()
            if self.batch is None:
                return
            self._step()

    def _size_batch(self) -> None:
        backend = self.backend
        self.device = self.model_forward.device
        longest = max(len(p) for p in self.prompts) + max(r.max_new_tokens for r in self.requests)
        free_bytes = backend.memory_bytes if backend.memory_bytes is not None else free_memory_bytes(self.device)
        self.batch_rows = rows_that_fit(self.model_forward.model, longest, backend.batch_size, free_bytes)
        self.capacity = min(self.batch_rows, len(self.requests))

    def _free_rows(self) -> int:
        return self.batch_rows - (len(self.batch.ids) if self.batch is not None else 0)

    def _fill(self) -> None:
        """Take waiting rows into the batch while it has free rows (a cache that cannot take rows: only once it
        is empty)."""
        while ((self.pending or self.staged is not None) and self._free_rows() > 0
               and (self.batch is None or self.mergeable)):
            if self.staged is None:
                rows = self._prefill_pending()
                if not self.mergeable:  # a fresh batch (the cache was empty); finished rows stay, ignored
                    self.batch = rows if any(rows.alive) else None
                    continue
                keep = [j for j, alive in enumerate(rows.alive) if alive]
                if not keep:
                    continue
                self.staged = rows if len(keep) == len(rows.ids) else rows.select(keep, self.device)
            self._admit_staged()

    def _prefill_pending(self) -> Rows:
        """Prefill the next pending prompts and choose their first tokens: what fits a fresh batch, or for a running
        one a group ahead. The first prefill into an empty batch decides whether its cache is ``mergeable``."""
        free = self._free_rows()
        fresh = self.batch is None
        count = min(len(self.pending), free if fresh else max(free, min(PREFILL_ROWS, self.batch_rows)))
        ids = [self.pending.pop() for _ in range(count)]
        room = max(self.requests[r].max_new_tokens for r in ids) if fresh else 0  # columns decoding will add
        cache, mask, last, logits = self.model_forward.prefill(
            [self.prompts[r] for r in ids], self.prefix, room, self.capacity)
        tokens = next_tokens(logits, ids, self.sampler)
        done = self._record(ids, tokens, [True] * len(ids))
        if fresh:
            self.mergeable = mergeable(cache)
        return Rows(cache, mask, last, ids, tokens, [not d for d in done])

    def _admit_staged(self) -> None:
        """Move as many staged rows into the batch as it has free rows."""
        staged = self.staged
        take = min(self._free_rows(), len(staged.ids))
        batch = self.batch
        if batch is None:  # (then everything staged fits: at most a batch is staged)
            buffer_layers(staged.cache, max(self.requests[r].max_new_tokens for r in staged.ids), self.capacity)
            self.batch = Rows(staged.cache, staged.mask, staged.last, staged.ids[:take], staged.tokens[:take],
                              [True] * take)
        else:
            cache, mask = admit(batch.cache, batch.mask, staged.cache, staged.mask, take, self.shared, self.capacity)
            self.batch = Rows(cache, mask, torch.cat([batch.last, staged.last[:take]]), batch.ids + staged.ids[:take],
                              batch.tokens + staged.tokens[:take], batch.alive + [True] * take)
        self.staged = None if take == len(staged.ids) else staged.without_first(take)

    def _step(self) -> None:
        """One decode step over the batch; finished rows leave it (or, in a cache that cannot drop them, are
        marked not alive)."""
        batch = self.batch
        self.backend.peak_rows = max(self.backend.peak_rows, len(batch.ids))
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=-1)
        batch.last = batch.last + 1
        logits = self.model_forward.step(batch.tokens, batch.mask, batch.last, batch.cache)
        batch.tokens = next_tokens(logits, batch.ids, self.sampler)
        done = self._record(batch.ids, batch.tokens, batch.alive)
        if not any(done):
            return
        if self.mergeable:
            keep = compaction(done)
            if not keep:
                self.batch = None
                return
            batch = batch.select(keep, self.device)
            batch.cache, batch.mask = drop_dead_columns(batch.cache, batch.mask, self.shared)
            self.batch = batch
        else:
            batch.alive = [a and not d for a, d in zip(batch.alive, done)]
            if not any(batch.alive):
                self.batch = None

    def _record(self, rows: list[int], tokens: list[int], live: list[bool]) -> list[bool]:
        """Record each live row's token; return which rows are finished now (also added to ``finished``)."""
        done = [False] * len(rows)
        check = []
        for j, (row, token) in enumerate(zip(rows, tokens)):
            if not live[j]:
                continue
            self.generated[row].append(token)
            if token in self.eos or len(self.generated[row]) >= self.requests[row].max_new_tokens:
                done[j] = True
                self.finished.append(row)
            elif self.stops[row]:
                check.append(j)
        if check:
            tails = self.backend.tokenizer.batch_decode([self.generated[rows[j]][-self.window:] for j in check],
                                                        skip_special_tokens=True)
            for j, tail in zip(check, tails):
                if any(s and s in tail for s in self.stops[rows[j]]):
                    done[j] = True
                    self.finished.append(rows[j])
        return done
