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


class Benchmark(Protocol):
    """A generation benchmark. ``name`` is the recipe-facing name (``gsm8k``, ``humaneval``, ...)."""

    name: str
    prompt_version: str
    scorer_version: str
    primary_metric: str

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
