"""In-process generation with a transformers model: batched, left-padded, length-sorted.

Why each choice:
- Requests are grouped by sampling settings and sorted by prompt length (longest first, so an out-of-memory
  shows early); results are put back in the caller's order.
- Left padding with an attention mask, position ids derived from the mask (as ``generate`` does), so a padded
  row sees the same positions as the same prompt alone.
- Our own token loop over the KV cache instead of ``generate`` (continuous batching): a row that is finished
  (EOS, its stop string, its own ``max_new_tokens``) leaves the batch at once, where ``generate`` keeps
  computing it until the batch's longest row ends (for GSM8K-style answers about half of all row-steps), and
  a waiting prompt takes its place at the next step, so the batch stays full until the last rows: pending
  prompts are prefilled a group ahead, and each row, once a batch row is free, is written into a spare row of
  the running cache (left-padded to its width), so admitting rows copies only them (merging whole caches
  copied 1.25 GB per admission for 8-shot GSM8K, whose rows each hold the ~740-token exemplar block). The
  cache's keys/values live in preallocated buffers, so a step writes one column instead of re-copying the
  cache; columns left behind by finished rows are dropped in place once they are a quarter of the rest. Greedy
  outputs equal ``model.generate``'s (tested). A cache other than a plain ``DynamicCache`` falls back to fixed
  batches.
- Greedy results do not depend on the batch size, up to floating-point reduction order (a padded row runs a
  longer, zero-weighted key range and other matmul shapes; on CPU fp32 this has not changed an argmax in our
  tests, but a near-tie between two logits could in principle flip).
- Sampling does not use torch's global RNG (whose stream is shared by all rows of a batch, so a completion
  would depend on its batch mates). Each sequence gets its own generator seeded from (seed, prompt, sample
  index) and samples by the Gumbel-max trick: argmax(logits / T + Gumbel noise) is a draw from
  softmax(logits / T) (after top-p filtering). A completion is then a function of its prompt and the seed
  only: reproducible across batch sizes, chunks and resumed runs.
- ``generate_stream`` yields each request's completions as soon as it is finished: the evaluation runner passes
  all of a benchmark's items in one call and writes each record as it comes, so the batch stays full until the
  last items, where one ``generate`` call per chunk of items drained the batch at the end of every chunk.
  Between two results the caller's code runs with none of the generation's settings below in force (inference
  mode, packed weights, attention routing): they are entered anew each time the stream resumes (~2 ms).
- On CPU, while generating (``_cpu_decode_matmuls``), decode steps of 4 rows or more multiply by copies of the
  float32 linear weights packed by MKL for 8, 16 and the batch size rows (a step padded with zero rows to the
  packed size); the weights themselves are not touched, and the output projection's few-row product is
  ``(W @ x^T)^T``, which MKL runs 1.2-1.75x faster (measured on SmolLM2-135M shapes; ``benchmarks/README.md``).
  The backend keeps the packed copies between calls and between a stream's results, and packs a weight again
  only when it has changed: packing all of SmolLM2-135M's weights for three row counts costs ~1-2 s.
- Prompts that start with the same tokens (few-shot exemplars: GSM8K's 8-shot block is ~900 tokens, shared by
  every item) have that prefix computed once per call (and sampling group); each prefill copies its
  keys/values and runs only the prompts' own tokens (``shared_prefix_length``, at least ``MIN_SHARED_PREFIX``
  tokens). Positions and masks are those of the whole prompt, so the result is the same computation (up to
  floating-point reduction order).
  Decode steps then read that prefix's keys/values once for the whole batch instead of once per row
  (``generation_attention``): for 8-shot GSM8K at batch 32 the per-row copies were ~30x the prefix and most
  of a decode step's memory traffic.
- Stop strings are checked on the decoded *completion* only (not the prompt's tail, which transformers'
  ``StopStringCriteria`` would include), per row, so each row stops as soon as one of its own stops appears.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TopPLogitsWarper

from mft_bench.evaluation.backends import truncate_at_stop
from mft_bench.evaluation.backends.kv_budget import free_memory_bytes, rows_that_fit
from mft_bench.evaluation.backends.token_ids import eos_token_ids, prompt_token_ids
from mft_bench.evaluation.base import GenerationRequest

MIN_SHARED_PREFIX = 32  # tokens; a shorter common prefix is not worth a separate forward pass
PREFILL_ROWS = 8  # prompts per prefill forward pass

try:  # transformers >= 4.56: caches made of per-layer objects
    from transformers.cache_utils import DynamicLayer
except ImportError:  # older: no row merging, finished rows stay in the batch
    DynamicLayer = None

if DynamicLayer is not None:

    class _BufferedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values are views ``[:rows, :, :columns]`` of preallocated buffers with room
        to grow: a decode step writes one column in place instead of re-copying the whole cache (``torch.cat``)
        as ``DynamicLayer.update`` does, and rows admitted into a running batch are written into spare rows
        (``_admit``). Values are the same; only the storage differs."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            rows, used, extra = self.keys.shape[0], self.keys.shape[-2], key_states.shape[-2]
            if used + extra > self.key_buffer.shape[-2]:
                _allocate(self, used + extra + max(extra, 64))
            self.key_buffer[:rows, :, used:used + extra] = key_states
            self.value_buffer[:rows, :, used:used + extra] = value_states
            self.keys = self.key_buffer[:rows, :, :used + extra]
            self.values = self.value_buffer[:rows, :, :used + extra]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """New row ``j`` is old row ``indices[j]``, in place: only rows that change places are copied (with
            the order ``_compaction`` gives, one per finished row); the rows after them become spare."""
            used, rows = self.keys.shape[-2], len(indices)
            moved = torch.nonzero(indices != torch.arange(rows, device=indices.device)).squeeze(1)
            if len(moved):
                for buffer in (self.key_buffer[:, :, :used], self.value_buffer[:, :, :used]):  # (not the spare)
                    buffer.index_copy_(0, moved, buffer.index_select(0, indices[moved]))  # read all, then write
            self.keys, self.values = self.key_buffer[:rows, :, :used], self.value_buffer[:rows, :, :used]

    def _allocate(layer: Any, capacity: int, rows: int = 0) -> None:
        """(Re)place ``layer``'s keys/values in buffers of ``capacity`` columns and at least ``rows`` rows (at least
        as many as it has now, spare ones included)."""
        used = layer.keys.shape[-2]
        rows = max(rows, layer.keys.shape[0], len(getattr(layer, "key_buffer", ())))
        shape = (rows, layer.keys.shape[1], capacity, layer.keys.shape[-1])
        count = layer.keys.shape[0]
        key_buffer, value_buffer = layer.keys.new_empty(shape), layer.values.new_empty(shape)
        key_buffer[:count, :, :used] = layer.keys
        value_buffer[:count, :, :used] = layer.values
        layer.key_buffer, layer.value_buffer = key_buffer, value_buffer
        layer.keys, layer.values = key_buffer[:count, :, :used], value_buffer[:count, :, :used]


@dataclass(frozen=True)
class _Encoded:
    """One request, tokenized."""

    index: int  # position in the caller's list
    request: GenerationRequest
    ids: list[int]


def row_seed(seed: int, prompt_ids: list[int], sample_index: int) -> int:
    """Seed of one sampled sequence: a function of the run seed, the prompt tokens and the sample number."""
    digest = hashlib.sha256(f"{seed}|{sample_index}|{','.join(map(str, prompt_ids))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Sampler:
    """Temperature, top-p, then per-row seeded Gumbel noise, so that argmax is a sample (Gumbel-max trick).

    Each row draws from its own ``torch.Generator``, one draw per decoding step, so its noise sequence does not
    depend on which other rows share the batch (or were dropped from it).
    """

    def __init__(self, temperature: float, top_p: float, seeds: list[int]):
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        scores = logits / self.temperature
        if self.top_p is not None:
            scores = self.top_p(None, scores)
        # -inf (top-p filtered) stays -inf, so a filtered token is never picked.
        return scores.double().cpu() + gumbel_noise([self.generators[int(r)] for r in rows], scores.shape[-1])


def gumbel_noise(generators: list[torch.Generator], vocab: int) -> torch.Tensor:
    """One row of standard Gumbel noise per generator (float64; u kept off 0 and 1 so the double log is finite)."""
    uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in generators])
    return -torch.log(-torch.log(uniform.clamp_(1e-12, 1.0 - 1e-12)))


class HFBackend:
    """Generate with an in-memory transformers causal LM (see module docstring for the design)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, seed: int = 0, max_length: int | None = None,
                 memory_bytes: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.memory_bytes = memory_bytes  # for the KV cache; None: the device's free memory when a group starts
        self.peak_rows = 0  # most rows decoded together so far (the KV budget may allow fewer than batch_size)
        self.seed = seed
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0] if self.eos_ids else 0
        self._forward_params = set(inspect.signature(model.forward).parameters)
        # transformers 5 renamed the forward argument `past_key_values` to `cache`.
        self._cache_arg = "cache" if "cache" in self._forward_params else "past_key_values"
        # prefill passes want the last position's logits only
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in self._forward_params else {}
        self._packed = PackedWeights()  # decode-step weight copies, kept across calls (see _cpu_decode_matmuls)

    # -- encoding --------------------------------------------------------------------------------------------
    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids: raw text with the tokenizer's special tokens, or the chat template when ``chat``, cut
        to ``max_length`` (``token_ids.prompt_token_ids``, shared with the vLLM backend)."""
        return prompt_token_ids(self.tokenizer, request, self.max_length)

    # -- public ----------------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """``n`` completions per request, in request order (stop strings applied, prompt excluded)."""
        results: list[list[str]] = [[] for _ in requests]
        for index, completions in self.generate_stream(requests):
            results[index] = completions
        return results

    def generate_stream(self, requests: list[GenerationRequest]) -> Iterator[tuple[int, list[str]]]:
        """``(request index, its n completions)`` for each request as soon as it is finished (so in no fixed
        order): a caller with many requests passes them all in one call and still gets each result at once,
        and the batch stays full until the last of them, where one call per chunk drains it at every chunk's
        end (two chunks against one stream: 1.02-1.09x, ``benchmarks/streamed_evaluation.py``).

        Between two results nothing of the generation is in force (inference mode, the packed decode weights,
        the attention routing): each is entered only while the next results are computed."""
        encoded = [_Encoded(i, r, self.encode(r)) for i, r in enumerate(requests)]
        self.model.eval()
        for group in plan_groups(encoded):
            yield from self._generate_group(group)

    # -- one group of requests with the same sampling settings ------------------------------------------------
    def _generate_group(self, group: list[_Encoded]) -> Iterator[tuple[int, list[str]]]:
        first = group[0].request
        sampling = first.temperature > 0
        n_rows = first.n if sampling else 1  # greedy: one sequence, copied n times
        rows = [(enc, k) for enc in group for k in range(n_rows)]
        sampler = None
        if sampling:
            sampler = _Sampler(first.temperature, first.top_p, [row_seed(self.seed, enc.ids, k) for enc, k in rows])
        prompts, requests = [enc.ids for enc, _ in rows], [enc.request for enc, _ in rows]
        with self._generating(0):
            prefix = self._shared_prefix(prompts)
        steps = self._decode_loop(prompts, requests, sampler, prefix)
        texts: dict[int, list[str | None]] = {}  # request position in group -> its rows' completions so far
        while True:
            with self._generating(prefix[1] if prefix is not None else 0):
                finished = next(steps, None)  # (the loop's own state only changes inside this)
            if finished is None:
                return
            for row, tokens in finished:
                enc = rows[row][0]
                done = texts.setdefault(row // n_rows, [None] * n_rows)
                done[row % n_rows] = self._decode(tokens, enc.request)
                if all(text is not None for text in done):
                    del texts[row // n_rows]
                    yield enc.index, list(done) * (1 if sampling else enc.request.n)

    @contextlib.contextmanager
    def _generating(self, shared: int) -> Iterator[None]:
        """What the forward passes of generation run under: inference mode, on CPU the packed decode weights
        (``_cpu_decode_matmuls``), and the attention of ``generation_attention`` with ``shared`` prefix columns."""
        with (torch.inference_mode(), _cpu_decode_matmuls(self.model, self.batch_size, self._packed),
              _generation_attention(self.model, shared)):
            yield

    def _prefill(
        self, prompts: list[list[int]], prefix: tuple[Any, int] | None = None, room: int = 0, rows: int = 0,
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_prefill_padded`` in groups of ``PREFILL_ROWS`` prompts (neighbours in length order), merged into one
        cache (with ``room`` free columns, see ``_concat_rows``): padding is limited to each group's longest prompt
        (for 8-shot GSM8K, where every padded position also attends to the ~740-token prefix, one padded pass over
        32 prompts took twice as long)."""
        first = self._prefill_padded(prompts[:PREFILL_ROWS], prefix)
        if len(prompts) <= PREFILL_ROWS:
            return first
        if not _mergeable(first[0]):  # e.g. sliding-window caches: one padded pass
            return self._prefill_padded(prompts, prefix)
        parts = [first] + [self._prefill_padded(prompts[start:start + PREFILL_ROWS], prefix)
                           for start in range(PREFILL_ROWS, len(prompts), PREFILL_ROWS)]
        cache, mask = _concat_rows([(part[0], part[1]) for part in parts], prefix[1] if prefix is not None else 0,
                                   room, rows)
        return cache, mask, torch.cat([part[2] for part in parts]), torch.cat([part[3] for part in parts])

    def _prefill_padded(
        self, prompts: list[list[int]], prefix: tuple[Any, int] | None = None,
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded forward pass over ``prompts``: (cache, attention mask, last positions, last logits).

        With ``prefix`` (the cache of the first ``n`` tokens every prompt starts with, and ``n``) only the
        prompts' remaining tokens run, over copies of that cache; the mask and positions cover whole prompts."""
        device = _device(self.model)
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
        extra = dict(self._last_logits)
        if shared_cache is not None:
            cache = copy.deepcopy(shared_cache)
            cache.batch_repeat_interleave(len(own))
            extra[self._cache_arg] = cache
        out = self.model(input_ids=input_ids.to(device), attention_mask=_unless_all_ones(mask),
                         position_ids=positions[:, shared:], use_cache=True, **extra)
        return _cache_of(out), mask, positions[:, -1], out.logits[:, -1].float()

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[Any, int] | None:
        """(cache, length) of the prefix all ``prompts`` share, when it is long enough and the cache can be
        copied row-wise; else None."""
        shared = shared_prefix_length(prompts)
        if shared < MIN_SHARED_PREFIX:
            return None
        device = _device(self.model)
        ids = torch.tensor([prompts[0][:shared]], device=device)
        out = self.model(input_ids=ids, position_ids=torch.arange(shared, device=device)[None], use_cache=True,
                         **self._last_logits)
        cache = _cache_of(out)
        return (cache, shared) if _mergeable(cache) else None

    def _decode_loop(
        self, prompts: list[list[int]], requests: list[GenerationRequest], sampler: _Sampler | None,
        prefix: tuple[Any, int] | None,
    ) -> Iterator[list[tuple[int, list[int]]]]:
        """Token-by-token decoding over one KV cache, at most ``batch_size`` rows at a time, in row order,
        yielding the rows finished since the last yield as ``(row, its tokens)`` (only ever between two steps).

        A finished row leaves the batch at once and a waiting row takes its place at the next step, so the batch
        stays full until the last rows: pending prompts are prefilled a group (``PREFILL_ROWS``) at a time as
        soon as a row is free, and the group's rows wait, prefilled, for free rows (``_admit`` writes them into
        the cache's spare rows: only they are copied). A row's tokens depend only on its own prompt (and seed):
        every row has its own positions, mask and generator.
        A cache that cannot be merged or pruned (not a plain ``DynamicCache``) keeps finished rows, ignored,
        and takes new rows only once its whole batch is finished.
        """
        device = _device(self.model)
        eos = set(self.eos_ids)
        stops = [r.stop for r in requests]
        window = 4 * max((len(s) for row in stops for s in row), default=0) + 8
        generated: list[list[int]] = [[] for _ in requests]
        finished: list[int] = []  # rows finished since the last yield
        pending = list(range(len(requests)))  # already longest prompt first
        pending.reverse()  # pop() from the end
        cache: Any = None
        mergeable = False
        active: list[int] = []  # row of each batch position
        alive: list[bool] = []  # False: finished, kept only in a cache that cannot drop rows
        mask = last = None
        next_tokens: list[int] = []
        shared = prefix[1] if prefix is not None else 0

        def pick(logits: torch.Tensor, batch_rows: list[int]) -> list[int]:
            scores = sampler(logits, torch.tensor(batch_rows)) if sampler is not None else logits
            return scores.argmax(-1).tolist()

        def accept(batch_rows: list[int], toks: list[int], live: list[bool]) -> list[bool]:
            """Record each live row's token; return which rows are finished now."""
            done = [False] * len(batch_rows)
            check = []
            for j, (row, tok) in enumerate(zip(batch_rows, toks)):
                if not live[j]:
                    continue
                generated[row].append(tok)
                if tok in eos or len(generated[row]) >= requests[row].max_new_tokens:
                    done[j] = True
                    finished.append(row)
                elif stops[row]:
                    check.append(j)
            if check:
                tails = self.tokenizer.batch_decode([generated[batch_rows[j]][-window:] for j in check],
                                                    skip_special_tokens=True)
                for j, tail in zip(check, tails):
                    if any(s and s in tail for s in stops[batch_rows[j]]):
                        done[j] = True
                        finished.append(batch_rows[j])
            return done

        staged = None  # prefilled rows waiting for free batch rows: (cache, mask, last, rows, tokens)
        longest = max(len(p) for p in prompts) + max(r.max_new_tokens for r in requests)
        free_bytes = self.memory_bytes if self.memory_bytes is not None else free_memory_bytes(device)
        batch_rows = rows_that_fit(self.model, longest, self.batch_size, free_bytes)
        capacity = min(batch_rows, len(requests))  # cache rows to allocate (a short call needs fewer)
        while True:
            while (pending or staged is not None) and len(active) < batch_rows and (cache is None or mergeable):
                free = batch_rows - len(active)
                if staged is None:  # prefill: a fresh batch what fits, a running one a group ahead
                    count = min(len(pending), free if cache is None else max(free, min(PREFILL_ROWS, batch_rows)))
                    new_rows = [pending.pop() for _ in range(count)]
                    room = max(requests[r].max_new_tokens for r in active + new_rows)  # columns decoding will add
                    new_cache, new_mask, new_last, logits = self._prefill(
                        [prompts[r] for r in new_rows], prefix, room if cache is None else 0, capacity)
                    new_tokens = pick(logits, new_rows)
                    done = accept(new_rows, new_tokens, [True] * len(new_rows))
                    if cache is None:
                        mergeable = _mergeable(new_cache)
                    if not mergeable:  # a fresh batch (the cache was empty); finished rows stay, ignored
                        cache, mask, last = new_cache, new_mask, new_last
                        active, next_tokens, alive = new_rows, new_tokens, [not d for d in done]
                        if not any(alive):
                            cache, active, alive, next_tokens = None, [], [], []
                        continue
                    keep = [j for j, d in enumerate(done) if not d]
                    if not keep:
                        continue
                    if len(keep) < len(new_rows):
                        new_cache, new_mask, new_last = _select(new_cache, new_mask, new_last, keep, device)
                    staged = (new_cache, new_mask, new_last, [new_rows[j] for j in keep], [new_tokens[j] for j in keep])
                new_cache, new_mask, new_last, new_rows, new_tokens = staged
                take = min(free, len(new_rows))
                if cache is None:  # (then everything staged fits: at most a batch is staged)
                    cache, mask, last = new_cache, new_mask, new_last
                    _buffer(cache, max(requests[r].max_new_tokens for r in new_rows), capacity)
                else:
                    cache, mask = _admit(cache, mask, new_cache, new_mask, take, shared, capacity)
                    last = torch.cat([last, new_last[:take]])
                active, next_tokens = active + new_rows[:take], next_tokens + new_tokens[:take]
                alive = alive + [True] * take
                staged = None if take == len(new_rows) else (
                    _without_first_rows(new_cache, take), new_mask[take:], new_last[take:], new_rows[take:],
                    new_tokens[take:])
            if finished:
                yield [(row, generated[row]) for row in finished]
                finished.clear()
            if not active:
                return
            self.peak_rows = max(self.peak_rows, len(active))
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            last = last + 1
            out = self.model(input_ids=torch.tensor(next_tokens, device=device)[:, None],
                             attention_mask=_unless_all_ones(mask), position_ids=last[:, None], use_cache=True,
                             **{self._cache_arg: cache})
            next_tokens = pick(out.logits[:, -1].float(), active)
            done = accept(active, next_tokens, alive)
            if not any(done):
                continue
            if mergeable:
                keep = _compaction(done)
                active, next_tokens = [active[j] for j in keep], [next_tokens[j] for j in keep]
                alive = [True] * len(keep)
                if keep:
                    cache, mask, last = _select(cache, mask, last, keep, device)
                    cache, mask = _drop_dead_columns(cache, mask, shared)
                else:
                    cache = None
            else:
                alive = [a and not d for a, d in zip(alive, done)]
                if not any(alive):
                    cache, active, alive = None, [], []

    def _decode(self, tokens: list[int], request: GenerationRequest) -> str:
        tokens = tokens[: request.max_new_tokens]
        eos = set(self.eos_ids)
        for i, t in enumerate(tokens):
            if t in eos:
                tokens = tokens[:i]
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return truncate_at_stop(text, request.stop)


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Leading tokens common to all ``prompts`` (two or more), leaving each at least one token of its own (a
    prompt's next-token logits come from its last token)."""
    if len(prompts) < 2:
        return 0
    return min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)


def plan_groups(encoded: list[_Encoded]) -> list[list[_Encoded]]:
    """Group requests by sampling settings, each group sorted longest prompt first (ties: request order)."""
    groups: dict[tuple[float, float, int], list[_Encoded]] = {}
    for enc in encoded:
        r = enc.request
        key = (0.0, 1.0, 1) if r.temperature <= 0 else (float(r.temperature), float(r.top_p), int(r.n))
        groups.setdefault(key, []).append(enc)
    return [sorted(groups[key], key=lambda e: (-len(e.ids), e.index)) for key in sorted(groups)]


GENERATION_ATTENTION = "mft_bench_generation_sdpa"
_shared_columns: contextvars.ContextVar[int] = contextvars.ContextVar("mft_bench_shared_columns", default=0)
_NOT_SUPPORTED = ("position_bias", "softcap", "sliding_window", "s_aux", "sinks")


def generation_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, computed on the key/value heads as they are where transformers would first
    copy them once per query head (versions before ``pack_gqa`` do when a mask is given; without a mask its
    ``enable_gqa`` call measured 1.4-1.6x slower on CPU than the grouping below, SmolLM2-135M shapes):

    - a decode step (one query token, inference) takes each key/value head's group of query heads as one block
      of queries over that head: with a mask, bitwise what transformers computes where it groups them the same
      way itself (``pack_gqa``, 5.2x); older versions' copies, and the ``enable_gqa`` call, give the same up to
      floating-point summation order;
    - over a cache whose first ``P`` columns (``_shared_columns``) hold the same prompt prefix in every row, a
      decode step reads those keys/values once, from row 0, in one matmul over all rows' queries, joined with
      each row's own columns in one softmax (the same attention up to floating-point summation order), and a
      prefill of the prompts' own tokens runs sdpa with ``enable_gqa``."""
    ours = not (module.training or dropout or any(kwargs.get(name) is not None for name in _NOT_SUPPORTED)
                or (attention_mask is not None and attention_mask.shape[1] != 1))  # (per-head masks)
    shared = _shared_columns.get()
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
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

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
def _generation_attention(model: Any, shared: int) -> Iterator[None]:
    """Route the model's attention through ``generation_attention`` for the duration, with ``shared`` prefix
    columns, when it runs on transformers' sdpa (others keep their own; a shared prefix is then still computed
    only once)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GENERATION_ATTENTION, generation_attention)
    AttentionMaskInterface.register(GENERATION_ATTENTION, sdpa_mask)
    token = _shared_columns.set(shared)
    config._attn_implementation = GENERATION_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
        _shared_columns.reset(token)


@contextlib.contextmanager
def _cpu_decode_matmuls(model: Any, batch_rows: int, store: PackedWeights) -> Iterator[None]:
    """On CPU, make the few-row matmuls of decoding faster for the duration, restoring the model on exit.

    Each float32 ``nn.Linear`` (the output projection included) gets copies of its weight packed by MKL for
    products of 8, 16 and ``batch_rows`` rows (``torch.ops.mkl._mkl_linear``), taken from ``store`` when it
    holds them for the weight as it is now; a decode step is padded with zero rows to the smallest packed size
    that holds it (``_packed_product``). Measured on SmolLM2-135M's decoder linears with weights streaming from
    memory: 32 rows 102 vs 139-194 ms unpacked, 12-16 rows padded to 16 ~89 vs 110-150 ms, 4-8 rows padded to 8
    ~70 vs 92-135 ms. Fewer rows, and prefill, take the plain product on the weights as they are: for 1-3 rows
    the fastest layout, for prefill's hundreds of rows within ~5% of a packed one. The output projection's plain
    product is ``(W @ x^T)^T``, 1.2-1.75x faster at few rows."""
    if _device(model).type != "cpu":
        store.keep_only([])  # a model moved off the CPU: its packed CPU copies are of no use
        yield
        return
    head = None
    with contextlib.suppress(AttributeError, NotImplementedError):
        head = model.get_output_embeddings()
    # (A module with its own instance ``forward``, e.g. an accelerate hook, is left alone.)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
               and m.weight.is_contiguous() and "forward" not in m.__dict__]
    sizes = tuple(sorted({rows for rows in PACKED_ROWS if rows < batch_rows} | {batch_rows}))
    if (batch_rows < MIN_PACKED_ROWS or not _mkl_packing_available()
            or sum(m.weight.numel() for m in linears) * 4 * len(sizes) > MAX_PACKED_BYTES):
        sizes = ()
    store.keep_only(linears)
    for module in linears:
        packed = store.get(module, sizes)
        if module is head or packed:
            module.forward = _packed_forward(module, packed, _transposed_product if module is head else _plain_product)
    try:
        yield
    finally:
        for module in linears:
            module.__dict__.pop("forward", None)


class PackedWeights:
    """MKL-packed copies of linear weights by module, each valid while its weight is the same tensor with the
    same storage and version counter (an in-place change bumps the version; a replaced ``.data`` moves the
    storage), so a later ``generate`` call reuses them and a changed weight is packed again."""

    def __init__(self) -> None:
        self._entries: dict[torch.nn.Module, tuple[tuple[Any, ...], dict[int, torch.Tensor]]] = {}

    def get(self, linear: torch.nn.Linear, sizes: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Packed copies of ``linear.weight`` for each row count in ``sizes`` (``{}`` for none)."""
        if not sizes:
            self._entries.pop(linear, None)
            return {}
        weight = linear.weight
        key = (id(weight), weight.data_ptr(), weight._version, sizes)
        entry = self._entries.get(linear)
        if entry is None or entry[0] != key:
            entry = (key, {rows: _pack(weight.detach(), rows) for rows in sizes})
            self._entries[linear] = entry
        return entry[1]

    def keep_only(self, linears: list[torch.nn.Linear]) -> None:
        """Forget the copies of modules not in ``linears`` (no longer float32 linears, say)."""
        wanted = set(linears)
        for module in [m for m in self._entries if m not in wanted]:
            del self._entries[module]


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


PACKED_ROWS = (8, 16)  # packed sizes below the batch size (which is packed too), for the last rows of a call
MIN_PACKED_ROWS = 4  # fewer rows: their plain product is cheaper than a padded packed one
MAX_PACKED_BYTES = 2 << 30  # packed copies live beside the weights as long as the backend


def _mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _packed_product(x: torch.Tensor, linear: torch.nn.Linear, packed: dict[int, torch.Tensor]):
    """``linear(x)`` through the smallest packed weight whose row count holds ``x``'s rows (padded with zero
    rows to it: a packing is for one row count), or None when none fits or ``x`` has too few rows. It runs ~200
    times a decode step: few tensor operations, none for a full batch's rows."""
    n = x.numel() // x.shape[-1]
    size = min((size for size in packed if size >= n), default=None)
    if size is None or n < MIN_PACKED_ROWS:
        return None
    rows = x.reshape(n, x.shape[-1])
    if n < size:
        rows = torch.cat([rows, rows.new_zeros(size - n, rows.shape[1])])
    out = torch.ops.mkl._mkl_linear(rows.contiguous(), packed[size], linear.weight, linear.bias, size)
    return (out[:n] if n < size else out).view(*x.shape[:-1], out.shape[-1])


def _packed_forward(linear: torch.nn.Linear, packed: dict[int, torch.Tensor], plain):
    """``linear``'s forward during generation: through ``packed`` when ``_packed_product`` takes the rows, else
    ``plain(linear, x)``."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = _packed_product(x, linear, packed)
        return out if out is not None else plain(linear, x)

    return forward


def _plain_product(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, linear.weight, linear.bias)


def _transposed_product(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` as ``(W @ x^T)^T``: faster for the output projection at few rows."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(linear.weight, rows.t().contiguous()).t().contiguous()  # argmax over strided rows is 3x slower
    if linear.bias is not None:
        out = out + linear.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _cache_of(out: Any) -> Any:
    """The KV cache of a forward's output (transformers 5 names it ``cache``, earlier ``past_key_values``)."""
    return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


def _mergeable(cache: Any) -> bool:
    """Whether rows can be dropped from and added to ``cache``: a plain ``DynamicCache`` (tensors per layer)."""
    layers = getattr(cache, "layers", None)
    return DynamicLayer is not None and bool(layers) and hasattr(cache, "batch_select_indices") and all(
        type(layer) in (DynamicLayer, _BufferedLayer) and getattr(layer, "is_initialized", False) for layer in layers)


def _buffer(cache: Any, room: int, rows: int = 0) -> None:
    """Give every layer of ``cache`` preallocated room for ``room`` more columns and ``rows`` rows in all (see
    ``_BufferedLayer``), unless it has that room already."""
    for layer in cache.layers:
        if (type(layer) is _BufferedLayer and layer.key_buffer.shape[-2] >= layer.keys.shape[-2] + room
                and len(layer.key_buffer) >= rows):
            continue
        layer.__class__ = _BufferedLayer
        _allocate(layer, layer.keys.shape[-2] + room, rows)


def _compaction(done: list[bool]) -> list[int]:
    """Batch positions of the rows not ``done``, in their new order: each finished row's place among the first
    ones is taken by a kept row from the end, so only those rows move (see ``_BufferedLayer``)."""
    kept = len(done) - sum(done)
    order = list(range(kept))
    holes = (j for j in range(kept) if done[j])
    for hole, row in zip(holes, (j for j in range(kept, len(done)) if not done[j])):
        order[hole] = row
    return order


def _select(cache: Any, mask: torch.Tensor, last: torch.Tensor, keep: list[int], device: torch.device):
    """Keep the batch rows ``keep`` (cache, mask, last positions)."""
    index = torch.tensor(keep, device=device)
    cache.batch_select_indices(index)
    return cache, mask[index], last[index]


def _admit(
    cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor, count: int, shared: int, rows: int,
) -> tuple[Any, torch.Tensor]:
    """Append the first ``count`` rows of ``new_cache`` to the buffered ``cache`` (which gets at least ``rows``
    rows of buffer), written into its spare buffer rows and padded after the ``shared`` prefix columns to its
    width, so a running batch takes new rows by copying only them. Rows wider than the cache first widen it
    (the one case that copies the cache)."""
    width = max(mask.shape[1], new_mask.shape[1])
    if width > mask.shape[1]:
        mask = _pad_at(mask, width, shared)
        for layer in cache.layers:
            spare = max(layer.key_buffer.shape[-2] - layer.keys.shape[-2], 64)
            for name in ("key", "value"):
                merged = _stack_rows([getattr(layer, name + "s")], width, shared, spare, len(layer.key_buffer))
                setattr(layer, name + "_buffer", merged)
                setattr(layer, name + "s", merged[:len(mask), :, :width])
    _buffer(cache, 0, max(rows, len(mask) + count))
    used = len(mask)
    for layer, new_layer in zip(cache.layers, new_cache.layers):
        for name in ("key", "value"):
            buffer = getattr(layer, name + "_buffer")
            _place(buffer[used:used + count], getattr(new_layer, name + "s")[:count], width, shared)
            setattr(layer, name + "s", buffer[:used + count, :, :width])
    return cache, torch.cat([mask, _pad_at(new_mask[:count], width, shared)])


def _without_first_rows(cache: Any, count: int) -> Any:
    """``cache`` without its first ``count`` rows (views of the rest)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[count:], layer.values[count:]
    return cache


def _drop_dead_columns(cache: Any, mask: torch.Tensor, shared: int) -> tuple[Any, torch.Tensor]:
    """``cache`` without the columns no row attends to (left behind by finished rows) once they are a quarter of
    the columns after the ``shared`` prefix, in place: the live columns after the prefix move left in their
    buffers (the prefix columns, attended by every row, stay where they are)."""
    live = torch.nonzero(mask.bool().any(0)).squeeze(1)
    dead = mask.shape[1] - len(live)
    if not dead or dead * 4 < mask.shape[1] - shared:
        return cache, mask
    own = live[shared:]  # (every row attends to the prefix columns: they are live[:shared])
    width = shared + len(own)
    for layer in cache.layers:
        for name in ("key", "value"):
            buffer = getattr(layer, name + "_buffer")
            buffer[:len(mask), :, shared:width] = getattr(layer, name + "s").index_select(-2, own)
            setattr(layer, name + "s", buffer[:len(mask), :, :width])
    return cache, mask[:, live]


def _concat_rows(
    parts: list[tuple[Any, torch.Tensor]], shared: int = 0, room: int = 0, rows: int = 0,
) -> tuple[Any, torch.Tensor]:
    """One cache (the first part's object) holding the rows of all ``parts`` in order, each padded to the widest
    right after its ``shared`` prefix columns (so those stay the same columns in every row), without the columns
    no row attends to (so the cache does not keep growing as rows come and go). With ``room``, its layers are
    ``_BufferedLayer``s with that many free columns (and at least ``rows`` rows). Each part is copied once, by
    slices, into its rows of the merged tensor (a second copy only when columns are dropped): for 8-shot GSM8K's
    32 prompts with their ~740 shared columns, concatenating padded copies and then buffering them took 3.3 s of
    a 39 s call."""
    width = max(part_mask.shape[1] for _, part_mask in parts)
    mask = torch.cat([_pad_at(part_mask, width, shared) for _, part_mask in parts])
    attended = mask.any(0)
    columns = None if bool(attended.all()) else torch.nonzero(attended).squeeze(1)
    if columns is not None:
        mask = mask[:, columns]
    cache = parts[0][0]
    for index, layer in enumerate(cache.layers):
        for name in ("key", "value"):
            tensors = [getattr(part.layers[index], name + "s") for part, _ in parts]
            if columns is None:
                merged = _stack_rows(tensors, width, shared, room, rows if room else 0)
                if room:
                    setattr(layer, name + "_buffer", merged)
                setattr(layer, name + "s", merged[:len(mask), :, :width])
            else:
                setattr(layer, name + "s", _stack_rows(tensors, width, shared).index_select(-2, columns))
        if room:
            layer.__class__ = _BufferedLayer
            if columns is not None:
                _allocate(layer, layer.keys.shape[-2] + room, rows)
    return cache, mask


def _stack_rows(tensors: list[torch.Tensor], width: int, shared: int, room: int = 0, rows: int = 0) -> torch.Tensor:
    """The rows of ``tensors`` (batch, heads, columns, dim) in one tensor of ``width + room`` columns and at least
    ``rows`` rows, each padded with zeros right after its first ``shared`` columns to ``width`` (``_place``); the
    ``room`` columns and spare rows are left unwritten."""
    first = tensors[0]
    total = sum(len(t) for t in tensors)
    out = first.new_empty((max(total, rows), first.shape[1], width + room, first.shape[-1]))
    row = 0
    for t in tensors:
        _place(out[row:row + len(t)], t, width, shared)
        row += len(t)
    return out


def _place(target: torch.Tensor, t: torch.Tensor, width: int, shared: int) -> None:
    """Write ``t`` into ``target``'s first ``width`` columns, padded with zeros right after its first ``shared``
    columns (zeros: padded columns are masked, but a masked value must be finite)."""
    pad = width - t.shape[-2]
    target[:, :, :shared] = t[:, :, :shared]
    target[:, :, shared:shared + pad] = 0
    target[:, :, shared + pad:width] = t[:, :, shared:]


def _pad_at(t: torch.Tensor, width: int, at: int, dim: int = -1) -> torch.Tensor:
    """``t`` widened to ``width`` along ``dim`` by zeros inserted before index ``at``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.narrow(dim, 0, at), t.new_zeros(shape), t.narrow(dim, at, t.shape[dim] - at)], dim=dim)


def _unless_all_ones(mask: torch.Tensor) -> torch.Tensor | None:
    # No padding: no mask, so attention takes its plain causal path (as `generate` does); same result, faster.
    return None if bool(mask.all()) else mask


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
