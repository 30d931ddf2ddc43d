"""HumanEval+ as the official coding evaluation loads it: OLMES codex_humanevalplus reads the hub dataset
evalplus/humanevalplus, HumanEval's fields with a ``test`` that checks every base and plus input against the
expected outputs written into it, run with ``check(entry_point)``. The problems below have that shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mft_bench.errors import MftBenchError
from mft_bench.evaluation import humaneval_plus
from mft_bench.evaluation.common import short_hash

ASSERTION = '''
import numpy as np


def is_floats(x) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)):
        return all(isinstance(i, float) for i in x)
    return False


def assertion(out, exp, atol):
    exact_match = out == exp
    if atol == 0 and is_floats(exp):
        atol = 1e-6
    if not exact_match and atol != 0:
        assert np.allclose(out, exp, rtol=1e-07, atol=atol)
    else:
        assert exact_match
'''


def hub_test(inputs: list, results: list) -> str:
    return (f"{ASSERTION}\n\ndef check(candidate):\n    inputs = {inputs!r}\n    results = {results!r}\n"
            "    for i, (inp, exp) in enumerate(zip(inputs, results)):\n        assertion(candidate(*inp), exp, 0)\n")


HUB_PROBLEMS = [
    {"task_id": "HumanEval/0", "entry_point": "add", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n",
     "canonical_solution": "    return a + b\n",
     "test": hub_test([[1, 2], [0, 0], [-5, 3], [10**12, 1]], [3, 0, -2, 10**12 + 1])},
    {"task_id": "HumanEval/1", "entry_point": "mean", "prompt": "def mean(xs):\n    \"\"\"Mean.\"\"\"\n",
     "canonical_solution": "    return sum(xs) / len(xs)\n",
     "test": hub_test([[[1.0, 2.0]], [[0.1, 0.2, 0.3]]], [1.5, (0.1 + 0.2 + 0.3) / 3])},
]


@pytest.fixture
def no_plus_env(monkeypatch):
    for name in humaneval_plus.ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def offline_copy(tmp_path, monkeypatch, no_plus_env) -> Path:
    """An offline data directory holding the hub dataset's test.jsonl (what HF_DATASETS_OFFLINE runs read)."""
    path = tmp_path / "data" / "humanevalplus" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in HUB_PROBLEMS))
    monkeypatch.setenv("MFT_BENCH_DATA_DIR", str(tmp_path / "data"))
    return path


def verdicts(bench: humaneval_plus.HumanEvalPlus) -> list[float]:
    add, mean = bench.items()
    completions = [
        (add, "    return a + b\n"),
        (add, "    return a + b if a >= 0 else 0\n"),  # right on the first inputs only: the plus inputs catch it
        (mean, "    return sum(reversed(xs)) / len(xs) + 1e-9\n"),  # within the float tolerance
        (mean, "    return sum(xs) / len(xs) + 1e-3\n"),
    ]
    return [bench.score(item, [completion])["scores"]["pass@1"] for item, completion in completions]


def test_hub_copy_in_the_offline_directory_is_scored_like_olmes(offline_copy):
    bench = humaneval_plus.HumanEvalPlus(variant="plain", timeout=20.0)
    assert [p["task_id"] for p in bench.problems] == ["HumanEval/0", "HumanEval/1"]
    assert verdicts(bench) == [1.0, 0.0, 1.0, 0.0]
    assert bench.data_hash() == short_hash(offline_copy.read_bytes())


def test_a_hub_format_file_given_by_path_takes_precedence(offline_copy, tmp_path):
    other = tmp_path / "hub-copy.jsonl"
    other.write_text("".join(json.dumps(p) + "\n" for p in HUB_PROBLEMS[:1]))
    bench = humaneval_plus.HumanEvalPlus(path=str(other))
    assert [p["task_id"] for p in bench.problems] == ["HumanEval/0"]
    item = bench.items()[0]
    assert bench.score(item, [item.data["prompt"] + item.data["canonical_solution"] + "```"])["scores"]["pass@1"] == 1.0


def test_without_file_offline_copy_or_hub_one_line_says_how_to_get_it(no_plus_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MFT_BENCH_DATA_DIR", str(tmp_path))  # an offline directory without humanevalplus/
    with pytest.raises(MftBenchError) as error:
        humaneval_plus.HumanEvalPlus().items()
    message = str(error.value)
    assert "\n" not in message
    assert "hub dataset evalplus/humanevalplus could not be loaded" in message
    assert "humanevalplus/test.jsonl" in message and "HumanEvalPlus-v0.1.10.jsonl.gz" in message


def test_rows_of_neither_format_are_refused(no_plus_env, tmp_path):
    wrong = tmp_path / "HumanEval.jsonl"
    wrong.write_text(json.dumps({"task_id": "x", "prompt": "", "entry_point": "f"}) + "\n")
    with pytest.raises(MftBenchError, match="row 1 lacks .*base_input.* or 'test' .*not a HumanEval\\+ file"):
        humaneval_plus.HumanEvalPlus(path=str(wrong)).items()


CLOSE_CASES = [
    (1.0, 1.0 + 1e-9), (1.0, 1.1), (0.0, 1e-9), (float("nan"), float("nan")), (float("inf"), float("inf")),
    (float("inf"), 1e308), (1, 1.0), (True, 1.0), ([1.0, 2.0], [1.0, 2.0 + 1e-7]), ([1.0, 2.0], [1.0, 2.1]),
    ((0.5, 0.25), [0.5, 0.25]), (1.0, [1.0, 1.0]), ([1.0], [1.0, 1.0 + 1e-12]), ([[1.0, 2.0], [3.0, 4.0]],
    [[1.0, 2.0], [3.0, 4.0000001]]), ([1.0, 2.0], [1.0, 2.0, 3.0]), ("1.0", 1.0), (None, 1.0), ([], []),
    (1e-7, 0.0), ([], [1.0]), ([1.0, 2.0], [[1.0, 2.0], [1.0, 2.0 + 1e-9]]), ([[1.0], [2.0]], [1.0, 2.0]),
    ([[1.0, 2.0], [3.0]], [[1.0, 2.0], [3.0]]), ([[1.0, 2.0], [3.0]], [[1.0, 2.0], [3.1]]), ([1.0, "a"], [1.0, 2.0]),
]


def _verdict(fn, *args, **kwargs) -> str:
    try:
        result = fn(*args, **kwargs)
    except AssertionError:
        return "assertion"
    except Exception:  # numpy raises its own subclasses of TypeError / ValueError
        return "error"
    return "ok" if result is None else str(bool(result))


def test_numpy_standin_gives_numpys_verdicts():
    import sys

    import numpy

    namespace: dict = {}
    try:
        exec(humaneval_plus._NUMPY_STANDIN, namespace)  # noqa: S102 - our own module text
    finally:
        sys.modules["numpy"] = numpy
    for a, b in CLOSE_CASES:
        for kwargs in ({}, {"rtol": 1e-07, "atol": 1e-6}):
            assert _verdict(namespace["_np_allclose"], a, b, **kwargs) == _verdict(numpy.allclose, a, b, **kwargs), \
                (a, b, kwargs)
        assert _verdict(namespace["_np_assert_allclose"], a, b, atol=1e-6) == \
            _verdict(numpy.testing.assert_allclose, a, b, atol=1e-6), (a, b)
