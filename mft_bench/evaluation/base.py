"""What every generation benchmark provides, and what the runner writes.

A benchmark turns its items into generation requests and scores the completions; the runner
(``mft_bench.evaluation.runner``) does the generation through a backend, writes one JSON line per item as it
goes (resumable), and aggregates. ``lm_eval:<task>`` benchmarks delegate the whole loop to lm-eval instead.

Per-item record (one line of ``records.jsonl``)::

    {"id": "gsm8k/17", "prompt_hash": "<sha256 of the prompt, 16 hex>", "output": "<first completion>",
     "outputs": [...all n completions...], "extracted": "<extracted answer or null>",
     "scores": {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}, ...benchmark extras}

Metrics (``metrics.json``)::

    {"benchmark": "gsm8k", "n": 1319, "primary_metric": "exact_match_flexible",
     "metrics": {"exact_match_flexible": {"mean": 0.47, "stderr": 0.014}, ...},
     "versions": {"data": "<sha256 of the item source, 16 hex>", "prompt": "2", "scorer": "1"},
     "isolation": "namespace" (code benchmarks only), "backend": "hf", "limit": null}
"""

from __future__ import annotations

import inspect
import typing

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete. ``n`` samples; ``temperature == 0`` means greedy.

    ``chat=False``: ``prompt`` is raw text fed as is (the paper's protocol: no chat template).
    ``chat=True``: ``prompt`` is a user message; the backend applies the tokenizer's chat template with the
    generation prompt (used for in-domain test splits formatted like the training data).
    """

    prompt: str
    chat: bool = False
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    n: int = 1
    top_p: float = 1.0


def truncate_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """``text`` cut before the earliest occurrence of any stop string (unchanged when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


@dataclass
class Item:
    """One benchmark item: a stable id, the request, and whatever the scorer needs."""

    id: str
    request: GenerationRequest
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchmarkFacts:
    """What the rest of mft-bench knows of a benchmark without loading it; each benchmark module declares its own
    (``FACTS``: benchmark name -> facts), ``evaluation.registry`` hands them out.

    ``domain``: the training domain it measures (``math`` / ``coding`` / ``instruction``); ``headline``: the
    domain's headline benchmark (the paper table's column). ``validation_split``: it takes ``split: validation``, a
    held-out split checkpoints are selected on. ``runs_code``: it executes model-written code (takes ``sandbox``).
    Cost-model shapes, typical of the protocol (SmolLM2/LLaMA tokenizers): ``items``, ``prompt_tokens``,
    ``new_tokens`` and the prompt tokens ``shared_prompt_tokens`` every item shares (few-shot exemplars), of which
    each of ``fewshot`` exemplars is an equal part; ``items_option``: the option that sets the item count."""

    items: int
    prompt_tokens: int
    new_tokens: int
    shared_prompt_tokens: int = 0
    fewshot: int = 0
    items_option: str | None = None
    domain: str | None = None
    headline: bool = False
    validation_split: bool = False
    runs_code: bool = False

    def cost_shape(self, options: dict[str, Any], limit: int | None) -> tuple[int, int, int, int]:
        """(items, prompt tokens, new tokens, shared prompt tokens) of one evaluation with ``options``."""
        items = int(options[self.items_option]) if self.items_option in options else self.items
        prompt, shared = self.prompt_tokens, self.shared_prompt_tokens
        shots = int(options.get("num_fewshot", self.fewshot))
        if self.fewshot and shots < self.fewshot:  # fewer exemplars: a shorter prompt, less of it shared
            prompt, shared = prompt - (self.fewshot - shots) * shared // self.fewshot, shots * shared // self.fewshot
        new = min(self.new_tokens, int(options.get("max_new_tokens", self.new_tokens)))
        return (min(items, limit) if limit else items), prompt, new, shared


class Benchmark(Protocol):
    """A generation benchmark. ``name`` is the recipe-facing name (``gsm8k``, ``humaneval``, ...)."""

    name: str
    prompt_version: str
    scorer_version: str
    primary_metric: str
    # the options that change the prompt text (part of the prompt version when set to other than the default)
    prompt_options: tuple[str, ...]

    def items(self, limit: int | None = None) -> list[Item]:
        """The items in a fixed order (first ``limit`` of them when given)."""
        ...

    def data_hash(self) -> str:
        """A short content hash of the item source (file bytes), for provenance."""
        ...

    def score(self, item: Item, outputs: list[str]) -> dict[str, Any]:
        """Score the completions of one item -> record fields: ``extracted``, ``scores`` (+ extras)."""
        ...

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        """Metric name -> {"mean", "stderr"} over all records."""
        ...


def constructor_options(cls: type) -> dict[str, tuple[Any, Any]]:
    """Keyword argument -> (type, default) of ``cls``'s constructor, following ``**kwargs`` to the base class."""
    options: dict[str, tuple[Any, Any]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        passes_on = False
        for name, parameter in inspect.signature(init).parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                passes_on = True
            elif name != "self" and parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
                options.setdefault(name, (hints.get(name, Any), parameter.default))
        if not passes_on:
            break
    return options
