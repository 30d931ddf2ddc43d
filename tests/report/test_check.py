"""Regression check against references: pass, fail, missing, --update tolerance rules."""

from __future__ import annotations

import json

import pytest

from mft_bench.errors import MftBenchError
from mft_bench.report import check_against_reference, write_reference
from mft_bench.report.check import reference_from_report


def _report(recipe: str = "smoke", deterministic: bool = False) -> dict:
    return {
        "recipe": recipe,
        "deterministic": deterministic,
        "settings": {"confidence": 0.95},
        "provenance": {"git_commit": "abc"},
        "rows": [
            {"arm": "mft", "benchmark": "gsm8k", "metric": "exact_match", "value": 0.47, "n": 1319,
             "ci_low": 0.44, "ci_high": 0.50},
            {"arm": "fft", "benchmark": "gsm8k", "metric": "exact_match", "value": 0.469, "n": 1319,
             "ci_low": 0.442, "ci_high": 0.496},
        ],
        "comparisons": [],
    }


def _reference(entries: list[tuple[str, float, float]], recipe: str = "smoke") -> dict:
    return {"recipe": recipe, "created_with": {},
            "metrics": [{"arm": arm, "benchmark": "gsm8k", "metric": "exact_match", "value": value,
                         "tolerance": tolerance} for arm, value, tolerance in entries]}


def test_passes_within_tolerance_including_the_boundary():
    reference = _reference([("mft", 0.46, 0.01), ("fft", 0.469, 0.0)])  # |0.47 - 0.46| == tolerance
    assert check_against_reference(_report(), reference) == []


def test_names_every_metric_outside_tolerance():
    reference = _reference([("mft", 0.40, 0.05), ("fft", 0.5, 0.01)])
    failures = check_against_reference(_report(), reference)
    assert len(failures) == 2
    assert failures[0].startswith("mft/gsm8k/exact_match: 0.47 outside reference 0.4 ± 0.05")
    assert failures[1].startswith("fft/gsm8k/exact_match:")


def test_missing_row_and_wrong_recipe_fail():
    reference = _reference([("lora", 0.3, 0.1), ("mft", 0.47, 0.0)], recipe="default")
    failures = check_against_reference(_report(), reference)
    assert any(line.startswith("lora/gsm8k/exact_match: missing") for line in failures)
    assert any(line.startswith("recipe:") for line in failures)
    assert len(failures) == 2


def test_malformed_reference_is_a_user_error():
    with pytest.raises(MftBenchError, match="metrics"):
        check_against_reference(_report(), {"recipe": "smoke"})
    with pytest.raises(MftBenchError, match="tolerance"):
        check_against_reference(_report(), {"metrics": [{"arm": "mft", "benchmark": "gsm8k",
                                                         "metric": "exact_match", "value": 0.4}]})


def test_update_writes_exact_reference_for_smoke_that_passes(tmp_path):
    path = write_reference(_report(), tmp_path / "reference" / "smoke.json")
    reference = json.loads(path.read_text())
    assert reference["recipe"] == "smoke" and reference["created_with"]["git_commit"] == "abc"
    assert [m["tolerance"] for m in reference["metrics"]] == [0.0, 0.0]
    assert check_against_reference(_report(), reference) == []
    changed = _report()
    changed["rows"][0]["value"] = 0.4700001
    assert len(check_against_reference(changed, reference)) == 1


def test_update_tolerance_rules():
    auto = reference_from_report(_report(recipe="default"))
    by_arm = {m["arm"]: m["tolerance"] for m in auto["metrics"]}
    # SE = 0.03 / 1.96 -> 2 SE = 0.0306 > 0.02
    assert by_arm["mft"] == pytest.approx(2 * 0.03 / 1.959964, rel=1e-5)
    assert reference_from_report(_report(recipe="default", deterministic=True))["metrics"][0]["tolerance"] == 0.0
    fixed = reference_from_report(_report(recipe="default"), tolerance=0.05)
    assert {m["tolerance"] for m in fixed["metrics"]} == {0.05}
    tight = _report(recipe="default")
    for row in tight["rows"]:
        row["ci_low"], row["ci_high"] = row["value"] - 0.001, row["value"] + 0.001
    assert {m["tolerance"] for m in reference_from_report(tight)["metrics"]} == {0.02}
    with pytest.raises(MftBenchError):
        reference_from_report(_report(), tolerance=-1.0)


def test_fewer_items_than_the_reference_is_a_regression_even_at_the_same_value():
    reference = _reference([("mft", 0.47, 0.0)])
    reference["metrics"][0]["n"] = 1320  # the run lost an item (a damaged records file), the mean did not move
    (failure,) = check_against_reference(_report(), reference)
    assert failure == "mft/gsm8k/exact_match: 1319 items in the report, 1320 in the reference"
    written = reference_from_report(_report(deterministic=True))
    assert {entry["n"] for entry in written["metrics"]} == {1319}
