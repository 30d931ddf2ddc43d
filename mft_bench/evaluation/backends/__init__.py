"""Generation backends: turn ``GenerationRequest``s into completions.

Every backend implements ``generate(requests) -> list[list[str]]``: for each request, in the order given, its
``n`` completions, without the prompt, each cut before the first of the request's stop strings. One that can
also give results as they finish implements ``generate_stream(requests)``, yielding ``(request index,
completions)`` in finishing order; the evaluation runner then passes it all of a benchmark's items at once
(else chunks of a few batches to ``generate``).

- ``hf``: in-process transformers model (``HFBackend``), batched, left-padded, length-sorted; streams.
- ``vllm``: vLLM on an exported dense checkpoint folder (``VLLMBackend``), optional dependency, CUDA only; fed
  the same prompt token ids as ``hf`` (``token_ids``).
"""

from __future__ import annotations

from typing import Any, Protocol

from mft_bench.errors import MftBenchError
from mft_bench.evaluation.base import GenerationRequest, truncate_at_stop

BACKEND_NAMES = ("hf", "vllm")


class Backend(Protocol):
    """Anything that completes generation requests."""

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """``n`` completions per request, in request order, stop strings applied, prompt excluded."""
        ...


def make_backend(
    name: str,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_path: str | None = None,
    batch_size: int = 32,
    seed: int = 0,
    dtype: str | None = None,
    max_length: int | None = None,
) -> Backend:
    """Build the backend ``name``; heavy imports happen only for the backend chosen.

    ``max_length``: the context both backends cut prompts to (``max_length - max_new_tokens`` prompt tokens) and
    vLLM's ``max_model_len``. ``dtype``: the dtype vLLM runs the checkpoint in (the hf backend runs ``model`` as
    it is). A backend with a ``close()`` holds resources until it is called."""
    if name == "hf":
        from mft_bench.evaluation.backends.hf import HFBackend

        if model is None or tokenizer is None:
            raise MftBenchError("backend 'hf' needs a model and a tokenizer (or a model_path to load them from)")
        return HFBackend(model, tokenizer, batch_size=batch_size, seed=seed, max_length=max_length)
    if name == "vllm":
        from mft_bench.evaluation.backends.vllm import VLLMBackend

        if not model_path:
            raise MftBenchError(
                "backend 'vllm' needs model_path: the exported dense checkpoint folder (it cannot take an in-memory model)"
            )
        return VLLMBackend(model_path, dtype=dtype, max_length=max_length, tokenizer=tokenizer, seed=seed)
    raise MftBenchError(f"unknown backend '{name}'; choose one of {', '.join(BACKEND_NAMES)}")


__all__ = ["BACKEND_NAMES", "Backend", "make_backend", "truncate_at_stop"]
