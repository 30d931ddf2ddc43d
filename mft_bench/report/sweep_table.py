"""The cross-run table of a sweep: one row per variant with the setting it varies, MFT on the headline benchmark
with its interval, and MFT's paired differences from FFT and from the random mask, all read from the variants'
own ``report.json`` (so a cell here equals the one in that variant's report).

The headline is what the paper table shows (``paper_numbers.headline_benchmark``: the domain's benchmark, else
the first), its primary metric, in percent; differences in points. ``selection`` picks the checkpoint family of the rows
(``last``, ``val``, ``test-selected``: the report's ``mft``, ``mft@val``, ``mft@test``); the random mask has one
checkpoint, so MFT vs random mask exists for ``last`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mft_bench.errors import MftBenchError
from mft_bench.atomic import dumps_json, write_text_atomic
from mft_bench.report.collect import SELECTION_SUFFIXES
from mft_bench.report.paper_numbers import headline_benchmark
from mft_bench.report.report_json import find_comparison, find_row, interval_cell, load_report, points
from mft_bench.report.seed_pool import render_seed_pooled, seed_pooled

STEM = "sweep"
METHOD, REFERENCE, RANDOM = "mft", "fft", "random_mask"


def sweep_rows(entries: list[dict[str, Any]], selection: str = "last") -> tuple[list[dict[str, Any]], tuple[str, str]]:
    """One tidy row per variant (``entries``: variant, axis, value, run_dir), and the (benchmark, metric) shown."""
    if selection not in SELECTION_SUFFIXES:
        raise MftBenchError(f"selection must be one of {', '.join(SELECTION_SUFFIXES)}, got {selection!r}")
    if not entries:
        raise MftBenchError("sweep table: no variants")
    suffix = SELECTION_SUFFIXES[selection]
    reports = [load_report(entry["run_dir"]) for entry in entries]
    headline = headline_benchmark(reports[0])
    if headline is None:
        raise MftBenchError(f"{entries[0]['run_dir']}: the report has no benchmark rows")
    benchmark, metric = headline
    rows = []
    for entry, report in zip(entries, reports):
        mft = find_row(report, METHOD + suffix, benchmark, metric)
        fft = find_row(report, REFERENCE + suffix, benchmark, metric) or find_row(report, REFERENCE, benchmark, metric)
        random = find_row(report, RANDOM, benchmark, metric)
        vs_fft = find_comparison(report, METHOD + suffix, REFERENCE + suffix, benchmark, metric)
        vs_random = find_comparison(report, METHOD + suffix, RANDOM + suffix, benchmark, metric)
        row: dict[str, Any] = {"variant": entry["variant"], "axis": entry["axis"], "value": entry["value"],
                               "recipe": report.get("recipe"), "benchmark": benchmark, "metric": metric,
                               "selection": selection if mft is not None else None, "n": mft["n"] if mft else None}
        for prefix, cell in (("mft", mft), ("fft", fft), ("random_mask", random)):
            row[prefix] = points(cell["value"]) if cell else None
            row[f"{prefix}_ci_low"] = points(cell["ci_low"]) if cell else None
            row[f"{prefix}_ci_high"] = points(cell["ci_high"]) if cell else None
        for prefix, comparison in (("delta_vs_fft", vs_fft), ("delta_vs_random", vs_random)):
            row[prefix] = points(comparison["diff"]) if comparison else None
            row[f"{prefix}_ci_low"] = points(comparison["ci_low"]) if comparison else None
            row[f"{prefix}_ci_high"] = points(comparison["ci_high"]) if comparison else None
            row[f"{prefix}_p_value"] = comparison["p_value"] if comparison else None
            row[f"{prefix}_significant"] = bool(comparison["significant"]) if comparison else None
            row[f"{prefix}_test"] = comparison["test"] if comparison else None
        rows.append(row)
    return rows, (benchmark, metric)


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


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        str(row["variant"]), str(row["axis"] or "(base)"), format_value(row["value"]) if row["axis"] else "—",
        interval_cell(row["fft"], row["fft_ci_low"], row["fft_ci_high"]),
        interval_cell(row["mft"], row["mft_ci_low"], row["mft_ci_high"]),
        interval_cell(row["delta_vs_fft"], row["delta_vs_fft_ci_low"], row["delta_vs_fft_ci_high"], signed=True,
                  significant=row["delta_vs_fft_significant"]),
        interval_cell(row["random_mask"], row["random_mask_ci_low"], row["random_mask_ci_high"]),
        interval_cell(row["delta_vs_random"], row["delta_vs_random_ci_low"], row["delta_vs_random_ci_high"],
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
    pooled = seed_pooled(entries, base_values, [load_report(entry["run_dir"]) for entry in entries], selection)
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
