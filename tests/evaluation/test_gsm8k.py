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


def _lm_eval_scores(task_yaml: str, output: str, gold: str) -> dict[str, float]:
    """lm-eval's own pipeline for one output: each filter of the installed task YAML, then its exact_match."""
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters import build_filter_ensemble

    from mft_bench.evaluation.lm_eval_task import lm_eval_tasks_dir

    config = yaml.safe_load((lm_eval_tasks_dir() / "gsm8k" / task_yaml).read_text())
    metric = config["metric_list"][0]
    scores = {}
    for spec in config["filter_list"]:
        steps = [(step["function"], {k: v for k, v in step.items() if k != "function"}) for step in spec["filter"]]
        responses = [[output]]
        for make_filter in build_filter_ensemble(spec["name"], steps).filters:
            responses = make_filter().apply(responses, [{}])
        [prediction] = list(responses)
        scores[spec["name"]] = exact_match_hf_evaluate(
            predictions=[prediction], references=[gold], regexes_to_ignore=metric["regexes_to_ignore"],
            ignore_case=metric["ignore_case"], ignore_punctuation=metric["ignore_punctuation"])["exact_match"]
    return scores


# output, gold -> (ours strict, lm-eval gsm8k_cot strict-match, ours flexible, lm-eval flexible-extract)
COT_CASES = [
    ("The answer is 42.", "42", (1, 1, 1, 1)),
    ("The answer is 1,234.", "1234", (1, 1, 1, 1)),
    ("So the answer is 42.", "42", (1, 0, 1, 1)),  # lm-eval's strict pattern has a capital T
    ("The answer is: 42.", "42", (1, 0, 1, 1)),
    ("The answer is 42", "42", (1, 0, 1, 1)),  # lm-eval needs a character after the number: it reads 4
    ("The answer is $42.", "42", (1, 0, 1, 1)),
    ("The answer is 41. Wait, the answer is 42.", "42", (1, 0, 1, 1)),  # ours: the last statement; lm-eval: first
    ("The answer is 42. Check: 6 * 7 = 42 and 40 + 2 = 42.", "42", (1, 1, 1, 1)),
    ("The answer is 42.0.", "42", (1, 0, 1, 0)),  # numeric equality here, string equality in lm-eval
    ("He ate 50-8", "8", (0, 0, 1, 0)),  # a binary minus is no sign here; lm-eval reads -8
    ("It fell to -42", "42", (0, 0, 0, 0)),  # a sign is kept by both (OLMES would read 42)
    ("We get 42 in total. Then 7 more", "42", (0, 0, 0, 0)),
]


@pytest.mark.parametrize(("output", "gold", "expected"), COT_CASES)
def test_metrics_against_lm_eval_gsm8k_cot_filters(output: str, gold: str, expected: tuple) -> None:
    """Pins where exact_match_strict / _flexible agree with lm-eval's strict-match / flexible-extract and where
    they do not: the names are alike, the metrics are not."""
    ours = gsm8k.exact_match_scores(output, gold)["scores"]
    theirs = _lm_eval_scores("gsm8k-cot.yaml", output, gold)
    assert (ours["exact_match_strict"], theirs["strict-match"], ours["exact_match_flexible"],
            theirs["flexible-extract"]) == expected


# output, gold -> (ours "hash" extraction = synthetic_math's strict, lm-eval gsm8k strict-match)
HASH_CASES = [
    ("6 * 7 = 42\n#### 42", "42", (1, 1)),
    ("#### 1,500", "1500", (1, 1)),
    ("#### 41\n#### 42", "42", (1, 0)),  # ours: the last; lm-eval: the first
    ("####42", "42", (1, 0)),  # lm-eval's pattern needs one space
    ("#### $42", "42", (1, 0)),
    ("so 42", "42", (0, 0)),
]


@pytest.mark.parametrize(("output", "gold", "expected"), HASH_CASES)
def test_hash_extraction_against_lm_eval_gsm8k_strict_match(output: str, gold: str, expected: tuple) -> None:
    ours = gsm8k.exact_match_scores(output, gold, strict_mode="hash")["scores"]["exact_match_strict"]
    theirs = _lm_eval_scores("gsm8k.yaml", output, f"...\n#### {gold}")["strict-match"]
    assert (ours, theirs) == expected
