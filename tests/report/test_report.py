"""build_report / write_report / write_paper_table on a fake run folder (no model needed)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mft_bench.errors import MftBenchError
from mft_bench.report import build_report, write_paper_table, write_report
from mft_bench.atomic import dumps_json
from mft_bench.report.plots import mask_stats_frame, overlap_value, plot_mask_frames

from fake_run import ARMS, N_GSM8K, make_run, scores, write_eval

@pytest.fixture(scope="module")
def run_and_report(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("run") / "fake")
    return run_dir, build_report(run_dir, n_bootstrap=2000, seed=0)


@pytest.fixture(scope="module")
def written(run_and_report):
    run_dir, report = run_and_report
    return write_report(report, run_dir)


def _row(report, arm, benchmark, metric):
    return next(r for r in report["rows"] if (r["arm"], r["benchmark"], r["metric"]) == (arm, benchmark, metric))


def _cmp(report, a, b, benchmark, metric):
    return next(c for c in report["comparisons"]
                if (c["arm_a"], c["arm_b"], c["benchmark"], c["metric"]) == (a, b, benchmark, metric))


def test_rows_have_contract_fields_and_methods(run_and_report):
    _, report = run_and_report
    for row in report["rows"]:
        assert {"arm", "benchmark", "metric", "value", "n", "ci_low", "ci_high"} <= set(row)
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
    gsm = _row(report, "fft", "gsm8k", "exact_match")
    assert gsm["n"] == N_GSM8K and gsm["ci_method"] == "wilson"
    assert _row(report, "fft", "ifeval", "inst_level_strict_acc")["ci_method"] == "bootstrap"
    assert _row(report, "fft", "ifeval", "prompt_level_strict_acc")["ci_method"] == "wilson"
    assert set(report["provenance"]) >= {"git_commit", "packages", "data_hashes", "prompt_versions"}
    assert report["provenance"]["git_commit"] == "deadbeef"


def test_comparisons_cover_every_arm_vs_fft_and_mft_vs_every_arm(run_and_report):
    _, report = run_and_report
    pairs = {(c["arm_a"], c["arm_b"]) for c in report["comparisons"] if c["benchmark"] == "gsm8k"}
    assert {(arm, "fft") for arm in ARMS if arm != "fft"} <= pairs
    assert {("mft", arm) for arm in ARMS if arm not in ("mft", "fft")} <= pairs
    assert ("fft", "mft") not in pairs
    mft_fft = _cmp(report, "mft", "fft", "gsm8k", "exact_match")
    assert mft_fft["diff"] == pytest.approx(8 / N_GSM8K)
    assert mft_fft["test"] == "mcnemar" and mft_fft["discordant"] == 8
    assert mft_fft["p_value"] == pytest.approx(2 / 2 ** 8) and mft_fft["significant"]
    base = _cmp(report, "pretrained", "fft", "gsm8k", "exact_match")
    assert base["diff"] < 0 and base["significant"] and base["ci_high"] < 0
    inst = _cmp(report, "mft", "fft", "ifeval", "inst_level_strict_acc")
    assert inst["test"] == "bootstrap"
    assert inst["significant"] == (inst["ci_low"] > 0 or inst["ci_high"] < 0)


def test_validation_selected_rows(run_and_report):
    _, report = run_and_report
    assert report["selection"]["fft"]["checkpoint"] == "step-20"  # tie with "last" -> earliest
    assert report["selection"]["mft"]["checkpoint"] == "last"
    arms = {r["arm"] for r in report["rows"]}
    assert {"fft@val", "mft@val"} <= arms and "lora@val" not in arms
    selected = _row(report, "fft@val", "gsm8k", "exact_match")
    last = _row(report, "fft", "gsm8k", "exact_match")
    assert selected["value"] != last["value"]
    mft_selected = _row(report, "mft@val", "gsm8k", "exact_match")
    assert mft_selected["value"] == _row(report, "mft", "gsm8k", "exact_match")["value"]
    assert any(c["arm_a"] == "mft@val" and c["arm_b"] == "fft@val" for c in report["comparisons"])
    # plain rows are the test numbers of the last checkpoint, never a validation evaluation
    assert all(r["n"] != 40 for r in report["rows"])


def test_resolution_says_whether_two_points_are_resolvable(run_and_report):
    _, report = run_and_report
    gsm = next(e for e in report["resolution"] if e["benchmark"] == "gsm8k")
    assert gsm["arm_a"] == "mft" and gsm["arm_b"] == "fft" and gsm["discordant"] == 8
    assert gsm["min_net_items"] == 8 and gsm["floor_items"] == 6
    assert gsm["two_point_resolvable"] is False  # 8/300 = 2.7 points needed
    from mft_bench.report.build import resolution_entry

    humaneval = resolution_entry("humaneval", "pass@1", 164, None, confidence=0.95)
    assert humaneval["floor_diff"] == pytest.approx(6 / 164) and not humaneval["two_point_resolvable"]


def test_resolution_lines_count_discordant_items_in_words():
    from mft_bench.report.tables import resolution_lines

    def line(discordant, min_net_items):
        entry = {"benchmark": "gsm8k", "metric": "exact_match", "n": 16, "discordant": discordant,
                 "min_net_items": min_net_items, "two_point_resolvable": False}
        return resolution_lines({"resolution": [entry]})[0]

    assert "only 1 discordant item, too few for any split to be significant;" in line(1, None)
    assert "with 8 discordant items McNemar needs a net gain of ≥8 items" in line(8, 8)


def test_report_is_deterministic_and_written_in_all_formats(run_and_report, written):
    run_dir, report = run_and_report
    again = build_report(run_dir, n_bootstrap=2000, seed=0)
    names = {p.name for p in written}
    assert {"report.json", "report.md", "report.csv", "report.tex"} <= names
    assert {"metrics.png", "metrics.svg", "training.png", "training.svg"} <= names
    assert all(p.stat().st_size > 0 for p in written)
    first = (run_dir / "report.json").read_bytes()
    assert dumps_json(again).encode() == first  # what write_report writes, byte for byte
    assert json.loads(first)["rows"] == report["rows"]
    markdown = (run_dir / "report.md").read_text()
    assert "| pretrained |" in markdown and "fft (val-selected)" in markdown
    assert "†" in markdown and "gsm8k (paper)" in markdown and "46.9" in markdown
    assert "NOT resolvable" in markdown
    assert "## Code execution" not in markdown  # no code benchmark in this run
    csv = pd.read_csv(run_dir / "report.csv")
    assert len(csv) == len(report["rows"])
    assert csv.loc[(csv.arm == "fft") & (csv.metric == "exact_match"), "paper_value"].iloc[0] == pytest.approx(0.469)
    tex = (run_dir / "report.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "exact\\_match" in tex
    assert not list(run_dir.glob(".*.tmp"))


def test_paper_table_across_recipes(run_and_report, written, tmp_path):
    run_dir, report = run_and_report
    other = make_run(tmp_path / "other", checkpoints=False, paper_key=None)
    written = write_paper_table([run_dir, other], tmp_path / "out")
    assert {p.suffix for p in written} == {".md", ".csv", ".tex", ".json"}
    rows = json.loads((tmp_path / "out" / "paper_table.json").read_text())["rows"]
    assert len(rows) == 14  # 7 arm columns x 2 runs
    mft = next(r for r in rows if r["recipe"] == "fake" and r["arm"] == "mft" and r["paper_value"] is not None)
    assert mft["paper_value"] == 47.3 and mft["paper_delta_vs_fft"] == pytest.approx(0.4)
    assert mft["delta_vs_fft"] == pytest.approx(100 * 8 / N_GSM8K)
    assert mft["paper_selection"] == "test-selected" and mft["paper_read_off"] is False
    # the paper's L1 mask is structured: its number stands under l1_mask, not beside our unstructured magnitude mask
    by_arm = {r["arm"]: r for r in rows[:7]}  # the first run's block (the other run names no paper)
    assert by_arm["l1_mask"]["paper_value"] == 31.9 and by_arm["magnitude_mask"]["paper_value"] is None
    markdown = (tmp_path / "out" / "paper_table.md").read_text()
    assert markdown.count("| paper (test-selected) |") == 1 and "47.3 (+0.4)" in markdown
    assert "L1 mask (rows)" in markdown


def test_paper_table_marks_read_off_numbers(tmp_path):
    run_dir = make_run(tmp_path / "run31", checkpoints=False, paper_key="llama3.1-8b")
    write_paper_table([run_dir], tmp_path / "out")
    rows = json.loads((tmp_path / "out" / "paper_table.json").read_text())["rows"]
    pretrained = next(r for r in rows if r["arm"] == "pretrained")
    assert pretrained["paper_value"] == 55.9 and pretrained["paper_read_off"] is True
    markdown = (tmp_path / "out" / "paper_table.md").read_text()
    assert "≈55.9 (-21.1)" in markdown and "| 77.0 |" in markdown and "paper (test-selected)" in markdown
    assert "$\\approx$55.9" in (tmp_path / "out" / "paper_table.tex").read_text()
    run_report = build_report(run_dir)
    assert run_report["paper"]["selection"] == "test-selected"
    write_report(run_report, run_dir)
    assert "≈55.9" in (run_dir / "report.md").read_text() and "checkpoints test-selected" in (
        run_dir / "report.md").read_text()
    assert "$\\approx$55.9" in (run_dir / "report.tex").read_text()


def test_shipped_paper_files_load_with_their_sources():
    from mft_bench.report.paper_numbers import load_paper_numbers
    from mft_bench.resources import paper_numbers_dir

    shipped = sorted(p.stem for p in paper_numbers_dir().glob("*.json"))
    assert shipped == ["llama2-7b", "llama3.1-8b"]
    for key in shipped:
        data = load_paper_numbers(key)
        assert data["key"] == key and data["selection"] == "test-selected" and data["source"]["commit"]
        assert set(data["domains"]) == {"math", "coding", "instruction"}
        for entry in data["domains"].values():
            assert set(entry["values"]) == {"pretrained", "fft", "lora", "random_mask", "l1_mask", "mft"}
            assert entry["source"]
        assert data["abstract"]["domain"] == "coding"
    llama2, llama31 = load_paper_numbers("llama2-7b"), load_paper_numbers("llama3.1-8b")
    assert llama2["abstract"]["mft_gain_vs_fft"] == 1.95 and llama31["abstract"]["mft_gain_vs_fft"] == 1.88
    rerun = llama2["domains"]["instruction"]["official_readme"]["benchmarks"]["ifeval"]
    assert rerun["fft"] == 35.7 and rerun["mft"] == 40.9
    assert all(entry.get("read_off") == ["pretrained"] for entry in llama31["domains"].values())
    assert {d: e["values"]["mft"] for d, e in llama31["domains"].items()} == {
        "math": 77.3, "coding": 53.7, "instruction": 65.8}
    notes = " ".join(llama2["notes"]) + " ".join(llama31["notes"])
    assert "same count" not in notes and "GSM8K 8-shot" in llama2["source"]["evaluation"]
    assert "never published" in notes


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("domains"), "non-empty 'domains'"),
    (lambda d: d.update(selection="best"), "selection must be one of last, val, test-selected"),
    (lambda d: d["domains"]["math"]["values"].update(dpo=1.0), r"domains\.math\.values: unknown arm\(s\) dpo"),
    (lambda d: d["domains"]["math"]["values"].update(fft="46.9"), r"domains\.math\.values\.fft must be a number"),
    (lambda d: d["domains"]["math"].update(read_off=["dpo"]), r"domains\.math\.read_off must list arms"),
    (lambda d: d["domains"]["instruction"]["official_readme"].pop("benchmarks"), "needs a 'benchmarks' mapping"),
    (lambda d: d.update(notes="one"), "notes must be a list of strings"),
    (lambda d: d["abstract"].update(mft_gain_vs_fft=None), r"abstract\.mft_gain_vs_fft must be a number"),
])
def test_malformed_paper_file_is_a_one_line_error(tmp_path, change, message):
    from mft_bench.report.paper_numbers import load_paper_numbers
    from mft_bench.resources import paper_numbers_dir

    data = json.loads((paper_numbers_dir() / "llama2-7b.json").read_text())
    change(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(MftBenchError, match=message) as error:
        load_paper_numbers("bad", tmp_path)
    assert "\n" not in str(error.value) and "bad.json" in str(error.value)


def test_missing_run_json_is_a_user_error(tmp_path):
    with pytest.raises(MftBenchError, match="run.json"):
        build_report(tmp_path)


def test_mask_plot_from_statistics(tmp_path):
    stats = {"model.layers.4.self_attn.q_proj": {"removed": 10, "numel": 100},
             "model.layers.4.mlp.up_proj": 0.1, "model.layers.5.self_attn.q_proj": {"removed_fraction": 0.2}}
    frame = mask_stats_frame(stats)
    assert list(frame["layer"]) == [4, 4, 5] and list(frame["module"]) == ["q_proj", "up_proj", "q_proj"]
    assert frame["removed_fraction"].tolist() == pytest.approx([0.1, 0.1, 0.2])
    assert overlap_value({"jaccard": 0.3}) == 0.3 and overlap_value(0.5) == 0.5
    written = plot_mask_frames(frame, {"random_mask": 0.1, "magnitude_mask": 0.4}, tmp_path)
    assert sorted(p.name for p in written) == ["masks.png", "masks.svg"]
    assert all(p.stat().st_size > 0 for p in written)


def test_mask_plot_from_mask_files(tmp_path):
    torch = pytest.importorskip("torch")
    try:
        import mft_bench.masking.stats  # noqa: F401
        from mft_bench.masking.mask_io import save_masks
    except ImportError:
        pytest.skip("mft_bench.masking not available")
    from mft_bench.report.collect import load_run
    from mft_bench.report.plots import plot_mask_statistics

    run_dir = make_run(tmp_path / "run", checkpoints=False)
    generator = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.{m}" for i in (4, 5) for m in ("self_attn.q_proj", "mlp.up_proj")]
    masks = {arm: {n: torch.rand(8, 16, generator=generator) > 0.1 for n in names}
             for arm in ("mft", "random_mask", "magnitude_mask")}
    run = json.loads((run_dir / "run.json").read_text())
    for arm, arm_masks in masks.items():
        save_masks(arm_masks, run_dir / "stages" / f"{arm}.safetensors")
        run["masks"][arm] = f"stages/{arm}.safetensors"
    (run_dir / "run.json").write_text(json.dumps(run))
    written = plot_mask_statistics(load_run(run_dir), tmp_path / "plots")
    assert sorted(p.name for p in written) == ["masks.png", "masks.svg"]
    assert all(p.stat().st_size > 0 for p in written)


def test_plots_redrawn_only_when_what_they_show_changes(run_and_report, written, monkeypatch):
    from mft_bench.report import plots

    run_dir, report = run_and_report
    drawn = []
    real = plots.write_plots
    monkeypatch.setattr(plots, "write_plots", lambda *a, **k: drawn.append(1) or real(*a, **k))
    again = write_report(report, run_dir)
    assert drawn == [] and sorted(map(str, again)) == sorted(map(str, written))  # unchanged: same files, not redrawn
    (run_dir / "plots" / "metrics.png").unlink()
    write_report(report, run_dir)
    assert drawn == [1] and (run_dir / "plots" / "metrics.png").is_file()  # a missing figure is redrawn
    changed = dict(report, rows=report["rows"][:-1])
    write_report(changed, run_dir)
    assert drawn == [1, 1]  # different content: redrawn
    write_report(report, run_dir)  # leave the fixture's run folder as it was


def test_report_markdown_says_what_each_metric_is():
    from mft_bench.report.tables import metric_note_lines

    rows = [{"benchmark": b, "metric": m} for b, m in [("gsm8k", "exact_match_flexible"),
                                                       ("gsm8k", "exact_match_strict"),
                                                       ("lm_eval:gsm8k_local", "exact_match,strict-match")]]
    lines = metric_note_lines({"rows": rows})
    assert lines[:2] == ["", "Metrics (README, 'Metrics'):"]
    assert any(line.startswith("- gsm8k:exact_match_strict:") and "not lm-eval's strict-match" in line
               for line in lines)
    assert any(line.startswith("- gsm8k:exact_match_flexible:") and "OLMES" in line for line in lines)
    assert not any("lm_eval:" in line for line in lines)  # lm-eval's metrics are lm-eval's own
    assert metric_note_lines({"rows": [{"benchmark": "humaneval", "metric": "pass@1"}]}) == []


def test_report_names_the_sandbox_isolation_of_every_code_benchmark(tmp_path):
    run_dir = make_run(tmp_path / "run", checkpoints=False, paper_key=None)
    run = json.loads((run_dir / "run.json").read_text())
    for k, arm in enumerate(ARMS):
        entry = write_eval(run_dir, f"eval-{arm}-humaneval", "humaneval", "pass@1",
                            {"pass@1": scores(0.3, 40, 200 + k)})
        metrics_path = run_dir / entry["metrics"]
        metrics = json.loads(metrics_path.read_text())
        metrics["isolation"] = "rlimits" if arm == "lora" else "namespace"
        metrics_path.write_text(json.dumps(metrics))
        run["evaluations"].append({"arm": arm, "checkpoint": "last", "split": "test", "benchmark": "humaneval",
                                   **entry})
    (run_dir / "run.json").write_text(json.dumps(run))
    report = build_report(run_dir, n_bootstrap=200, seed=0)
    assert report["benchmarks"]["humaneval"]["isolation"] == {
        arm: "rlimits" if arm == "lora" else "namespace" for arm in ARMS}
    assert "isolation" not in report["benchmarks"]["gsm8k"]  # nothing ran code there: nothing to say
    write_report(report, run_dir)
    markdown = (run_dir / "report.md").read_text()
    assert "## Code execution" in markdown
    assert "- humaneval: namespace (pretrained, fft, mft, random_mask, magnitude_mask), rlimits (lora)" in markdown


def test_test_selected_rows_only_when_asked_labelled_and_beside_the_paper(tmp_path):
    """Where the run asked for it, each trained arm gets a row of its checkpoint best on the test benchmark itself
    (per benchmark; ties -> earliest); it is labelled wherever shown and is what the paper table sets beside the
    paper's (test-selected) numbers; without the flag there is no such row."""
    plain = build_report(make_run(tmp_path / "plain"), n_bootstrap=200, seed=0)
    assert not any(r["arm"].endswith("@test") for r in plain["rows"]) and "test_selection" not in plain
    run_dir = make_run(tmp_path / "asked")
    run = json.loads((run_dir / "run.json").read_text())
    run["test_selected"] = True
    (run_dir / "run.json").write_text(json.dumps(run))
    report = build_report(run_dir, n_bootstrap=200, seed=0)
    rows = {(r["arm"], r["benchmark"], r["metric"]): r for r in report["rows"]}
    # fft on gsm8k: steps 10 and 20 score ~0.2-0.25 on test, last ~0.45 -> last; mft: its last is FFT's + 8 items
    assert report["test_selection"]["fft"]["gsm8k"]["checkpoint"] == "last"
    assert rows[("mft@test", "gsm8k", "exact_match")]["value"] == rows[("mft", "gsm8k", "exact_match")]["value"]
    assert ("lora@test", "gsm8k", "exact_match") not in rows  # one checkpoint: nothing was selected
    assert any(c["arm_a"] == "mft@test" and c["arm_b"] == "fft@test" for c in report["comparisons"])
    write_report(report, run_dir)
    markdown = (run_dir / "report.md").read_text()
    assert "| mft (test-selected‡) |" in markdown and "## Test-selected checkpoints" in markdown
    write_paper_table([run_dir], tmp_path / "out")
    table = json.loads((tmp_path / "out" / "paper_table.json").read_text())["rows"]
    assert {r["selection"] for r in table} == {"test-selected"}
    assert "ours (fake, tiny; test-selected‡)" in (tmp_path / "out" / "paper_table.md").read_text()
    write_paper_table([make_run(tmp_path / "last", paper_key="llama2-7b")], tmp_path / "out2")
    assert "ours (fake, tiny; last checkpoint)" in (tmp_path / "out2" / "paper_table.md").read_text()
