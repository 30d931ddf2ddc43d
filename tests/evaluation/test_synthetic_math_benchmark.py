"""In-domain synthetic math benchmark: generated test items, chat prompts, '####' strict scoring."""

from __future__ import annotations

import pytest

from mft_bench.evaluation import gsm8k

generator = pytest.importorskip("mft_bench.data.synthetic_math")
from mft_bench.evaluation.synthetic_math import SyntheticMath  # noqa: E402


def test_items_are_deterministic_chat_prompts() -> None:
    bench = SyntheticMath(n=12, seed=3, max_new_tokens=256)
    items = bench.items()
    assert [i.id for i in items] == [f"synthetic_math/{k}" for k in range(12)]
    rows = generator.generate(split="test", n=12, seed=3)
    assert [i.request.prompt for i in items] == [r["question"] for r in rows]
    assert all(i.request.chat and i.request.max_new_tokens == 256 and i.request.temperature == 0 for i in items)
    assert [i.data["gold"] for i in items] == [gsm8k.gold_answer(r["answer"]) for r in rows]
    assert [i.id for i in bench.items(limit=5)] == [f"synthetic_math/{k}" for k in range(5)]
    # same options -> same data hash; another seed -> other items, other hash
    assert SyntheticMath(n=12, seed=3).data_hash() == bench.data_hash()
    assert SyntheticMath(n=12, seed=4).data_hash() != bench.data_hash()


def test_reference_solution_scores_full_marks_and_strict_needs_hash() -> None:
    bench = SyntheticMath(n=4, seed=0)
    rows = generator.generate(split="test", n=4, seed=0)
    records = [bench.score(item, [row["answer"]]) for item, row in zip(bench.items(), rows)]
    assert all(r["scores"] == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0} for r in records)

    item = bench.items(limit=1)[0]
    gold = item.data["gold"]
    no_hash = bench.score(item, [f"So the answer is {gold}."])
    assert no_hash["scores"] == {"exact_match_strict": 0.0, "exact_match_flexible": 1.0}
    wrong = bench.score(item, [f"#### {int(gold) + 1}"])
    assert wrong["scores"] == {"exact_match_strict": 0.0, "exact_match_flexible": 0.0}

    metrics = bench.aggregate(records + [no_hash])
    assert metrics["exact_match_flexible"]["mean"] == 1.0
    assert metrics["exact_match_strict"]["mean"] == pytest.approx(4 / 5)
    assert bench.primary_metric == "exact_match_flexible"
