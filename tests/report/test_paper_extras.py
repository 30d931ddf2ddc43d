"""The paper table's second part: the coding domain average (HumanEval + HumanEval+, the abstract's claim beside
it) and the extra benchmarks the official README reports (HumanEval+, MATH), from reports of fake runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mft_bench.report import write_paper_table
from mft_bench.report.paper_numbers import load_paper_numbers

ARMS = ["pretrained", "fft", "mft", "lora", "random_mask", "magnitude_mask"]


def fake_report(run_dir: Path, *, domain: str, key: str, values: dict[str, dict[str, float]]) -> Path:
    """A run folder whose report.json has ``values[benchmark][arm]`` (fractions) as primary metrics."""
    primary = {"humaneval": "pass@1", "humaneval_plus": "pass@1", "gsm8k": "exact_match_flexible",
               "lm_eval:minerva_math": "exact_match,none"}
    paper = load_paper_numbers(key)
    report = {
        "recipe": f"{key}-{domain}", "backbone": key, "domain": domain,
        "benchmarks": {b: {"primary_metric": primary[b], "n": 100} for b in values},
        "rows": [{"arm": arm, "benchmark": b, "metric": primary[b], "value": v, "ci_low": v, "ci_high": v, "n": 100}
                 for b, by_arm in values.items() for arm, v in by_arm.items()],
        "comparisons": [],
        "paper": {"key": key, "selection": paper.get("selection"), "domain": domain,
                  "entry": paper["domains"][domain]},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps(report))
    return run_dir


HUMANEVAL = {"pretrained": 0.25, "fft": 0.30, "mft": 0.33, "lora": 0.28, "random_mask": 0.29, "magnitude_mask": 0.2}
HUMANEVAL_PLUS = {"pretrained": 0.21, "fft": 0.24, "mft": 0.28, "lora": 0.25, "random_mask": 0.22, "magnitude_mask": 0.1}


@pytest.fixture
def tables(tmp_path):
    coding = fake_report(tmp_path / "coding", domain="coding", key="llama2-7b",
                         values={"humaneval": HUMANEVAL, "humaneval_plus": HUMANEVAL_PLUS})
    coding31 = fake_report(tmp_path / "coding31", domain="coding", key="llama3.1-8b",
                           values={"humaneval": HUMANEVAL, "humaneval_plus": HUMANEVAL_PLUS})
    math = fake_report(tmp_path / "math", domain="math", key="llama2-7b",
                       values={"gsm8k": {a: 0.4 for a in ARMS}, "lm_eval:minerva_math": {"fft": 0.05, "mft": 0.06}})
    only_humaneval = fake_report(tmp_path / "he", domain="coding", key="llama2-7b", values={"humaneval": HUMANEVAL})
    write_paper_table([coding, coding31, math, only_humaneval], tmp_path / "out")
    return json.loads((tmp_path / "out" / "paper_table.json").read_text()), tmp_path / "out"


def test_coding_domain_average_is_the_mean_of_humaneval_and_plus(tables):
    data, _ = tables
    averages = [r for r in data["extras"] if r["what"] == "domain average"]
    assert {r["recipe"] for r in averages} == {"llama2-7b-coding", "llama3.1-8b-coding"}  # not without HumanEval+
    mft = next(r for r in averages if r["recipe"] == "llama2-7b-coding" and r["arm"] == "mft")
    assert mft["value"] == pytest.approx((33 + 28) / 2)
    assert mft["delta_vs_fft"] == pytest.approx(((33 - 30) + (28 - 24)) / 2)
    assert mft["made_of"] == "mean of humaneval:pass@1 + humaneval_plus:pass@1"
    # the abstract's claims, per backbone: MFT's gain only
    assert mft["paper_delta_vs_fft"] == 1.95 and mft["paper_value"] is None
    assert next(r for r in averages if r["recipe"] == "llama3.1-8b-coding" and r["arm"] == "mft")[
        "paper_delta_vs_fft"] == 1.88
    assert all(r["paper_delta_vs_fft"] is None for r in averages if r["arm"] != "mft")


def test_extra_benchmarks_sit_beside_the_official_readme(tables):
    data, _ = tables
    plus = {r["arm"]: r for r in data["extras"] if r["what"] == "humaneval_plus" and r["recipe"] == "llama2-7b-coding"}
    assert (plus["pretrained"]["paper_value"], plus["fft"]["paper_value"], plus["mft"]["paper_value"]) == (22.4, 25.0, 29.9)
    assert plus["mft"]["paper_delta_vs_fft"] == pytest.approx(4.9) and plus["lora"]["paper_value"] is None
    math = {r["arm"]: r for r in data["extras"] if r["what"] == "lm_eval:minerva_math"}
    assert (math["fft"]["paper_value"], math["mft"]["paper_value"]) == (6.7, 7.6)
    assert math["mft"]["value"] == pytest.approx(6.0) and math["mft"]["delta_vs_fft"] == pytest.approx(1.0)
    # the headline benchmarks stay in the main table only
    assert not [r for r in data["extras"] if r["what"] in ("humaneval", "gsm8k")]


def test_markdown_and_latex_say_what_the_average_is_made_of(tables):
    _, out = tables
    markdown = (out / "paper_table.md").read_text()
    assert "## More of the official evaluation" in markdown
    line = next(ln for ln in markdown.splitlines() if "mean of humaneval:pass@1 + humaneval_plus:pass@1" in ln)
    assert "30.5 (+3.5)" in line  # MFT: (33 + 28) / 2, Δ ((33 - 30) + (28 - 24)) / 2
    assert "| paper abstract (MFT's gain only) |" in markdown and "(+1.95)" in markdown and "(+1.88)" in markdown
    assert "| official README rerun |" in markdown and "29.9 (+4.9)" in markdown and "7.6 (+0.9)" in markdown
    assert "mean of humaneval:pass@1 + humaneval\\_plus:pass@1" in (out / "paper_table.tex").read_text()
    assert (out / "paper_table_extras.csv").is_file()
