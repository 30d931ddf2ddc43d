"""Sweeps: variants one factor at a time around a base recipe, run into one folder whose stages they share, and
the cross-run table; bad sweep files refused in one line before anything runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mft_bench.cli import main
from mft_bench.masking import read_mask_metadata, removed_count
from mft_bench.report.build import build_report, write_report
from mft_bench.report.seed_pool import seed_pooled
from mft_bench.report.sweep_table import format_value, sweep_rows
from mft_bench.run_folder import RunLock
from mft_bench.sweep import load_sweep

ROOT = Path(__file__).resolve().parent.parent
SMOKE_SWEEP = ROOT / "tasks" / "sweeps" / "smoke-sweep.yaml"
PAPER_ABLATIONS = ROOT / "tasks" / "paper" / "ablations" / "llama2-7b-math.yaml"
# three variants: the base, a learning rate (its mask baseline is the base's) and a global mode (its own)
AXES = ["--axis", "mft.learning_rate", "--axis", "mask.mode"]
EXPECTED = {"base": (None, None), "mft.learning_rate-0.05": ("mft.learning_rate", 0.05),
            "mask.mode-global-abs-exact": ("mask.mode", "global-abs-exact")}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "smoke"
    assert main(["sweep", str(SMOKE_SWEEP), "--out", str(out), *AXES]) == 0
    return out


def _folders(out: Path, prefix: str) -> list[Path]:
    return sorted((out / "stages").glob(f"{prefix}-*"))


def test_variants_share_the_stages_they_have_in_common(swept):
    assert len(_folders(swept, "data")) == 1
    assert len(_folders(swept, "fft")) == 1  # FFT trained once for three variants
    assert len(_folders(swept, "mft")) == 3
    assert len(_folders(swept, "random_mask")) == 2  # the learning-rate variant reuses the base's random mask
    assert len(_folders(swept, "eval-pretrained-last")) == 1 and len(_folders(swept, "eval-fft-last")) == 1
    fft_evaluations = set()
    for name in EXPECTED:
        run = json.loads((swept / "variants" / name / "run.json").read_text())
        fft = [e["metrics"] for e in run["evaluations"] if e["arm"] == "fft"]
        assert fft and all(path.startswith("../../stages/") for path in fft)
        fft_evaluations.update(fft)
        assert (swept / "variants" / name / "report.json").is_file()
    assert len(fft_evaluations) == 1


def test_table_has_one_row_per_variant_with_its_setting_and_the_reports_numbers(swept):
    table = json.loads((swept / "sweep.json").read_text())
    assert [row["variant"] for row in table["rows"]] == list(EXPECTED)
    assert table["base_values"] == {"mft.learning_rate": 0.01, "mask.mode": "local"}
    for row in table["rows"]:
        assert (row["axis"], row["value"]) == EXPECTED[row["variant"]]
        report = json.loads((swept / "variants" / row["variant"] / "report.json").read_text())
        mft = next(r for r in report["rows"] if r["arm"] == "mft" and r["benchmark"] == table["benchmark"]
                   and r["metric"] == table["metric"])
        vs_fft = next(c for c in report["comparisons"] if (c["arm_a"], c["arm_b"]) == ("mft", "fft")
                      and c["benchmark"] == table["benchmark"] and c["metric"] == table["metric"])
        assert row["mft"] == pytest.approx(mft["value"] * 100) and row["n"] == mft["n"]
        assert row["delta_vs_fft"] == pytest.approx(vs_fft["diff"] * 100)
        assert row["delta_vs_random"] is not None and row["selection"] == "last"
    markdown = (swept / "sweep.md").read_text()
    body = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in body] == list(EXPECTED)
    assert "| mask.mode-global-abs-exact | mask.mode | global-abs-exact |" in markdown
    assert len((swept / "sweep.csv").read_text().strip().splitlines()) == 1 + len(EXPECTED)
    assert "\\begin{tabular}" in (swept / "sweep.tex").read_text()


def test_global_mode_baseline_removes_the_counts_mft_removed(swept):
    run = json.loads((swept / "variants" / "mask.mode-global-abs-exact" / "run.json").read_text())
    base = swept / "variants" / "mask.mode-global-abs-exact"
    mft = read_mask_metadata(base / run["masks"]["mft"])
    random = read_mask_metadata(base / run["masks"]["random_mask"])
    assert random["removed"] == mft["removed"]
    local = {name: removed_count(math.prod(shape), 0.1) for name, shape in mft["shapes"].items()}
    assert mft["removed"] != local  # a global selection: the per-matrix counts are not the local ones


def test_rerun_is_cached_and_rewrites_the_same_table(swept, capsys):
    before = (swept / "sweep.json").read_bytes()
    capsys.readouterr()
    assert main(["sweep", str(SMOKE_SWEEP), "--out", str(swept), *AXES]) == 0
    out = capsys.readouterr().out
    assert "[running]" not in out and out.count("== variant") == 3
    assert (swept / "sweep.json").read_bytes() == before


def test_check_compares_every_variant_with_the_sweep_reference(swept, tmp_path, capsys):
    reference = tmp_path / "sweep-reference.json"
    assert main(["check", str(swept), "--reference", str(reference), "--update"]) == 0
    written = json.loads(reference.read_text())
    assert written["sweep"] == "smoke-sweep" and set(written["variants"]) == set(EXPECTED)
    assert all(v["metrics"] for v in written["variants"].values())
    capsys.readouterr()
    assert main(["check", str(swept), "--reference", str(reference)]) == 0
    count = sum(len(v["metrics"]) for v in written["variants"].values())
    assert f"ok: {count} metrics" in capsys.readouterr().out
    # one variant's metric moved past its tolerance, and a variant the folder lacks: both named, exit 1
    variant = written["variants"]["mft.learning_rate-0.05"]["metrics"][0]
    variant["value"] += variant["tolerance"] + 0.5
    written["variants"]["seed-9"] = written["variants"]["base"]
    reference.write_text(json.dumps(written))
    assert main(["check", str(swept), "--reference", str(reference)]) == 1
    out = capsys.readouterr().out
    assert f"REGRESSION mft.learning_rate-0.05: {variant['arm']}/" in out
    assert "REGRESSION seed-9: no report.json" in out
    # a run reference given for a sweep folder: one line, exit 2
    run_reference = tmp_path / "run.json"
    run_reference.write_text(json.dumps(written["variants"]["base"]))
    assert main(["check", str(swept), "--reference", str(run_reference)]) == 2
    assert "expected a sweep reference" in capsys.readouterr().err


def test_a_sweep_folder_in_use_or_of_another_sweep_is_refused(swept, tmp_path, capsys):
    with RunLock(swept):
        assert main(["sweep", str(SMOKE_SWEEP), "--out", str(swept), *AXES]) == 2
    assert "is in use by" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text(SMOKE_SWEEP.read_text().replace("name: smoke-sweep", "name: other-sweep"))
    assert main(["sweep", str(other), "--out", str(swept), *AXES]) == 2
    assert "holds sweep 'smoke-sweep', not 'other-sweep'" in capsys.readouterr().err


# ---------------------------------------------------------------- bad sweep files: one line, exit 2, nothing run

def _sweep_file(tmp_path: Path, axes=None, **block) -> Path:
    data = yaml.safe_load(SMOKE_SWEEP.read_text())
    if axes is not None:
        data["sweep"]["axes"] = axes
    data["sweep"].update(block)
    if "base" in block:  # the base recipe comes from that file: the top level keeps the name alone
        data = {"name": data["name"], "sweep": data["sweep"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("axes, block, message", [
    ({"mask.ratio": [0.2]}, {}, "sweep axis 'mask.ratio' is not a recipe key"),
    ({"mask.mask_ratio": []}, {}, "sweep axis 'mask.mask_ratio' has no values"),
    ({"mask.mask_ratio": 0.2}, {}, "sweep axis 'mask.mask_ratio' must be a list of values"),
    ({"mask.mask_ratio": [0.2, 1.5]}, {}, "sweep axis mask.mask_ratio=1.5"),
    ({"mask.mode": ["global"]}, {}, "'global' is ambiguous"),
    ({"mask.mask_ratio": [0.2, 0.2]}, {}, "lists 0.2 twice"),
    ({}, {}, "sweep.axes must map at least one"),
    (None, {"grid": {}}, "unknown key 'sweep.grid'"),
    (None, {"base": "missing.yaml"}, "sweep.base recipe not found"),
])
def test_bad_sweep_is_one_line_exit_2_before_anything_runs(tmp_path, capsys, axes, block, message):
    out = tmp_path / "out"
    code = main(["sweep", str(_sweep_file(tmp_path, axes, **block)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("mft-bench: error:") and message in err, err
    assert not out.exists()


def test_a_referenced_base_keeps_recipe_keys_out_of_the_top_level(tmp_path, capsys):
    data = yaml.safe_load(SMOKE_SWEEP.read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "sweep"}))
    data["sweep"]["base"] = "base.yaml"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    assert main(["sweep", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    assert "with sweep.base, recipe keys belong in sweep.set, not at the top level: arms" in capsys.readouterr().err
    referenced = {"name": "s", "sweep": {**data["sweep"], "set": {"mft.epochs": 2}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(referenced))
    sweep = load_sweep(tmp_path / "s.yaml", overrides=["fft.epochs=2"])
    assert sweep.base.name == "smoke-sweep" and sweep.base.mft.epochs == 2 and sweep.base.fft.epochs == 2
    assert all(v.recipe.mft.epochs == 2 for v in sweep.variants) and len(sweep.variants) == 5


def test_unknown_axis_on_the_command_line_and_a_sweep_run_as_a_recipe(tmp_path, capsys):
    assert main(["sweep", str(SMOKE_SWEEP), "--out", str(tmp_path / "o"), "--axis", "fft.epochs"]) == 2
    assert "has no such axis; its axes are mask.layers, mask.mask_ratio" in capsys.readouterr().err
    assert main(["run", str(SMOKE_SWEEP), "--out", str(tmp_path / "o")]) == 2
    assert "is a sweep file: run it with 'mft-bench sweep" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the paper's ablations and the table's cells

def test_paper_ablations_share_one_fft_across_every_variant(tmp_path, capsys):
    sweep = load_sweep(PAPER_ABLATIONS)
    assert sweep.base.mask.layers == [4, 5, 6, 7] and sweep.base.mft.learning_rate == 2e-5
    assert sweep.base.arms == ["pretrained", "fft", "mft", "random_mask"]
    assert set(sweep.axes) == {"mask.layers", "mask.mask_ratio", "mft.learning_rate", "mask.mode"}
    assert len(sweep.axes["mask.layers"]) == 8 and sweep.axes["mask.mode"] == [
        "local", "global-abs-exact", "global-signed-threshold"]
    assert main(["sweep", "paper/ablations/llama2-7b-math", "--dry-run", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"{len(sweep.variants)} variants" in out and "training runs: fft x1, mft x16" in out
    assert "mask.layers = 28-31" in out and not (tmp_path / "s").exists()


def test_table_cells_are_the_reports_numbers_in_percent(tmp_path):
    from fake_run import make_run

    entries = []
    for name, axis, value in (("base", None, None), ("mask.layers-4_5_6_7", "mask.layers", [4, 5, 6, 7])):
        run_dir = make_run(tmp_path / name)
        write_report(build_report(run_dir, n_bootstrap=200), run_dir)
        entries.append({"variant": name, "axis": axis, "value": value, "run_dir": run_dir})
    report = json.loads((tmp_path / "base" / "report.json").read_text())
    for selection, arm in (("last", "mft"), ("val", "mft@val")):
        rows, (benchmark, metric) = sweep_rows(entries, selection)
        assert (benchmark, metric) == ("gsm8k", "exact_match")
        expected = next(r for r in report["rows"]
                        if (r["arm"], r["benchmark"], r["metric"]) == (arm, benchmark, metric))
        delta = next(c for c in report["comparisons"] if (c["arm_a"], c["arm_b"], c["benchmark"], c["metric"])
                     == (arm, arm.replace("mft", "fft"), benchmark, metric))
        assert rows[0]["mft"] == pytest.approx(100 * expected["value"]) and rows[0]["mft"] > 0
        assert rows[0]["mft_ci_low"] == pytest.approx(100 * expected["ci_low"])
        assert rows[0]["delta_vs_fft"] == pytest.approx(100 * delta["diff"]) and rows[0]["delta_vs_fft"] != 0
        assert rows[0]["delta_vs_fft_significant"] == delta["significant"]
        # the random mask has one checkpoint: its comparison with MFT exists among the last checkpoints only
        assert (rows[0]["delta_vs_random"] is None) == (selection != "last")
    assert format_value([4, 5, 6, 7]) == "4-7" and format_value([0, 2]) == "0,2" and format_value(2e-5) == "2e-05"


def test_a_seed_axis_is_pooled_with_the_item_as_the_unit(tmp_path):
    """Three replicates that score alike are one seed's worth of evidence, not three: the pooled interval and test
    are the single seed's; only the items-fixed test counts the discordant pairs three times."""
    from fake_run import make_run

    from mft_bench.report.stats import mcnemar_exact_counts
    from mft_bench.report.sweep_table import write_sweep_table

    entries = []
    for name, axis, value in (("base", None, None), ("seed-1", "seed", 1), ("seed-2", "seed", 2),
                              ("mask.mask_ratio-0.2", "mask.mask_ratio", 0.2)):
        run_dir = make_run(tmp_path / name)
        write_report(build_report(run_dir, n_bootstrap=200), run_dir)
        entries.append({"variant": name, "axis": axis, "value": value, "run_dir": run_dir})
    reports = [json.loads((entry["run_dir"] / "report.json").read_text()) for entry in entries]
    one = next(c for c in reports[0]["comparisons"] if (c["arm_a"], c["arm_b"], c["benchmark"], c["metric"])
               == ("mft", "fft", "gsm8k", "exact_match"))
    assert one["discordant"] == 8 and one["p_value"] < 0.05  # make_run: MFT = FFT with 8 items fixed

    pooled = seed_pooled(entries, {"seed": 0, "mask.mask_ratio": 0.1}, reports, n_bootstrap=500)
    assert pooled["seeds"] == [0, 1, 2] and pooled["items"] == 300  # the other axis's variant is not a replicate
    vs_fft = next(c for c in pooled["comparisons"] if (c["arm_a"], c["arm_b"]) == ("mft", "fft"))
    assert (vs_fft["items"], vs_fft["seeds"], vs_fft["test"]) == (300, 3, "mcnemar")
    assert vs_fft["p_value"] == pytest.approx(one["p_value"]) and vs_fft["significant"]
    assert vs_fft["items_fixed"]["p_value"] == mcnemar_exact_counts(24, 0).p_value < vs_fft["p_value"]
    assert vs_fft["per_seed"] == pytest.approx([100 * one["diff"]] * 3) and vs_fft["seeds_same_sign"] == 3
    assert all("@" not in c["arm_a"] + c["arm_b"] for c in pooled["comparisons"])  # last checkpoints only
    mft = next(a for a in pooled["arms"] if a["arm"] == "mft")
    cell = next(r for r in reports[0]["rows"]
                if (r["arm"], r["benchmark"], r["metric"]) == ("mft", "gsm8k", "exact_match"))
    assert (mft["items"], mft["seeds"]) == (300, 3) and mft["value"] == pytest.approx(100 * cell["value"])
    assert (mft["ci_low"], mft["ci_high"]) == pytest.approx((100 * cell["ci_low"], 100 * cell["ci_high"]))

    assert seed_pooled(entries[:1] + entries[3:], {"seed": 0}, reports[:1] + reports[3:]) is None  # no replicate
    assert seed_pooled(entries, {"mask.mask_ratio": 0.1}, reports) is None  # no seed axis
    write_sweep_table(entries, tmp_path / "table", sweep="seeds", base_recipe="fake",
                      base_values={"seed": 0, "mask.mask_ratio": 0.1})
    markdown = (tmp_path / "table" / "sweep.md").read_text()
    assert "## Pooled over seeds 0, 1, 2" in markdown and "| mft | fft | +2.7†" in markdown
    assert "| mft | " in markdown and " | 300 x 3 | " in markdown and "| 24 / 0, " in markdown
    assert json.loads((tmp_path / "table" / "sweep.json").read_text())["seed_pooled"]["comparisons"]


def _seed_runs(tmp_path, mft_extra_items):
    """Three seed variants of 40 items: pretrained and FFT right on items 0-9 in every seed, MFT on those and on
    ``mft_extra_items[seed]`` besides."""
    import numpy as np
    from fake_run import write_eval

    entries, reports = [], []
    for seed, extra in enumerate(mft_extra_items):
        run_dir = tmp_path / f"seed-{seed}"
        base = np.zeros(40)
        base[:10] = 1.0
        mft = base.copy()
        mft[list(extra)] = 1.0
        evaluations = [{"arm": arm, "checkpoint": "last", "step": None, "split": "test", "benchmark": "gsm8k",
                        **write_eval(run_dir, f"eval-{arm}", "gsm8k", "exact_match", {"exact_match": scores})}
                       for arm, scores in (("pretrained", base), ("fft", base), ("mft", mft))]
        (run_dir / "run.json").write_text(json.dumps({
            "recipe": "fake", "domain": "math", "backbone": "tiny", "arms": ["pretrained", "fft", "mft"],
            "evaluations": evaluations, "training": [], "masks": {}, "provenance": {}}))
        reports.append(build_report(run_dir, n_bootstrap=200))
        entries.append({"variant": "base" if seed == 0 else f"seed-{seed}", "axis": None if seed == 0 else "seed",
                        "value": None if seed == 0 else seed, "run_dir": run_dir})
    return entries, reports


def test_an_advantage_on_the_same_few_items_in_every_seed_is_not_tripled(tmp_path):
    from mft_bench.report.seed_pool import seed_pooled
    from mft_bench.report.stats import mcnemar_exact_counts

    entries, reports = _seed_runs(tmp_path / "same", [range(10, 15)] * 3)
    pooled = seed_pooled(entries, {"seed": 0}, reports, n_bootstrap=2000)
    vs_fft = next(c for c in pooled["comparisons"] if (c["arm_a"], c["arm_b"]) == ("mft", "fft"))
    # five items, the same five each time: as much evidence as one seed's 5 vs 0 (p = 0.0625)
    assert vs_fft["test"] == "mcnemar" and vs_fft["p_value"] == mcnemar_exact_counts(5, 0).p_value
    assert not vs_fft["significant"] and vs_fft["diff"] == pytest.approx(12.5)
    assert vs_fft["items_fixed"]["p_value"] == mcnemar_exact_counts(15, 0).p_value < 0.05  # what items-fixed says
    pretrained = next(a for a in pooled["arms"] if a["arm"] == "pretrained")
    assert pretrained["ci_method"] == "wilson" and pretrained["items"] == 40  # evaluated alike: 40 items, not 120

    # fifteen different items, five per seed: seed-averaged differences of 1/3, resampled over items
    entries, reports = _seed_runs(tmp_path / "rotating", [range(10, 15), range(15, 20), range(20, 25)])
    pooled = seed_pooled(entries, {"seed": 0}, reports, n_bootstrap=2000)
    vs_fft = next(c for c in pooled["comparisons"] if (c["arm_a"], c["arm_b"]) == ("mft", "fft"))
    assert vs_fft["test"] == "bootstrap" and vs_fft["diff"] == pytest.approx(12.5)
    assert vs_fft["significant"] and vs_fft["p_value"] < 0.01 and 0 < vs_fft["ci_low"] < 12.5 < vs_fft["ci_high"]
    mft = next(a for a in pooled["arms"] if a["arm"] == "mft")
    assert mft["ci_method"] == "bootstrap" and mft["value"] == pytest.approx(100 * (10 + 5) / 40)


def test_seed_variants_share_the_pretrained_evaluation_unless_it_samples(tmp_path, capsys):
    """Greedy decoding does not read the seed: the pretrained model is evaluated once for every seed; a sampled
    benchmark (temperature > 0) keeps one evaluation per seed."""
    from mft_bench.recipe import load_recipe
    from mft_bench.stages import build_plan

    recipe = load_recipe(ROOT / "tasks" / "smoke.yaml")
    sampled = [{"name": "humaneval", "limit": 2, "options": {"temperature": 0.8, "n_samples": 2}}]
    keys = {}
    for seed in (0, 1):
        for name, benchmarks in (("greedy", None), ("sampled", sampled)):
            data = recipe.model_dump(mode="json")
            data["seed"] = seed
            if benchmarks:
                data["evaluation"]["benchmarks"] = benchmarks
            variant = type(recipe).model_validate(data)
            stages = build_plan(variant, tmp_path / f"{name}-{seed}")
            keys[name, seed] = {s.name: s.hash for s in stages if s.kind == "eval" and s.arm in ("pretrained", "fft")}
            assert keys[name, seed]
    for name in ("greedy", "sampled"):
        pretrained = [n for n in keys[name, 0] if n.startswith("eval-pretrained")]
        same = [n for n in keys[name, 0] if keys[name, 0][n] == keys[name, 1][n]]
        # FFT trained with another seed is another model: its evaluations differ by seed either way
        assert same == (pretrained if name == "greedy" else [])
