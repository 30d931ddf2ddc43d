"""``HFBackend``: generation with an in-memory transformers causal LM, streamed as requests finish.

Requests are grouped by sampling settings and sorted by prompt length (longest first, so an out-of-memory shows
early); each group is decoded by one ``DecodeLoop`` (continuous batching), and each request's completions are
yielded as soon as its last row is finished. Greedy outputs equal ``model.generate``'s (tested) and do not
depend on the batch size, up to floating-point reduction order (a padded row runs a longer, zero-weighted key
range and other matmul shapes; on CPU fp32 this has not changed an argmax in our tests, but a near-tie between
two logits could in principle flip). Sampled outputs depend on their prompt and the seed only (``sampling``).

What the forward passes run under (inference mode, on CPU the packed decode weights, the attention routing) is
in force only while the next results are computed: between two results the caller's code runs without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mft_bench.evaluation.base import truncate_at_stop
from mft_bench.evaluation.backends.hf.attention import generation_attention_in_force
from mft_bench.evaluation.backends.hf.cpu_matmul import PackedWeights, cpu_decode_matmuls
from mft_bench.evaluation.backends.hf.forward import ModelForward
from mft_bench.evaluation.backends.hf.sampling import Sampler, row_seed
from mft_bench.evaluation.backends.hf.scheduler import DecodeLoop
from mft_bench.evaluation.backends.token_ids import eos_token_ids, prompt_token_ids
from mft_bench.evaluation.base import GenerationRequest


@dataclass(frozen=True)
class _Encoded:
    """One request, tokenized."""

    index: int  # position in the caller's list
    request: GenerationRequest
    ids: list[int]


class HFBackend:
    """Generate with an in-memory transformers causal LM (see the module docstring)."""

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
        self.model_forward = ModelForward(model, self.pad_id)
        self._packed = PackedWeights()  # decode-step weight copies, kept across calls (see cpu_decode_matmuls)

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids: raw text with the tokenizer's special tokens, or the chat template when ``chat``, cut
        to ``max_length`` (``token_ids.prompt_token_ids``, shared with the vLLM backend)."""
        return prompt_token_ids(self.tokenizer, request, self.max_length)

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """``n`` completions per request, in request order (stop strings applied, prompt excluded)."""
        results: list[list[str]] = [[] for _ in requests]
        for index, completions in self.generate_stream(requests):
            results[index] = completions
        return results

    def generate_stream(self, requests: list[GenerationRequest]) -> Iterator[tuple[int, list[str]]]:
        """``(request index, its n completions)`` for each request as soon as it is finished (so in no fixed
        order): a caller with many requests passes them all in one call and still gets each result at once,
        and the batch stays full until the last of them, where one call per chunk would drain it at every
        chunk's end (``benchmarks/streamed_evaluation.py``).

        Between two results nothing of the generation is in force (inference mode, the packed decode weights,
        the attention routing): each is entered only while the next results are computed."""
        encoded = [_Encoded(i, r, self.encode(r)) for i, r in enumerate(requests)]
        self.model.eval()
        for group in plan_groups(encoded):
            yield from self._generate_group(group)

    def _generate_group(self, group: list[_Encoded]) -> Iterator[tuple[int, list[str]]]:
        """One group of requests with the same sampling settings."""
        first = group[0].request
        sampling = first.temperature > 0
        n_rows = first.n if sampling else 1  # greedy: one sequence, copied n times
        rows = [(enc, k) for enc in group for k in range(n_rows)]
        sampler = None
        if sampling:
            sampler = Sampler(first.temperature, first.top_p, [row_seed(self.seed, enc.ids, k) for enc, k in rows])
        prompts, requests = [enc.ids for enc, _ in rows], [enc.request for enc, _ in rows]
        with self._generating(0):
            prefix = self.model_forward.shared_prefix(prompts)
        steps = DecodeLoop(self, prompts, requests, sampler, prefix).run()
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
        (``cpu_decode_matmuls``), and the attention of ``generation_attention`` with ``shared`` prefix columns."""
        with (torch.inference_mode(),
              cpu_decode_matmuls(self.model, self.model_forward.device, self.batch_size, self._packed),
              generation_attention_in_force(self.model, shared)):
            yield

    def _decode(self, tokens: list[int], request: GenerationRequest) -> str:
        tokens = tokens[: request.max_new_tokens]
        eos = set(self.eos_ids)
        for i, t in enumerate(tokens):
            if t in eos:
                tokens = tokens[:i]
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return truncate_at_stop(text, request.stop)


def plan_groups(encoded: list[_Encoded]) -> list[list[_Encoded]]:
    """Group requests by sampling settings, each group sorted longest prompt first (ties: request order)."""
    groups: dict[tuple[float, float, int], list[_Encoded]] = {}
    for enc in encoded:
        r = enc.request
        key = (0.0, 1.0, 1) if r.temperature <= 0 else (float(r.temperature), float(r.top_p), int(r.n))
        groups.setdefault(key, []).append(enc)
    return [sorted(groups[key], key=lambda e: (-len(e.ids), e.index)) for key in sorted(groups)]
