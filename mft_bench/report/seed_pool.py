"""A seed sweep's replicates pooled: per arm and per paired comparison, every seed's numbers side by side and one
pooled estimate with its interval and test.

The seed varies the training rows, their order and the mask's initialisation; the test items are the same for every
seed. So the seeds' scores of one item are not independent observations: pooling them as if they were (n = items x
seeds) would narrow every interval by about sqrt(seeds) and count an item that one arm always gets right once per
seed. The pooled analysis therefore takes the **item as the unit** (the scores of one item, averaged over the seeds,
are one observation):

- an arm's pooled value is its mean over items and seeds, with a percentile bootstrap interval resampling items
  (Wilson's where the per-item means are still 0/1, e.g. the pretrained model, evaluated once for every seed);
- a comparison's pooled difference A - B is the mean over items of the seed-averaged difference, with a paired
  bootstrap over items (interval and p-value; McNemar's exact test where the per-item values are 0/1). This is
  ``stats.compare_paired`` applied to the per-item seed means.

Beside it, the exact McNemar test on the discordant pairs summed over seeds (``stats.stratified_mcnemar``,
Mantel-Haenszel for matched pairs) answers the narrower question "on these very items": it treats the items as
fixed, so its p is smaller; the † in the table is the item-resampling test's. Neither interval holds the
seed-to-seed spread (three seeds cannot estimate it): the per-seed columns show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mft_bench.errors import MftBenchError
from mft_bench.report.collect import (
    Evaluation,
    evaluations_at,
    last_test_evaluations,
    load_run,
    select_by_test,
    select_by_validation,
    split_arm,
)
from mft_bench.report.paper_numbers import headline_benchmark
from mft_bench.report.report_json import find_comparison, find_row, interval_cell, points
from mft_bench.report.stats import compare_paired, estimate_cell, stratified_mcnemar

SEED_AXIS = "seed"  # an axis over the recipe seed replicates the base: its variants are pooled
METHOD = ("pooled over items (the unit: an item's scores averaged over the seeds; every seed sees the same items): "
          "bootstrap over items, McNemar's exact test where per-item values stay 0/1; beside it, the exact McNemar "
          "test on the discordant pairs summed over seeds (Mantel-Haenszel for matched pairs; items fixed). "
          "Seed-to-seed spread is in the per-seed values, in no interval.")


def seed_pooled(entries: list[dict[str, Any]], base_values: dict[str, Any], reports: list[dict[str, Any]],
                selection: str = "last", *, n_bootstrap: int = 10_000) -> dict | None:
    """Pool the base and its ``seed`` variants (``entries`` with their ``reports``, in the same order) on the base
    report's headline benchmark and metric. None when the sweep has no seed axis."""
    seeded = [(entry, report) for entry, report in zip(entries, reports) if entry["axis"] in (None, SEED_AXIS)]
    if SEED_AXIS not in base_values or len(seeded) < 2:
        return None
    seeds = [base_values[SEED_AXIS] if entry["axis"] is None else entry["value"] for entry, _ in seeded]
    base_report = seeded[0][1]
    benchmark, metric = headline_benchmark(base_report)
    runs = [load_run(Path(entry["run_dir"])) for entry, _ in seeded]
    item_scores: dict[str, list[dict[str, float]]] = {}
    for row in base_report.get("rows") or []:
        if row["benchmark"] == benchmark and row["metric"] == metric and split_arm(row["arm"])[1] == selection:
            found = [_item_scores(run, row["arm"], benchmark, metric) for run in runs]
            if all(found):
                item_scores[row["arm"]] = found
    arms = [_pooled_arm(arm, [find_row(report, arm, benchmark, metric) for _, report in seeded], per_seed, n_bootstrap)
            for arm, per_seed in item_scores.items()]
    comparisons = []
    for first in base_report.get("comparisons") or []:
        pair = (first["arm_a"], first["arm_b"])
        if (first["benchmark"], first["metric"]) != (benchmark, metric) or not set(pair) <= set(item_scores):
            continue
        found = [find_comparison(report, *pair, benchmark, metric) for _, report in seeded]
        if None not in found:
            comparisons.append(_pooled_comparison(pair, found, item_scores, n_bootstrap))
    return {"seeds": seeds, "benchmark": benchmark, "metric": metric, "selection": selection,
            "items": len(_common_items(next(iter(item_scores.values())))) if item_scores else 0,
            "arms": arms, "comparisons": comparisons, "method": METHOD, "n_bootstrap": n_bootstrap}


def _item_scores(run, arm_row: str, benchmark: str, metric: str) -> dict[str, float] | None:
    """Item id -> score of the report row ``arm_row`` (``mft``, ``mft@val``, ``mft@test``) in one run."""
    arm, selection = split_arm(arm_row)
    evaluations: dict[str, Evaluation] = {}
    if selection == "last":
        evaluations = last_test_evaluations(run, arm)
    elif selection == "val":
        chosen = select_by_validation(run, arm)
        evaluations = evaluations_at(run, arm, chosen.checkpoint) if chosen is not None else {}
    else:
        evaluations = select_by_test(run, arm)
    evaluation = evaluations.get(benchmark)
    return evaluation.item_scores(metric) if evaluation is not None else None


def _common_items(per_seed: list[dict[str, float]]) -> list[str]:
    items = set(per_seed[0])
    for scores in per_seed[1:]:
        items &= set(scores)
    return sorted(items)


def _seed_means(per_seed: list[dict[str, float]], items: list[str]) -> np.ndarray:
    """Per item, its score averaged over the seeds."""
    return np.array([[scores[item] for item in items] for scores in per_seed]).mean(axis=0)


def _pooled_arm(arm: str, rows: list[dict | None], per_seed: list[dict[str, float]], n_bootstrap: int) -> dict:
    items = _common_items(per_seed)
    if len(items) != len(per_seed[0]):
        raise MftBenchError(f"arm {arm}: the seeds were evaluated on different items; pooling needs the same items")
    cell = estimate_cell(_seed_means(per_seed, items), n_bootstrap=n_bootstrap)
    return {"arm": arm, "per_seed": [points(row["value"]) if row else None for row in rows], "items": cell.n,
            "seeds": len(per_seed), "value": 100.0 * cell.value, "ci_low": 100.0 * cell.ci_low,
            "ci_high": 100.0 * cell.ci_high, "ci_method": cell.method}


def _pooled_comparison(pair: tuple[str, str], found: list[dict], item_scores: dict[str, list[dict[str, float]]],
                       n_bootstrap: int) -> dict:
    a_seeds, b_seeds = item_scores[pair[0]], item_scores[pair[1]]
    items = _common_items(a_seeds + b_seeds)
    paired = compare_paired(_seed_means(a_seeds, items), _seed_means(b_seeds, items), n_bootstrap=n_bootstrap)
    strata = []
    for c in found:
        if c.get("test") == "mcnemar":
            net = round(c["diff"] * c["n"])
            strata.append((c["n"], (c["discordant"] + net) // 2, (c["discordant"] - net) // 2))
    fixed = stratified_mcnemar(strata) if len(strata) == len(found) else None
    per_seed = [points(c["diff"]) for c in found]
    return {
        "arm_a": pair[0], "arm_b": pair[1], "items": paired.n, "seeds": len(found),
        "diff": 100.0 * paired.diff, "ci_low": 100.0 * paired.ci_low, "ci_high": 100.0 * paired.ci_high,
        "p_value": paired.p_value, "test": paired.test, "significant": paired.significant,
        "per_seed": per_seed, "per_seed_p_value": [c["p_value"] for c in found],
        "seeds_same_sign": sum(1 for d in per_seed if d and paired.diff and (d > 0) == (paired.diff > 0)),
        "items_fixed": None if fixed is None else {"a_only": fixed.a_only, "b_only": fixed.b_only,
                                                   "p_value": fixed.p_value, "significant": fixed.significant},
    }


def render_seed_pooled(pooled: dict[str, Any]) -> str:
    """The "Pooled over seeds" section of ``sweep.md``."""
    seeds = ", ".join(str(seed) for seed in pooled["seeds"])
    lines = [
        "", f"## Pooled over seeds {seeds}", "",
        f"{pooled['benchmark']}:{pooled['metric']}, percent, {pooled['selection']} checkpoint; "
        f"{pooled['items']} items, the same for every seed. Pooled: mean over items and seeds [95% interval, "
        "resampling items: an item's seed-averaged score is one observation]; per seed in seed order.", "",
        "| arm | pooled | items x seeds | per seed |", "|---|---:|---:|---|",
    ]
    for arm in pooled["arms"]:
        per_seed = ", ".join("—" if value is None else f"{value:.1f}" for value in arm["per_seed"])
        lines.append(f"| {arm['arm']} | {interval_cell(arm['value'], arm['ci_low'], arm['ci_high'])} | "
                     f"{arm['items']} x {arm['seeds']} | {per_seed} |")
    lines += [
        "", "Paired differences A − B in points. Pooled: mean over items of the seed-averaged difference "
        "[95% paired bootstrap over items], p from the same resampling († significant at 5%). Items fixed: exact "
        "McNemar on the discordant pairs summed over seeds (A only / B only), which holds the items fixed and so "
        "claims more than the items support. Per seed: each variant's own McNemar.", "",
        "| A | B | pooled Δ | p | items fixed: A only / B only, p | per seed Δ (p) | seeds agreeing |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for c in pooled["comparisons"]:
        per_seed = ", ".join(f"{d:+.1f} ({p:.2g})" for d, p in zip(c["per_seed"], c["per_seed_p_value"]))
        fixed = c["items_fixed"]
        fixed_cell = "—" if fixed is None else f"{fixed['a_only']} / {fixed['b_only']}, {fixed['p_value']:.2g}"
        lines.append(
            f"| {c['arm_a']} | {c['arm_b']} | "
            f"{interval_cell(c['diff'], c['ci_low'], c['ci_high'], signed=True, significant=c['significant'])} | "
            f"{_p(c['p_value'], pooled['n_bootstrap'])} | {fixed_cell} | {per_seed} | {c['seeds_same_sign']}/{len(c['per_seed'])} |")
    return "\n".join(lines) + "\n"


def _p(value: float, n_bootstrap: int) -> str:
    """A bootstrap p of 0 means below the resampling's resolution: said so."""
    return f"< {1 / n_bootstrap:.0e}" if value == 0 else f"{value:.2g}"
