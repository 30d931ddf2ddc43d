"""In-process generation with a transformers model: batched, left-padded, length-sorted.

Why each choice:
- Requests are sorted by prompt length (longest first, so an out-of-memory shows in the first batch) and
  batched, which keeps padding small; results are put back in the caller's order.
- Left padding with an attention mask, position ids derived from the mask (as ``generate`` does), so a padded
  row sees the same positions as the same prompt alone.
- Our own token loop over the KV cache instead of ``generate``: a row that is finished (EOS, its stop string,
  its own ``max_new_tokens``) is dropped from the batch at once (``Cache.batch_select_indices``), where
  ``generate`` keeps computing it until the batch's longest row ends; for GSM8K-style answers that is about
  half of all row-steps. Greedy outputs equal ``model.generate``'s (tested).
- Greedy results do not depend on the batch size, up to floating-point reduction order (a padded row runs a
  longer, zero-weighted key range and other matmul shapes; on CPU fp32 this has not changed an argmax in our
  tests, but a near-tie between two logits could in principle flip).
- Sampling does not use torch's global RNG (whose stream is shared by all rows of a batch, so a completion
  would depend on its batch mates). Each sequence gets its own generator seeded from (seed, prompt, sample
  index) and samples by the Gumbel-max trick: argmax(logits / T + Gumbel noise) is a draw from
  softmax(logits / T) (after top-p filtering). A completion is then a function of its prompt and the seed
  only: reproducible across batch sizes, chunks and resumed runs.
- Stop strings are checked on the decoded *completion* only (not the prompt's tail, which transformers'
  ``StopStringCriteria`` would include), per row, so each row stops as soon as one of its own stops appears.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TopPLogitsWarper

from mft_bench.evaluation.backends import truncate_at_stop
from mft_bench.evaluation.base import GenerationRequest

logger = logging.getLogger(__name__)


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

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, seed: int = 0, max_length: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0] if self.eos_ids else 0
        self._forward_params = set(inspect.signature(model.forward).parameters)
        # transformers 5 renamed the forward argument `past_key_values` to `cache`.
        self._cache_arg = "cache" if "cache" in self._forward_params else "past_key_values"

    # -- encoding --------------------------------------------------------------------------------------------
    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids: raw text with the tokenizer's special tokens, or the chat template when ``chat``."""
        if request.chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": request.prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            # add_special_tokens=True matches what vLLM does with a text prompt (BOS for LLaMA-style tokenizers).
            ids = self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        if self.max_length is not None:
            keep = self.max_length - request.max_new_tokens
            if keep < 1:
                raise ValueError(f"max_length {self.max_length} leaves no room for the prompt")
            if len(ids) > keep:
                logger.warning("prompt of %d tokens cut to its last %d (max_length %d)", len(ids), keep, self.max_length)
                ids = ids[-keep:]
        return list(ids)

    # -- public ----------------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """``n`` completions per request, in request order (stop strings applied, prompt excluded)."""
        encoded = [_Encoded(i, r, self.encode(r)) for i, r in enumerate(requests)]
        results: list[list[str] | None] = [None] * len(requests)
        for batch in plan_batches(encoded, self.batch_size):
            for enc, outs in zip(batch, self._generate_batch(batch)):
                results[enc.index] = outs
        return [r if r is not None else [] for r in results]

    # -- one batch -------------------------------------------------------------------------------------------
    def _generate_batch(self, batch: list[_Encoded]) -> list[list[str]]:
        first = batch[0].request
        sampling = first.temperature > 0
        n_rows = first.n if sampling else 1  # greedy: one sequence, copied n times
        rows = [(enc, k) for enc in batch for k in range(n_rows)]
        width = max(len(enc.ids) for enc in batch)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (enc, _) in enumerate(rows):
            if enc.ids:
                input_ids[r, width - len(enc.ids):] = torch.tensor(enc.ids)
                attention_mask[r, width - len(enc.ids):] = 1
        sampler = None
        if sampling:
            sampler = _Sampler(first.temperature, first.top_p, [row_seed(self.seed, enc.ids, k) for enc, k in rows])
        self.model.eval()
        with torch.inference_mode():
            tokens = self._decode_rows(input_ids, attention_mask, [enc.request for enc, _ in rows], sampler)
        completions = [self._decode(tokens[r], enc.request) for r, (enc, _) in enumerate(rows)]
        grouped = [completions[i * n_rows:(i + 1) * n_rows] for i in range(len(batch))]
        if not sampling:
            grouped = [g * enc.request.n for g, enc in zip(grouped, batch)]
        return grouped

    def _decode_rows(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, requests: list[GenerationRequest],
        sampler: _Sampler | None,
    ) -> list[list[int]]:
        """Token-by-token decoding over the KV cache; each row leaves the batch as soon as it is finished."""
        model, device = self.model, _device(self.model)
        eos = torch.tensor(self.eos_ids or [-1])
        max_new = torch.tensor([r.max_new_tokens for r in requests])
        stops = [r.stop for r in requests]
        window = 4 * max((len(s) for row in stops for s in row), default=0) + 8
        generated: list[list[int]] = [[] for _ in requests]
        active = torch.arange(len(requests))  # original row of each row still in the batch
        mask = attention_mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._accepts("logits_to_keep") else {}  # prefill: last logits only
        out = model(input_ids=input_ids.to(device), attention_mask=_unless_all_ones(mask), position_ids=positions,
                    use_cache=True, **extra)
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        last = positions[:, -1]
        # Rows stay in the batch while alive; a cache that cannot drop rows keeps finished ones, ignored.
        alive = torch.ones(len(requests), dtype=torch.bool)
        prunable = hasattr(cache, "batch_select_indices")
        while True:
            logits = out.logits[:, -1].float()
            scores = sampler(logits, active) if sampler is not None else logits
            next_tokens = scores.argmax(-1).cpu()
            for j, row in enumerate(active.tolist()):
                if alive[j]:
                    generated[row].append(int(next_tokens[j]))
            finished = torch.isin(next_tokens, eos)
            finished |= torch.tensor([len(generated[row]) for row in active.tolist()]) >= max_new[active]
            finished &= alive
            self._mark_stops(finished, active, generated, stops, window, alive)
            alive &= ~finished
            if not bool(alive.any()):
                return generated
            if prunable and not bool(alive.all()):
                keep = alive.nonzero().squeeze(-1)
                cache.batch_select_indices(keep.to(device))
                active, next_tokens, alive = active[keep], next_tokens[keep], alive[keep]
                mask, last = mask[keep.to(device)], last[keep.to(device)]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            last = last + 1
            out = model(input_ids=next_tokens[:, None].to(device), attention_mask=_unless_all_ones(mask),
                        position_ids=last[:, None], use_cache=True, **{self._cache_arg: cache})

    def _mark_stops(
        self, finished: torch.Tensor, active: torch.Tensor, generated: list[list[int]],
        stops: list[tuple[str, ...]], window: int, alive: torch.Tensor,
    ) -> None:
        """Set ``finished`` for rows whose completion now contains one of their stop strings.

        Only the completion is searched. A stop ending in the newest token lies within the last ``window``
        tokens: a token decodes to at least one character except partial UTF-8 bytes, hence the margin.
        """
        check = [j for j, row in enumerate(active.tolist()) if stops[row] and alive[j] and not finished[j]]
        if not check:
            return
        rows = [int(active[j]) for j in check]
        tails = self.tokenizer.batch_decode([generated[r][-window:] for r in rows], skip_special_tokens=True)
        for j, row, tail in zip(check, rows, tails):
            if any(s and s in tail for s in stops[row]):
                finished[j] = True

    def _accepts(self, name: str) -> bool:
        return name in self._forward_params

    def _decode(self, tokens: list[int], request: GenerationRequest) -> str:
        tokens = tokens[: request.max_new_tokens]
        eos = set(self.eos_ids)
        for i, t in enumerate(tokens):
            if t in eos:
                tokens = tokens[:i]
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return truncate_at_stop(text, request.stop)


def plan_batches(encoded: list[_Encoded], batch_size: int) -> list[list[_Encoded]]:
    """Group requests by sampling settings, sort each group longest prompt first, cut into batches.

    ``batch_size`` counts sequences: a request sampled ``n`` times takes ``n`` of them.
    """
    groups: dict[tuple[float, float, int], list[_Encoded]] = {}
    for enc in encoded:
        r = enc.request
        key = (0.0, 1.0, 1) if r.temperature <= 0 else (float(r.temperature), float(r.top_p), int(r.n))
        groups.setdefault(key, []).append(enc)
    batches: list[list[_Encoded]] = []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda e: (-len(e.ids), e.index))
        per_batch = max(1, batch_size // key[2])
        batches.extend(members[i:i + per_batch] for i in range(0, len(members), per_batch))
    return batches


def _unless_all_ones(mask: torch.Tensor) -> torch.Tensor | None:
    # No padding: no mask, so attention takes its plain causal path (as `generate` does); same result, faster.
    return None if bool(mask.all()) else mask


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
