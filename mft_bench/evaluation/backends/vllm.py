"""Generation with vLLM on an exported dense checkpoint folder (optional dependency, CUDA GPU only).

MFT's dense export (weights with the mask's zeros applied, safetensors, the model's dtype) is a plain
transformers checkpoint, so vLLM serves it unchanged. Sampling is seeded per request (``seed + index`` would
depend on chunking, so the seed is derived from the prompt instead), which keeps resumed runs reproducible as
far as vLLM itself is deterministic (it is batch-dependent in the last bits on GPU).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.evaluation.backends import truncate_at_stop
from mft_bench.evaluation.base import GenerationRequest

logger = logging.getLogger(__name__)

UNAVAILABLE = (
    "backend 'vllm' needs the vllm package and a CUDA GPU: pip install 'mft-bench[vllm]' on a GPU machine, "
    "or use backend: hf"
)


def _import_vllm() -> Any:
    """The vllm module, or ``MftBenchError`` when vllm or a CUDA GPU is missing."""
    try:
        vllm = importlib.import_module("vllm")
    except ImportError as exc:
        raise MftBenchError(UNAVAILABLE) from exc
    import torch

    if not torch.cuda.is_available():
        raise MftBenchError(UNAVAILABLE)
    return vllm


def request_seed(seed: int, prompt: str) -> int:
    """Per-request sampling seed: a function of the run seed and the prompt only (not of its batch position)."""
    digest = hashlib.sha256(f"{seed}|{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class VLLMBackend:
    """``generate(requests)`` through ``vllm.LLM`` (see module docstring)."""

    def __init__(
        self,
        model_path: str,
        tokenizer_path: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.85,
    ):
        self._vllm = _import_vllm()
        self.seed = seed
        self.llm = self._vllm.LLM(
            model=str(model_path),
            tokenizer=str(tokenizer_path or model_path),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
        )

    def _prompt_text(self, request: GenerationRequest) -> str:
        if not request.chat:
            return request.prompt
        return self.llm.get_tokenizer().apply_chat_template(
            [{"role": "user", "content": request.prompt}], tokenize=False, add_generation_prompt=True
        )

    def _params(self, request: GenerationRequest) -> Any:
        greedy = request.temperature <= 0
        return self._vllm.SamplingParams(
            n=request.n,
            temperature=0.0 if greedy else request.temperature,
            top_p=1.0 if greedy else request.top_p,
            max_tokens=request.max_new_tokens,
            stop=list(request.stop) or None,
            seed=request_seed(self.seed, request.prompt),
        )

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """``n`` completions per request, in request order, stop strings applied, prompt excluded."""
        if not requests:
            return []
        prompts = [self._prompt_text(r) for r in requests]
        params = [self._params(r) for r in requests]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        # vLLM returns results in input order; stop strings are already excluded, truncating again is a no-op
        # that keeps the contract identical to the hf backend's.
        return [
            [truncate_at_stop(c.text, r.stop) for c in res.outputs]
            for r, res in zip(requests, results)
        ]
