"""CLI commands that need no training: list, plan, reproduce --dry-run, check."""

import json

import pytest

from mft_bench.cli import main


def test_list_shows_shipped_recipes(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("default", "smoke", "paper/llama2-7b-math", "paper/llama3.1-8b-instruction"):
        assert name in out


@pytest.mark.parametrize("recipe", ["paper/llama2-7b-math", "paper/llama2-7b-coding", "paper/llama3.1-8b-instruction"])
def test_plan_on_paper_recipes_prints_stages_and_estimates(recipe, capsys, tmp_path):
    assert main(["plan", recipe, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for stage in ("data", "fft", "mft", "lora", "random_mask", "magnitude_mask", "eval-mft-last"):
        assert stage in out
    assert "FLOP" in out and "GiB" in out and "estimated time" in out
    assert "6738M parameters" in out or "8030M parameters" in out


def test_plan_mft_is_cheaper_than_fft_for_an_upper_band(tmp_path):
    from mft_bench.cli import resolve_recipe
    from mft_bench.stages import build_plan
    from mft_bench.plan import estimate_stages
    from mft_bench.recipe import load_recipe

    recipe = load_recipe(resolve_recipe("paper/llama2-7b-coding"))
    estimates, _, _ = estimate_stages(recipe, build_plan(recipe, tmp_path))
    assert estimates["mft"].seconds < 0.7 * estimates["fft"].seconds
    assert estimates["mft"].memory_bytes < 0.6 * estimates["fft"].memory_bytes


def test_reproduce_paper_dry_run_plans_all_three_domains(capsys, tmp_path):
    assert main(["reproduce", "paper", "--backbone", "llama3.1-8b", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for domain in ("math", "coding", "instruction"):
        assert f"recipe llama3.1-8b-{domain}" in out


def test_check_exit_codes(tmp_path, capsys):
    report = {"recipe": "x", "rows": [{"arm": "mft", "benchmark": "gsm8k", "metric": "exact_match_flexible",
                                       "value": 0.5, "n": 10, "ci_low": 0.2, "ci_high": 0.8}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    reference = tmp_path / "ref.json"
    assert main(["check", str(tmp_path), "--reference", str(reference), "--update", "--tolerance", "0.01"]) == 0
    assert main(["check", str(tmp_path), "--reference", str(reference)]) == 0
    report["rows"][0]["value"] = 0.4
    (tmp_path / "report.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert main(["check", str(tmp_path), "--reference", str(reference)]) == 1
    assert "mft" in capsys.readouterr().out
