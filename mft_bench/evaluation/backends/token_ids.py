"""The token-level contract every backend keeps: which ids a prompt becomes, and which ids end a completion.

Both backends build their prompts here, so the hf and the vLLM backend feed the model the same ids:

- A chat request is rendered with the tokenizer's chat template as text, then tokenized *without* adding special
  tokens again: a template that writes its own BOS (Llama-3's ``{{ bos_token }}``) gives exactly one, where
  handing the rendered text to an engine as a text prompt would add a second.
- A plain request is tokenized with the tokenizer's special tokens (the BOS of LLaMA-style tokenizers), as
  vLLM does with a text prompt.
- With a ``max_length`` (the context the engine is given), a prompt longer than ``max_length - max_new_tokens``
  keeps its last tokens (the question, after the few-shot exemplars), with a warning, so prompt and completion
  fit.
"""

from __future__ import annotations

import logging
from typing import Any

from mft_bench.evaluation.base import GenerationRequest

logger = logging.getLogger(__name__)


def prompt_token_ids(tokenizer: Any, request: GenerationRequest, max_length: int | None = None) -> list[int]:
    """The prompt's token ids (see module docstring); ``ValueError`` when ``max_length`` leaves no room."""
    if request.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": request.prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
    if max_length is not None:
        keep = max_length - request.max_new_tokens
        if keep < 1:
            raise ValueError(f"max_length {max_length} leaves no room for the prompt")
        if len(ids) > keep:
            logger.warning("prompt of %d tokens cut to its last %d (max_length %d)", len(ids), keep, max_length)
            ids = ids[-keep:]
    return list(ids)


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The ids that end a completion: the generation config's ``eos_token_id`` (one or a list), then the
    tokenizer's, without repeats."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids
