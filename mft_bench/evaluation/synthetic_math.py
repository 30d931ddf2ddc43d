"""In-domain synthetic math: the test split of the project's GSM8K-style generator, prompted like the training data.

Items come from ``mft_bench.data.synthetic_math.generate(split="test", n, seed)`` (rows with ``question`` and a
worked ``answer`` ending ``"#### N"``). Each question is sent zero-shot as a user chat message
(``GenerationRequest(chat=True)``), exactly as the training examples were formatted, and scored with the GSM8K
extractor against the number after ``####`` in the reference:

- ``exact_match_flexible`` (primary, as for GSM8K): the last number in the output;
- ``exact_match_strict``: the number after the last ``####`` in the output (the training format; any spacing, an
  optional ``$``). Not lm-eval ``gsm8k``'s ``strict-match``, which takes the first ``#### N`` (one space).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mft_bench.data.synthetic_math import SPLITS
from mft_bench.errors import MftBenchError
from mft_bench.evaluation.base import BenchmarkFacts, GenerationRequest, Item
from mft_bench.evaluation.common import aggregate_scores, short_hash
from mft_bench.evaluation.gsm8k import exact_match_scores, gold_answer

logger = logging.getLogger(__name__)


def _generate(split: str, n: int, seed: int) -> list[dict[str, Any]]:
    try:
        from mft_bench.data.synthetic_math import generate
    except ImportError as exc:
        raise MftBenchError(
            "benchmark 'synthetic_math' needs mft_bench.data.synthetic_math.generate, which is not installed"
        ) from exc
    return list(generate(split=split, n=n, seed=seed))


# items generated on demand (option n); a held-out validation split of its own (option split)
FACTS = {"synthetic_math": BenchmarkFacts(items=200, prompt_tokens=80, new_tokens=100, items_option="n", domain="math",
                                          validation_split=True)}


class SyntheticMath:
    """``n`` generated test problems (seeded, deterministic), zero-shot chat prompts."""

    name = "synthetic_math"
    prompt_version = "1"
    scorer_version = "1"
    prompt_options = ()
    primary_metric = "exact_match_flexible"
    metrics = ("exact_match_strict", "exact_match_flexible")
    metric_notes = {
        "exact_match_flexible": "last number = gold (as gsm8k's)",
        "exact_match_strict": "number after the last '####' (the training format) = gold; not lm-eval's "
                              "strict-match (first '#### N')",
    }

    def __init__(
        self, n: int = 500, seed: int = 0, max_new_tokens: int = 512, split: str = "test", data_dir: str | None = None
    ) -> None:
        if n <= 0:
            raise MftBenchError(f"synthetic_math n must be positive, got {n}")
        if split not in SPLITS:
            raise MftBenchError(f"synthetic_math options.split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.n = n
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.split = split
        self.data_dir = data_dir  # accepted for a uniform constructor; the items are generated, not read
        self._rows: list[dict[str, Any]] | None = None

    def _load(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = _generate(self.split, self.n, self.seed)
            logger.info("synthetic_math: %d %s problems (seed %d)", len(self._rows), self.split, self.seed)
        return self._rows

    def items(self, limit: int | None = None) -> list[Item]:
        rows = self._load()
        selected = rows if limit is None else rows[:limit]
        return [
            Item(
                id=f"synthetic_math/{index}",
                request=GenerationRequest(
                    prompt=row["question"], chat=True, max_new_tokens=self.max_new_tokens, temperature=0.0
                ),
                data={"question": row["question"], "gold": gold_answer(row["answer"])},
            )
            for index, row in enumerate(selected)
        ]

    def data_hash(self) -> str:
        rows = self._load()
        canonical = "\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows)
        return short_hash(canonical.encode("utf-8"))

    def score(self, item: Item, outputs: list[str]) -> dict[str, Any]:
        return exact_match_scores(outputs[0] if outputs else "", item.data["gold"], strict_mode="hash")

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        return aggregate_scores(records, self.metrics)
