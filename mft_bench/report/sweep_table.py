"""The cross-run table of a sweep: one row per variant with the setting it varies, MFT on the headline benchmark
with its interval, and MFT's paired differences from FFT and from the random mask, all read from the variants'
own ``report.json`` (so a cell here equals the one in that variant's report).

The headline is what the paper table shows (``paper_numbers.headline_benchmark``: the domain's benchmark, else
the first), its primary metric, in percent; differences in points. ``selection`` picks the checkpoint family of the rows
(``last``, ``val``, ``test-selected``: the report's ``mft``, ``mft@val``, ``mft@test``); the random mask has one
checkpoint, so MFT vs random mask exists for ``last`` only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from mft_bench.errors import MftBenchError
from mft_bench.atomic import dumps_json, write_text_atomic
from mft_bench.report.collect import SELECTION_SUFFIXES, split_arm
from mft_bench.report.paper_numbers import headline_benchmark
from mft_bench.report.stats import stratified_mcnemar, wilson_interval

STEM = "sweep"
METHOD, REFERENCE, RANDOM = "mft", "fft", "random_mask"
SEED_AXIS = "seed"  # an axis over the recipe seed replicates the base: its variants are pooled


def _load_report(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise MftBenchError(f"{run_dir}: no report.json; run the variant (mft-bench sweep reruns what is missing)")
    return json.loads(path.read_text(encoding="utf-8"))


def _row(report: dict[str, Any], arm: str, benchmark: str, metric: str) -> dict[str, Any] | None:
    return next((r for r in report.get("rows") or []
                 if r["arm"] == arm and r["benchmark"] == benchmark and r["metric"] == metric), None)


def _comparison(report: dict[str, Any], arm_a: str, arm_b: str, benchmark: str, metric: str) -> dict | None:
    return next((c for c in report.get("comparisons") or [] if c["arm_a"] == arm_a and c["arm_b"] == arm_b
                 and c["benchmark"] == benchmark and c["metric"] == metric), None)


def _points(value: Any) -> float | None:
    return float(value) * 100.0 if value is not None and math.isfinite(float(value)) else None


def sweep_rows(entries: list[dict[str, Any]], selection: str = "last") -> tuple[list[dict[str, Any]], tuple[str, str]]:
    """One tidy row per variant (``entries``: variant, axis, value, run_dir), and the (benchmark, metric) shown."""
    if selection not in SELECTION_SUFFIXES:
        raise MftBenchError(f"selection must be one of {', '.join(SELECTION_SUFFIXES)}, got {selection!r}")
    if not entries:
        raise MftBenchError("sweep table: no variants")
    suffix = SELECTION_SUFFIXES[selection]
    reports = [_load_report(entry["run_dir"]) for entry in entries]
    headline = headline_benchmark(reports[0])
    if headline is None:
        raise MftBenchError(f"{entries[0]['run_dir']}: the report has no benchmark rows")
    benchmark, metric = headline
    rows = []
    for entry, report in zip(entries, reports):
        mft = _row(report, METHOD + suffix, benchmark, metric)
        fft = _row(report, REFERENCE + suffix, benchmark, metric) or _row(report, REFERENCE, benchmark, metric)
        random = _row(report, RANDOM, benchmark, metric)
        vs_fft = _comparison(report, METHOD + suffix, REFERENCE + suffix, benchmark, metric)
        vs_random = _comparison(report, METHOD + suffix, RANDOM + suffix, benchmark, metric)
        row: dict[str, Any] = {"variant": entry["variant"], "axis": entry["axis"], "value": entry["value"],
                               "recipe": report.get("recipe"), "benchmark": benchmark, "metric": metric,
                               "selection": selection if mft is not None else None, "n": mft["n"] if mft else None}
        for prefix, cell in (("mft", mft), ("fft", fft), ("random_mask", random)):
            row[prefix] = _points(cell["value"]) if cell else None
            row[f"{prefix}_ci_low"] = _points(cell["ci_low"]) if cell else None
            row[f"{prefix}_ci_high"] = _points(cell["ci_high"]) if cell else None
        for prefix, comparison in (("delta_vs_fft", vs_fft), ("delta_vs_random", vs_random)):
            row[prefix] = _points(comparison["diff"]) if comparison else None
            row[f"{prefix}_ci_low"] = _points(comparison["ci_low"]) if comparison else None
            row[f"{prefix}_ci_high"] = _points(comparison["ci_high"]) if comparison else None
            row[f"{prefix}_p_value"] = comparison["p_value"] if comparison else None
            row[f"{prefix}_significant"] = bool(comparison["significant"]) if comparison else None
            row[f"{prefix}_test"] = comparison["test"] if comparison else None
        rows.append(row)
    return rows, (benchmark, metric)


def seed_pooled(entries: list[dict[str, Any]], base_values: dict[str, Any], selection: str = "last") -> dict | None:
    """Pool the base and its ``seed`` variants (replicates: the seed varies the training rows, their order and the
    mask's initialisation): per arm, the per-seed values and the pooled rate; per paired comparison of the base
    report (headline benchmark and metric, binary scores), the per-seed differences and the stratified exact
    McNemar test (``stats.stratified_mcnemar``). None when the sweep has no seed axis."""
    seeded = [entry for entry in entries if entry["axis"] in (None, SEED_AXIS)]
    if SEED_AXIS not in base_values or len(seeded) < 2:
        return None
    seeds = [base_values[SEED_AXIS] if entry["axis"] is None else entry["value"] for entry in seeded]
    reports = [_load_report(entry["run_dir"]) for entry in seeded]
    benchmark, metric = headline_benchmark(reports[0])
    arms = []
    for row in reports[0].get("rows") or []:
        cells = [_row(report, row["arm"], benchmark, metric) for report in reports]
        if row["benchmark"] != benchmark or row["metric"] != metric or split_arm(row["arm"])[1] != selection \
                or None in cells:
            continue
        if not all(cell.get("ci_method") == "wilson" for cell in cells):
            continue
        correct = sum(round(cell["value"] * cell["n"]) for cell in cells)
        total = sum(cell["n"] for cell in cells)
        low, high = wilson_interval(correct, total)
        arms.append({"arm": row["arm"], "per_seed": [_points(cell["value"]) for cell in cells], "n": total,
                     "value": 100.0 * correct / total, "ci_low": 100.0 * low, "ci_high": 100.0 * high})
    comparisons = []
    for first in reports[0].get("comparisons") or []:
        pair = (first["arm_a"], first["arm_b"])
        if first["benchmark"] != benchmark or first["metric"] != metric or first.get("test") != "mcnemar" \
                or split_arm(pair[0])[1] != selection:
            continue
        found = [_comparison(report, *pair, benchmark, metric) for report in reports]
        if None in found:
            continue
        strata = []
        for c in found:
            net = round(c["diff"] * c["n"])
            strata.append((c["n"], (c["discordant"] + net) // 2, (c["discordant"] - net) // 2))
        pooled = stratified_mcnemar(strata)
        per_seed = [_points(c["diff"]) for c in found]
        comparisons.append({
            "arm_a": pair[0], "arm_b": pair[1], "n": pooled.n, "a_only": pooled.a_only, "b_only": pooled.b_only,
            "per_seed": per_seed, "per_seed_p_value": [c["p_value"] for c in found],
            "diff": 100.0 * pooled.diff, "ci_low": 100.0 * pooled.ci_low, "ci_high": 100.0 * pooled.ci_high,
            "p_value": pooled.p_value, "significant": pooled.significant,
            "seeds_same_sign": sum(1 for d in per_seed if d and (d > 0) == (pooled.diff > 0)),
        })
    return {"seeds": seeds, "benchmark": benchmark, "metric": metric, "selection": selection, "arms": arms,
            "comparisons": comparisons,
            "method": "per seed: the variant's own report (McNemar exact); pooled: exact McNemar on the discordant "
                      "pairs summed over seeds (Mantel-Haenszel for matched pairs), Wald interval of the pooled "
                      "mean difference (item sampling only; the per-seed values show the seed spread)"}


def render_seed_pooled(pooled: dict[str, Any]) -> str:
    seeds = ", ".join(str(seed) for seed in pooled["seeds"])
    lines = [
        "", f"## Pooled over seeds {seeds}", "",
        f"{pooled['benchmark']}:{pooled['metric']}, percent, {pooled['selection']} checkpoint. Pooled: every "
        "seed's items counted once per seed [95% Wilson interval]; per seed in order.", "",
        "| arm | pooled | n | per seed |", "|---|---:|---:|---|",
    ]
    for arm in pooled["arms"]:
        per_seed = ", ".join(f"{value:.1f}" for value in arm["per_seed"])
        lines.append(f"| {arm['arm']} | {_interval(arm['value'], arm['ci_low'], arm['ci_high'])} | {arm['n']} | "
                     f"{per_seed} |")
    lines += [
        "", "Paired differences A − B in points. Pooled: exact McNemar on the discordant pairs summed over seeds "
        "(stratified by seed), † significant at 5%; interval: normal approximation over items (seed spread is in "
        "the per-seed column, not in the interval).", "",
        "| A | B | pooled Δ | p | A only / B only | per seed Δ (p) | seeds agreeing |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for c in pooled["comparisons"]:
        per_seed = ", ".join(f"{d:+.1f} ({p:.2g})" for d, p in zip(c["per_seed"], c["per_seed_p_value"]))
        lines.append(
            f"| {c['arm_a']} | {c['arm_b']} | "
            f"{_interval(c['diff'], c['ci_low'], c['ci_high'], signed=True, significant=c['significant'])} | "
            f"{c['p_value']:.2g} | {c['a_only']} / {c['b_only']} | {per_seed} | "
            f"{c['seeds_same_sign']}/{len(c['per_seed'])} |")
    return "\n".join(lines) + "\n"


def format_value(value: Any) -> str:
    """A setting as a reader reads it: a run of consecutive layers ``4-7``, a learning rate ``2e-05``."""
    if value is None:
        return "—"
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value) \
            and value == list(range(value[0], value[0] + len(value))) and len(value) > 1:
        return f"{value[0]}-{value[-1]}"
    if isinstance(value, list):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _interval(value: Any, low: Any, high: Any, *, signed: bool = False, significant: Any = None) -> str:
    if value is None or pd.isna(value):
        return "—"
    form = "{:+.1f}" if signed else "{:.1f}"
    mark = "†" if significant is True else ""
    return f"{form.format(value)}{mark} [{form.format(low)}, {form.format(high)}]"


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        str(row["variant"]), str(row["axis"] or "(base)"), format_value(row["value"]) if row["axis"] else "—",
        _interval(row["fft"], row["fft_ci_low"], row["fft_ci_high"]),
        _interval(row["mft"], row["mft_ci_low"], row["mft_ci_high"]),
        _interval(row["delta_vs_fft"], row["delta_vs_fft_ci_low"], row["delta_vs_fft_ci_high"], signed=True,
                  significant=row["delta_vs_fft_significant"]),
        _interval(row["random_mask"], row["random_mask_ci_low"], row["random_mask_ci_high"]),
        _interval(row["delta_vs_random"], row["delta_vs_random_ci_low"], row["delta_vs_random_ci_high"],
                  signed=True, significant=row["delta_vs_random_significant"]),
    ]


HEADER = ["variant", "varied", "value", "FFT", "MFT", "Δ MFT−FFT", "random mask", "Δ MFT−random"]


def render_markdown(rows: list[dict[str, Any]], headline: tuple[str, str], *, sweep: str, base_recipe: str,
                    base_values: dict[str, Any], selection: str) -> str:
    benchmark, metric = headline
    optimistic = " (chosen on the test set, optimistic)" if selection == "test-selected" else ""
    lines = [
        f"# Ablations: {sweep}",
        "",
        f"{benchmark}:{metric}, percent, {selection} checkpoint{optimistic}; "
        f"one factor at a time around the base recipe {base_recipe}. [95% CI]; Δ: paired difference in points "
        "(same items), † significant at 5% (McNemar exact for 0/1 scores, paired bootstrap otherwise). Stages "
        "with equal inputs are shared by the variants (one stages/ folder): an FFT cell repeated down the column "
        "is one model, evaluated once.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] * len(HEADER)) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    lines += ["", "Base: " + "; ".join(f"{key} = {format_value(value)}" for key, value in base_values.items()) + "."]
    return "\n".join(lines) + "\n"


def render_latex(rows: list[dict[str, Any]], headline: tuple[str, str], *, sweep: str) -> str:
    from mft_bench.report.tables import latex_escape

    lines = [
        "% generated by mft-bench sweep; needs \\usepackage{booktabs}",
        f"% {latex_escape(sweep)}: {latex_escape(headline[0])}:{latex_escape(headline[1])}, percent",
        "\\begin{tabular}{lll" + "r" * (len(HEADER) - 3) + "}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in HEADER).replace("Δ", "$\\Delta$").replace("−", "$-$") + " \\\\",
        "\\midrule",
    ]
    for row in rows:
        cells = [latex_escape(c).replace("†", "$^\\dagger$").replace("—", "--") for c in _cells(row)]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_sweep_table(entries: list[dict[str, Any]], out_dir: Path, *, sweep: str, base_recipe: str,
                      base_values: dict[str, Any], selection: str = "last") -> list[Path]:
    """Write ``sweep.{md,csv,json,tex}`` into ``out_dir`` from the variants' reports."""
    rows, headline = sweep_rows(entries, selection)
    pooled = seed_pooled(entries, base_values, selection)
    out_dir = Path(out_dir)
    frame = pd.DataFrame([{**row, "value": format_value(row["value"]) if row["axis"] else None} for row in rows])
    document = {"sweep": sweep, "base_recipe": base_recipe, "base_values": base_values, "selection": selection,
                "benchmark": headline[0], "metric": headline[1], "units": "percent; deltas in points",
                "rows": [{**row, "run_dir": str(entry["run_dir"])} for row, entry in zip(rows, entries)],
                "seed_pooled": pooled}
    markdown = render_markdown(rows, headline, sweep=sweep, base_recipe=base_recipe, base_values=base_values,
                               selection=selection)
    return [
        write_text_atomic(out_dir / f"{STEM}.md", markdown + (render_seed_pooled(pooled) if pooled else "")),
        write_text_atomic(out_dir / f"{STEM}.csv", frame.to_csv(index=False, float_format="%.6g")),
        write_text_atomic(out_dir / f"{STEM}.tex", render_latex(rows, headline, sweep=sweep)),
        write_text_atomic(out_dir / f"{STEM}.json", dumps_json(document)),
    ]
