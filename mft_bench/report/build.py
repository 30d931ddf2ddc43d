"""Build the report of one run (``report.json``) and write it with its tables and plots.

Rows: one per (arm, benchmark, metric) for every arm's last checkpoint, and, when intermediate
checkpoints were evaluated on the validation split, one more family ``"<arm>@val"`` with the TEST
numbers of the validation-selected checkpoint (see :func:`mft_bench.report.collect.select_by_validation`). Where the
recipe asks for it (``evaluation.test_selected``), a family ``"<arm>@test"``: per benchmark, the checkpoint best on
that test benchmark itself, the paper's protocol, optimistic and labelled so wherever it is shown.

Comparisons (paired, on the intersection of item ids) within each family: every arm vs ``fft`` and
``mft`` vs every other arm, for every metric with item-level scores in both arms (see
:func:`mft_bench.report.stats.compare_paired` for the test used).

``resolution``: per benchmark (primary metric), how large a difference this run can resolve, taken
from the MFT-vs-FFT pairing: the paired-CI half-width, the net item gain McNemar needs given the
observed discordant items, and the floor (no item going the other way) — e.g. HumanEval, n=164:
at best 6 items = 3.7 points, so a 2-point gain is never resolvable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mft_bench.atomic import dumps_json, write_text_atomic
from mft_bench.report import stats
from mft_bench.report.collect import (
    SELECTION_SUFFIXES,
    TEST_SUFFIX,
    VAL_SUFFIX,
    Evaluation,
    RunData,
    evaluations_at,
    last_test_evaluations,
    load_run,
    select_by_test,
    select_by_validation,
    split_arm,
)
from mft_bench.report.paper_numbers import load_paper_numbers

log = logging.getLogger(__name__)

REFERENCE_ARM = "fft"
METHOD_ARM = "mft"
PROVENANCE_KEYS = ("git_commit", "packages", "data_hashes", "prompt_versions")
TWO_POINTS = 0.02


def _metric_order(evaluation: Evaluation) -> list[str]:
    others = sorted(name for name in evaluation.metrics if name != evaluation.primary_metric)
    return [evaluation.primary_metric, *others] if evaluation.primary_metric in evaluation.metrics else others


def _row(
    arm: str, evaluation: Evaluation, metric: str, *, confidence: float, n_bootstrap: int, seed: int
) -> dict[str, Any]:
    scores = evaluation.item_scores(metric)
    summary = evaluation.metrics.get(metric, {})
    if scores:
        values = np.array([scores[item] for item in sorted(scores)], dtype=float)
        cell = stats.estimate_cell(values, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)
        reported = summary.get("mean")
        if reported is not None and abs(float(reported) - cell.value) > 1e-6:
            log.warning(
                "%s/%s/%s: metrics.json mean %.6f differs from the records' mean %.6f (using the records)",
                arm, evaluation.benchmark, metric, float(reported), cell.value,
            )
        value, n, low, high, method = cell.value, cell.n, cell.ci_low, cell.ci_high, cell.method
    else:  # no item-level scores (e.g. an lm-eval aggregate): normal interval from the reported stderr
        value = float(summary.get("mean", float("nan")))
        stderr = summary.get("stderr")
        n = evaluation.n
        if stderr is None or not np.isfinite(float(stderr)):
            low = high = value
            method = "none"
        else:
            half = stats.z_value(confidence) * float(stderr)
            low, high, method = value - half, value + half, "normal"
    return {
        "arm": arm,
        "benchmark": evaluation.benchmark,
        "metric": metric,
        "value": value,
        "n": int(n),
        "ci_low": float(low),
        "ci_high": float(high),
        "ci_method": method,
    }


def _families(run: RunData) -> tuple[list[tuple[str, dict[str, Evaluation]]], dict[str, Any], dict[str, Any]]:
    """[(row arm name, benchmark -> evaluation)] for last checkpoints, then "@val" ones, then "@test" ones (where
    the run asked for them); the validation selections; the test selections."""
    last: list[tuple[str, dict[str, Evaluation]]] = []
    selected: list[tuple[str, dict[str, Evaluation]]] = []
    test_selected: list[tuple[str, dict[str, Evaluation]]] = []
    selection: dict[str, Any] = {}
    test_selection: dict[str, Any] = {}
    for arm in run.arms:
        evaluations = last_test_evaluations(run, arm)
        if evaluations:
            last.append((arm, evaluations))
        else:
            log.warning("arm %s has no test evaluations; it gets no row", arm)
        chosen = select_by_validation(run, arm)
        if chosen is not None:
            selected.append((arm + VAL_SUFFIX, evaluations_at(run, arm, chosen.checkpoint)))
            selection[arm] = {
                "checkpoint": chosen.checkpoint,
                "step": chosen.step,
                "validation_score": chosen.score,
                "validation_benchmarks": chosen.benchmarks,
                "candidates": chosen.candidates,
                "rule": "best mean validation primary metric; ties -> earliest checkpoint",
            }
        best_on_test = select_by_test(run, arm) if run.raw.get("test_selected") else {}
        if best_on_test:
            test_selected.append((arm + TEST_SUFFIX, best_on_test))
            test_selection[arm] = {bench: {"checkpoint": e.checkpoint, "step": e.step}
                                   for bench, e in best_on_test.items()}
    return last + selected + test_selected, selection, test_selection


def _pairs(arms: list[str], suffix: str) -> list[tuple[str, str]]:
    """Every arm vs FFT, then MFT vs every other arm (within one family of row names)."""
    reference, method = REFERENCE_ARM + suffix, METHOD_ARM + suffix
    pairs: list[tuple[str, str]] = []
    if reference in arms:
        pairs += [(arm, reference) for arm in arms if arm != reference]
    if method in arms:
        pairs += [(method, arm) for arm in arms if arm not in (method, reference)]
    return pairs


def _compare(
    a: Evaluation, b: Evaluation, metric: str, *, confidence: float, n_bootstrap: int, seed: int
) -> tuple[stats.PairedDifference, int] | None:
    left, right = a.item_scores(metric), b.item_scores(metric)
    common = sorted(set(left) & set(right))
    if not common:
        return None
    if len(common) < max(len(left), len(right)):
        log.info("%s: pairing %s vs %s on %d shared items of %d/%d",
                 a.benchmark, a.arm, b.arm, len(common), len(left), len(right))
    result = stats.compare_paired(
        np.array([left[i] for i in common]), np.array([right[i] for i in common]),
        confidence=confidence, n_bootstrap=n_bootstrap, seed=seed,
    )
    return result, len(common)


def _comparisons(
    families: list[tuple[str, dict[str, Evaluation]]], *, confidence: float, n_bootstrap: int, seed: int
) -> list[dict[str, Any]]:
    by_arm = dict(families)
    pairs = []
    for selection, suffix in SELECTION_SUFFIXES.items():  # comparisons stay within one selection
        pairs += _pairs([arm for arm, _ in families if split_arm(arm)[1] == selection], suffix)
    out: list[dict[str, Any]] = []
    for arm_a, arm_b in pairs:
        for benchmark, evaluation_a in by_arm[arm_a].items():
            evaluation_b = by_arm[arm_b].get(benchmark)
            if evaluation_b is None:
                continue
            for metric in _metric_order(evaluation_a):
                compared = _compare(evaluation_a, evaluation_b, metric,
                                    confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)
                if compared is None:
                    continue
                result, n = compared
                out.append({
                    "arm_a": arm_a, "arm_b": arm_b, "benchmark": benchmark, "metric": metric,
                    "diff": result.diff, "ci_low": result.ci_low, "ci_high": result.ci_high,
                    "p_value": result.p_value, "significant": bool(result.significant),
                    "n": n, "test": result.test, "discordant": result.discordant,
                })
    return out


def resolution_entry(
    benchmark: str, metric: str, n: int, comparison: dict[str, Any] | None, *, confidence: float
) -> dict[str, Any]:
    """How large a difference on this benchmark the run can resolve (see the module docstring)."""
    alpha = 1.0 - confidence
    entry: dict[str, Any] = {"benchmark": benchmark, "metric": metric, "n": n, "alpha": alpha,
                             "floor_items": stats.mcnemar_floor(alpha)}
    entry["floor_diff"] = entry["floor_items"] / n if n else None
    entry.update({"arm_a": None, "arm_b": None, "paired_ci_half_width": None, "discordant": None,
                  "min_net_items": None, "min_detectable_diff": None})
    if comparison is not None:
        entry.update({"arm_a": comparison["arm_a"], "arm_b": comparison["arm_b"], "n": comparison["n"],
                      "paired_ci_half_width": (comparison["ci_high"] - comparison["ci_low"]) / 2.0})
        n = comparison["n"]
        entry["floor_diff"] = entry["floor_items"] / n
        if comparison["test"] == "mcnemar":
            discordant = int(comparison["discordant"])
            net = stats.mcnemar_min_net_gain(discordant, alpha)
            entry["discordant"] = discordant
            entry["min_net_items"] = net
            # too few discordant items: a real gain would also add discordant items, so at least the floor
            entry["min_detectable_diff"] = (net if net is not None else entry["floor_items"]) / n
        else:
            entry["min_detectable_diff"] = entry["paired_ci_half_width"]
    bound = entry["min_detectable_diff"] if entry["min_detectable_diff"] is not None else entry["floor_diff"]
    entry["two_point_resolvable"] = bool(bound is not None and bound <= TWO_POINTS + 1e-12)
    return entry


def _resolution(
    families: list[tuple[str, dict[str, Evaluation]]], comparisons: list[dict[str, Any]], *, confidence: float
) -> list[dict[str, Any]]:
    benchmarks: dict[str, Evaluation] = {}
    for _, evaluations in families:
        for benchmark, evaluation in evaluations.items():
            benchmarks.setdefault(benchmark, evaluation)
    out = []
    for benchmark, evaluation in benchmarks.items():
        metric = evaluation.primary_metric
        match = next((c for c in comparisons if c["benchmark"] == benchmark and c["metric"] == metric
                      and c["arm_a"] == METHOD_ARM and c["arm_b"] == REFERENCE_ARM), None)
        if match is None:
            match = next((c for c in comparisons if c["benchmark"] == benchmark and c["metric"] == metric), None)
        n = evaluation.n or len(evaluation.scores)
        out.append(resolution_entry(benchmark, metric, n, match, confidence=confidence))
    return out


def build_report(run_dir: Path, *, confidence: float = 0.95, n_bootstrap: int = 10_000, seed: int = 0) -> dict:
    """The ``report.json`` structure of one run folder (deterministic for a given seed)."""
    run = load_run(Path(run_dir))
    families, selection, test_selection = _families(run)
    settings = {"confidence": confidence, "n_bootstrap": n_bootstrap, "seed": seed}
    rows = [
        _row(arm, evaluation, metric, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)
        for arm, evaluations in families
        for evaluation in evaluations.values()
        for metric in _metric_order(evaluation)
    ]
    dropped = [r for r in rows if not math.isfinite(r["value"])]
    for r in dropped:
        log.warning("%s/%s/%s has no value (no records, no mean); left out", r["arm"], r["benchmark"], r["metric"])
    rows = [r for r in rows if math.isfinite(r["value"])]
    comparisons = _comparisons(families, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)
    benchmarks: dict[str, dict[str, Any]] = {}
    for _, evaluations in families:
        for benchmark, evaluation in evaluations.items():
            benchmarks.setdefault(benchmark, {"primary_metric": evaluation.primary_metric, "n": evaluation.n,
                                              "versions": evaluation.versions})
    for arm, evaluations in families:  # code benchmarks: the sandbox level of every arm's run
        for benchmark, evaluation in evaluations.items():
            if evaluation.isolation is not None:
                benchmarks[benchmark].setdefault("isolation", {})[arm] = evaluation.isolation
    provenance = {key: run.provenance.get(key, "" if key == "git_commit" else {}) for key in PROVENANCE_KEYS}
    provenance.update({k: v for k, v in run.provenance.items() if k not in provenance})
    report: dict[str, Any] = {
        "recipe": run.recipe,
        "recipe_hash": run.raw.get("recipe_hash"),
        "domain": run.domain,
        "backbone": run.backbone,
        "paper_key": run.paper_key,
        "deterministic": bool(run.raw.get("deterministic", False)),
        "settings": settings,
        "benchmarks": benchmarks,
        "rows": rows,
        "comparisons": comparisons,
        "resolution": _resolution(families, comparisons, confidence=confidence),
        "selection": selection,
        "provenance": provenance,
        "paper": None,
    }
    if test_selection:  # only in runs that asked for it (the key is absent otherwise)
        report["test_selection"] = test_selection
    starts = run.raw.get("mask_start") or {}
    if any(start.get("from", "last") != "last" for start in starts.values()):
        report["mask_start"] = starts
    if run.paper_key:
        paper = load_paper_numbers(run.paper_key)
        if paper is None:
            log.warning("paper_key %r: no numbers in results/paper/; the table shows ours only", run.paper_key)
        else:
            domain = (paper.get("domains") or {}).get(run.domain or "")
            report["paper"] = {"key": run.paper_key, "model": paper.get("model"), "source": paper.get("source"),
                               "selection": paper.get("selection"), "domain": run.domain, "entry": domain}
    return report


def write_report(report: dict, run_dir: Path) -> list[Path]:
    """Write report.json, report.md, report.csv, report.tex and plots/*.png|svg into the run folder."""
    from mft_bench.report.tables import write_tables

    run_dir = Path(run_dir)
    written = [write_text_atomic(run_dir / "report.json", dumps_json(report))]
    written += write_tables(report, run_dir, stem="report")
    run = load_run(run_dir) if (run_dir / "run.json").is_file() else None
    written += _plots_unless_unchanged(report, run, run_dir)
    return written


PLOTS_STAMP = ".inputs.json"


def _plots_unless_unchanged(report: dict, run: RunData | None, run_dir: Path) -> list[Path]:
    """The figures, redrawn only when what they show changed, so a warm rerun of a finished recipe costs
    imports and hashing rather than redrawing identical plots (``benchmarks/README.md``, End to end). Key: the
    report, run.json (which names the content-addressed stage folders the mask plots read) and the plotting code
    itself."""
    from mft_bench.report import plots

    out_dir = run_dir / "plots"
    digest = hashlib.sha256(dumps_json(report).encode())
    for path in (run_dir / "run.json", Path(plots.__file__)):
        digest.update(path.read_bytes() if path.is_file() else b"-")
    key = digest.hexdigest()
    stamp = out_dir / PLOTS_STAMP
    if stamp.is_file():
        previous = json.loads(stamp.read_text())
        files = [out_dir / name for name in previous.get("files", [])]
        if previous.get("key") == key and all(f.is_file() for f in files):
            return files
    written = plots.write_plots(report, run, out_dir)
    write_text_atomic(stamp, dumps_json({"key": key, "files": sorted(p.name for p in written)}))
    return written
