"""Generation with vLLM on an exported dense checkpoint folder (optional dependency, CUDA GPU only).

MFT's dense export (weights with the mask's zeros applied, safetensors, the model's dtype) is a plain
transformers checkpoint, so vLLM serves it unchanged. What keeps its completions comparable with the hf
backend's:

- Prompts go in as token ids (``TokensPrompt``), built by ``token_ids.prompt_token_ids`` from the same
  tokenizer files as the hf side (the folder's): vLLM tokenizing text itself would add a BOS in front of a chat
  template that writes its own (two BOS with Llama-3's), and would not cut a long prompt. vLLM's tokenizer (the
  folder's too) only turns the completions back into text.
- The dtype is the recipe's, always passed: vLLM's ``"auto"`` reads ``config.json``, which runs an fp32
  checkpoint in fp16 and LLaMA-2's baseline (its config says fp16) in fp16 beside bf16 exported arms.
- ``max_model_len`` is ``max_length``, the context the prompts are cut to (``max_length - max_new_tokens``).
- Generation stops at the ids the hf backend stops at (generation config's EOS, then the tokenizer's) and at the
  request's stop strings; a greedy request is decoded once and copied ``n`` times, as the hf backend does.
- Sampling is seeded per request from the run seed and the prompt's token ids (``seed + index`` would depend on
  chunking), which keeps resumed runs reproducible as far as vLLM itself is deterministic (it is
  batch-dependent in the last bits on GPU).

An engine holds most of the GPU until ``close()`` (or the end of a ``with`` block) tears it down. Where training
ran in the same process, an evaluation stage is better run in a fresh process (``evaluation.worker``): the engine
then starts after training gave the GPU back, and everything is released when the process exits.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import logging
from pathlib import Path
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.evaluation.backends.token_ids import eos_token_ids, prompt_token_ids
from mft_bench.evaluation.base import GenerationRequest, truncate_at_stop

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
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


def _tokens_prompt_type() -> Any:
    """``vllm.inputs.TokensPrompt``; it is a TypedDict, so a plain dict where a release moved it."""
    try:
        return importlib.import_module("vllm.inputs").TokensPrompt
    except (ImportError, AttributeError):
        return dict


def request_seed(seed: int, prompt_ids: list[int]) -> int:
    """Per-request sampling seed: a function of the run seed and the prompt's token ids only (not of its batch
    position)."""
    digest = hashlib.sha256(f"{seed}|{','.join(map(str, prompt_ids))}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _generation_config(folder: str) -> Any:
    """The generation config the hf side's model would carry: the folder's ``generation_config.json``, else the
    one transformers derives from ``config.json``; None when neither can be read."""
    from transformers import AutoConfig, GenerationConfig

    try:
        if (Path(folder) / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(folder)
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder))
    except (OSError, ValueError) as exc:
        logger.warning("%s: no generation config (%s); stopping at the tokenizer's EOS only", folder, exc)
        return None


class VLLMBackend:
    """``generate(requests)`` through ``vllm.LLM`` (see module docstring); ``close()`` releases the engine."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str,
        max_length: int | None = None,
        tokenizer: Any = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.85,
    ):
        if dtype not in DTYPES:
            raise MftBenchError(
                f"backend 'vllm' needs the model dtype, one of {', '.join(DTYPES)} (the recipe's backbone.dtype); "
                f"got {dtype!r}"
            )
        self._vllm = _import_vllm()
        self.model_path = str(model_path)
        # The hf side's tokenizer: the object it was given, else the folder's files loaded as it loads them.
        if tokenizer is None:
            from mft_bench.backbone import load_tokenizer

            tokenizer = load_tokenizer(self.model_path)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.seed = seed
        self.stop_ids = eos_token_ids(tokenizer, _generation_config(self.model_path))
        options: dict[str, Any] = dict(
            model=self.model_path, tokenizer=self.model_path, dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        if max_length is not None:
            options["max_model_len"] = max_length
        self._tokens_prompt = _tokens_prompt_type()
        self.llm: Any = self._vllm.LLM(**options)

    def encode(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids, exactly as the hf backend builds them (``token_ids.prompt_token_ids``)."""
        return prompt_token_ids(self.tokenizer, request, self.max_length)

    def _params(self, request: GenerationRequest, ids: list[int]) -> Any:
        greedy = request.temperature <= 0
        return self._vllm.SamplingParams(
            n=1 if greedy else request.n,
            temperature=0.0 if greedy else request.temperature,
            top_p=1.0 if greedy else request.top_p,
            max_tokens=request.max_new_tokens,
            stop=list(request.stop) or None,
            stop_token_ids=list(self.stop_ids),
            seed=request_seed(self.seed, ids),
        )

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """``n`` completions per request, in request order, stop strings applied, prompt excluded."""
        if self.llm is None:
            raise RuntimeError("VLLMBackend.generate after close()")
        if not requests:
            return []
        ids = [self.encode(r) for r in requests]
        prompts = [self._tokens_prompt(prompt_token_ids=prompt) for prompt in ids]
        params = [self._params(r, prompt) for r, prompt in zip(requests, ids)]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        if len(results) != len(requests):
            raise RuntimeError(f"vLLM returned {len(results)} results for {len(requests)} prompts")
        # vLLM returns results in input order and has already cut at the stop strings; cutting again is a no-op
        # that keeps the contract identical to the hf backend's.
        completions = []
        for request, result in zip(requests, results):
            texts = [truncate_at_stop(c.text, request.stop) for c in result.outputs]
            completions.append(texts * request.n if request.temperature <= 0 else texts)
        return completions

    def close(self) -> None:
        """Tear the engine down and give its GPU memory back (idempotent): vLLM's own shutdown where it has one,
        the engine object dropped and collected, vLLM's distributed state destroyed, torch's cache emptied."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        shutdown = getattr(llm, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
        gc.collect()
        _destroy_distributed_state()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _destroy_distributed_state() -> None:
    """vLLM's process-wide model-parallel groups and distributed environment, destroyed so that a next engine in
    this process can initialise them again. A failing step is logged, not raised: the results are already out."""
    try:
        state = importlib.import_module("vllm.distributed.parallel_state")
    except ImportError:
        return
    for name in ("destroy_model_parallel", "destroy_distributed_environment"):
        step = getattr(state, name, None)
        if callable(step):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - teardown after the work is done
                logger.warning("vLLM teardown: %s failed: %s", name, exc)
