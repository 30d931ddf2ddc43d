"""GSM8K: answer extraction on tricky strings, the OLMES prompt, data loading, scoring and aggregation."""

from __future__ import annotations

import json

import pytest

from mft_bench.errors import MftBenchError
from mft_bench.evaluation import gsm8k


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is 18.", "18"),
        ("She makes 9 * 2 = $18 every day.", "18"),
        ("The total is $1,234.50.", "1234.5"),
        ("It costs 12.0 dollars", "12"),
        ("It costs 12.50 dollars", "12.5"),
        ("The temperature drops to -5 degrees.", "-5"),
        ("10-3 = 7", "7"),
        ("5-3", "3"),  # binary minus is not a sign
        ("He ran 5km in 30 minutes", "30"),
        ("A list 1,2,3", "3"),  # not a thousands group
        ("Total: 1,000,000 people", "1000000"),
        ("about .5 of it", "0.5"),
        ("15% of 80 is 12%", "12"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_flexible_extraction_takes_last_number(text: str, expected: str | None) -> None:
    assert gsm8k.extract_answer(text) == expected
    assert gsm8k.extract_answer(text, mode="flexible") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 + 4 = 9. So the answer is 9.", "9"),
        ("The answer is $1,200.", "1200"),
        ("the answer is: -3", "-3"),
        ("so THE ANSWER IS 42 apples. Then 7", "42"),
        ("The answer is 3. Wait, the answer is 4.", "4"),  # the final statement wins
        ("We get 18 in total.", None),  # format not followed
        ("The answer is unknown", None),
    ],
)
def test_strict_extraction_needs_the_answer_format(text: str, expected: str | None) -> None:
    assert gsm8k.extract_answer(text, mode="strict") == expected


def test_hash_extraction_and_bad_mode() -> None:
    assert gsm8k.extract_answer("3 + 4 = 7\n#### 7", mode="hash") == "7"
    assert gsm8k.extract_answer("#### $1,500.", mode="hash") == "1500"
    assert gsm8k.extract_answer("the answer is 7", mode="hash") is None
    with pytest.raises(ValueError):
        gsm8k.extract_answer("7", mode="last")


def test_gold_answer() -> None:
    assert gsm8k.gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gsm8k.gold_answer("...\n#### 1,000") == "1000"
    assert gsm8k.gold_answer("...\n#### -4") == "-4"
    with pytest.raises(MftBenchError):
        gsm8k.gold_answer("no final answer")


def test_prompt_is_olmes_format() -> None:
    prompt = gsm8k.build_prompt("How many?", num_fewshot=8)
    blocks = prompt.split("\n\n")
    assert len(blocks) == 9
    assert blocks[0].startswith("Question: There are 15 trees in the grove.")
    assert "\nAnswer: There are 15 trees originally." in blocks[0]
    assert all(b.endswith(".") and "So the answer is" in b for b in blocks[:8])
    assert blocks[-1] == "Question: How many?\nAnswer:"
    assert gsm8k.build_prompt("Q?", num_fewshot=0) == "Question: Q?\nAnswer:"
    # every exemplar's own answer is recovered by the strict extractor
    for _, answer in gsm8k.FEWSHOT_EXEMPLARS:
        assert gsm8k.extract_answer(answer, "strict") == gsm8k.extract_answer(answer, "flexible")


def _write_gsm8k(root, rows) -> None:
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_benchmark_items_score_aggregate(tmp_path) -> None:
    rows = [
        {"question": "Q0?", "answer": "a\n#### 18"},
        {"question": "Q1?", "answer": "b\n#### 1,000"},
        {"question": "Q2?", "answer": "c\n#### 5"},
    ]
    _write_gsm8k(tmp_path, rows)
    bench = gsm8k.GSM8K(data_dir=str(tmp_path))
    items = bench.items()
    assert [i.id for i in items] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]
    assert [i.id for i in bench.items(limit=2)] == ["gsm8k/0", "gsm8k/1"]
    request = items[0].request
    assert request.chat is False and request.temperature == 0.0 and request.max_new_tokens == 512
    assert request.stop == ("Question:", "</s>", "<|im_end|>", "\n\n")
    assert request.prompt.endswith("Question: Q0?\nAnswer:")
    assert len(bench.data_hash()) == 16
    assert bench.data_hash() == gsm8k.short_hash((tmp_path / "gsm8k" / "test.jsonl").read_bytes())

    both = bench.score(items[0], [" 9 * 2 = 18. So the answer is 18."])
    flexible_only = bench.score(items[1], [" She pays $1,000 in total."])
    wrong = bench.score(items[2], [" So the answer is 6."])
    assert both["scores"] == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
    assert both["extracted"] == "18"
    assert flexible_only["scores"] == {"exact_match_strict": 0.0, "exact_match_flexible": 1.0}
    assert wrong["scores"] == {"exact_match_strict": 0.0, "exact_match_flexible": 0.0}

    metrics = bench.aggregate([both, flexible_only, wrong])
    assert metrics["exact_match_flexible"]["mean"] == pytest.approx(2 / 3)
    assert metrics["exact_match_strict"]["mean"] == pytest.approx(1 / 3)
    # sample std (ddof=1) / sqrt(n): values 1,1,0 -> std 0.57735, / sqrt(3)
    assert metrics["exact_match_flexible"]["stderr"] == pytest.approx(0.57735027 / 3**0.5)
    assert bench.primary_metric in metrics


def test_missing_data_offline_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MFT_BENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    with pytest.raises(MftBenchError, match="MFT_BENCH_DATA_DIR"):
        gsm8k.GSM8K(data_dir=str(tmp_path / "empty")).items()


def test_bad_fewshot_count() -> None:
    with pytest.raises(MftBenchError):
        gsm8k.GSM8K(num_fewshot=9)


def test_real_test_set(shared_data) -> None:
    bench = gsm8k.GSM8K(data_dir=str(shared_data))
    items = bench.items()
    assert len(items) == 1319
    assert items[0].id == "gsm8k/0" and items[0].data["gold"] == "18"  # Janet's ducks
    assert all(i.data["gold"] == gsm8k.normalize_number(i.data["gold"]) for i in items)
