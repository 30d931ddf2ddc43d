"""Per-recipe tables of a report: Markdown, CSV (tidy, pandas) and LaTeX (booktabs, hand-written).

Wide layout (Markdown, LaTeX): rows are arms ("<arm>", "<arm> (val-selected)" for
validation-selected checkpoints), columns are ``benchmark:metric``; a cell is
``value [ci_low, ci_high] (Δ vs FFT)`` in points, with ``†`` when the paired test is significant.
When the run names a paper backbone, a ``paper`` column stands beside the headline benchmark.
The CSV is tidy: one line per (arm, benchmark, metric) with all numbers unrounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mft_bench.atomic import write_text_atomic
from mft_bench.report.collect import SELECTION_SUFFIXES, split_arm
from mft_bench.report.paper_numbers import READ_OFF_MARK, paper_read_off, paper_value

MARK = "†"
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


TEST_SELECTED_NOTE = ("test-selected‡: the checkpoint best on this test benchmark itself (the paper's protocol), "
                      "an optimistic number shown only to stand beside the paper's; not an estimate of performance")


def display_arm(arm: str) -> str:
    """Row label of an arm: its name; ``x@val`` -> ``x (val-selected)``; ``x@test`` -> ``x (test-selected‡)``."""
    label, selection = split_arm(arm)
    return {"last": label, "val": f"{label} (val-selected)", "test-selected": f"{label} (test-selected‡)"}[selection]


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (and typeset the minus sign of deltas)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text)).replace("−", "$-$")


def _scale(report: dict[str, Any], benchmark: str, metric: str) -> float:
    """100 (points) when every value and bound of the column lies in [0, 1], else 1."""
    values = [v for r in report["rows"] if r["benchmark"] == benchmark and r["metric"] == metric
              for v in (r["value"], r["ci_low"], r["ci_high"])]
    return 100.0 if values and all(0.0 <= v <= 1.0 for v in values) else 1.0


def _fmt(value: float, scale: float) -> str:
    return f"{value * scale:.1f}" if scale == 100.0 else f"{value:.3g}"


def _delta_lookup(report: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(arm, benchmark, metric) -> its comparison against FFT of the same family."""
    out = {}
    for c in report["comparisons"]:
        if c["arm_b"] in {"fft" + suffix for suffix in SELECTION_SUFFIXES.values()}:
            out[(c["arm_a"], c["benchmark"], c["metric"])] = c
    return out


def _paper_column(report: dict[str, Any]) -> tuple[str, str] | None:
    paper = report.get("paper") or {}
    entry = paper.get("entry") or {}
    benchmark = entry.get("benchmark")
    info = (report.get("benchmarks") or {}).get(benchmark or "")
    return (benchmark, info["primary_metric"]) if info else None


def _columns(report: dict[str, Any]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for r in report["rows"]:
        key = (r["benchmark"], r["metric"])
        if key not in seen:
            seen.append(key)
    return seen


def _arms(report: dict[str, Any]) -> list[str]:
    arms: list[str] = []
    for r in report["rows"]:
        if r["arm"] not in arms:
            arms.append(r["arm"])
    return arms


def wide_cells(report: dict[str, Any], *, minus: str = "−") -> tuple[list[str], list[list[str]]]:
    """Header and body (strings) of the wide per-recipe table."""
    columns, arms = _columns(report), _arms(report)
    rows = {(r["arm"], r["benchmark"], r["metric"]): r for r in report["rows"]}
    deltas = _delta_lookup(report)
    paper_at = _paper_column(report)
    entry = (report.get("paper") or {}).get("entry")
    header = ["arm"]
    for benchmark, metric in columns:
        header.append(f"{benchmark}:{metric}")
        if (benchmark, metric) == paper_at:
            header.append(f"{benchmark} (paper)")
    body = []
    for arm in arms:
        line = [display_arm(arm)]
        for benchmark, metric in columns:
            scale = _scale(report, benchmark, metric)
            row = rows.get((arm, benchmark, metric))
            if row is None:
                cell = "—"
            else:
                cell = f"{_fmt(row['value'], scale)} [{_fmt(row['ci_low'], scale)}, {_fmt(row['ci_high'], scale)}]"
                delta = deltas.get((arm, benchmark, metric))
                if delta is not None:
                    text = f"{delta['diff'] * scale:+.1f}" if scale == 100.0 else f"{delta['diff']:+.3g}"
                    cell += f" ({text.replace('-', minus)}{MARK if delta['significant'] else ''})"
            line.append(cell)
            if (benchmark, metric) == paper_at:
                value = paper_value(entry, arm)
                mark = READ_OFF_MARK if paper_read_off(entry, arm) else ""
                line.append("—" if value is None else f"{mark}{value:.1f}")
        body.append(line)
    return header, body


def tidy_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One line per (arm, benchmark, metric): value, n, CI, delta vs FFT with its CI/p/significance, paper."""
    deltas = _delta_lookup(report)
    paper_at = _paper_column(report)
    entry = (report.get("paper") or {}).get("entry")
    lines = []
    for r in report["rows"]:
        delta = deltas.get((r["arm"], r["benchmark"], r["metric"]), {})
        paper = paper_value(entry, r["arm"]) if (r["benchmark"], r["metric"]) == paper_at else None
        lines.append({
            "recipe": report.get("recipe"), "arm": r["arm"], "label": display_arm(r["arm"]),
            "benchmark": r["benchmark"], "metric": r["metric"], "value": r["value"], "n": r["n"],
            "ci_low": r["ci_low"], "ci_high": r["ci_high"], "ci_method": r.get("ci_method"),
            "delta_vs_fft": delta.get("diff"), "delta_ci_low": delta.get("ci_low"),
            "delta_ci_high": delta.get("ci_high"), "delta_p_value": delta.get("p_value"),
            "delta_significant": delta.get("significant"), "delta_test": delta.get("test"),
            "paper_value": None if paper is None else paper / 100.0,
        })
    return pd.DataFrame(lines)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def resolution_lines(report: dict[str, Any]) -> list[str]:
    """One sentence per benchmark: what difference this run can resolve (see build.resolution_entry)."""
    lines = []
    for e in report.get("resolution") or []:
        n = e["n"]
        text = f"- **{e['benchmark']}** ({e['metric']}, n={n}):"
        if e.get("paired_ci_half_width") is not None:
            text += f" paired 95% CI half-width ±{_pct(e['paired_ci_half_width'])} pts ({e['arm_a']} vs {e['arm_b']});"
        if e.get("discordant") is not None:
            if e.get("min_net_items") is not None:
                text += (f" with {_count(e['discordant'], 'discordant item')} McNemar needs a net gain of"
                         f" ≥{e['min_net_items']} items ({_pct(e['min_net_items'] / n)} pts);")
            else:
                text += f" only {_count(e['discordant'], 'discordant item')}, too few for any split to be significant;"
        if e.get("floor_diff") is not None:
            text += (f" at best (no item going the other way) ≥{e['floor_items']} items"
                     f" ({_pct(e['floor_diff'])} pts).")
        verdict = "resolvable" if e.get("two_point_resolvable") else "NOT resolvable"
        items = 0.02 * n
        text += f" A 2-point gain (≈{items:.1f} items) is {verdict} here."
        lines.append(text)
    return lines


def metric_note_lines(report: dict[str, Any]) -> list[str]:
    """What each shown metric equals, where its benchmark says (so that no column is read as another tool's
    metric of a similar name); [] when none does."""
    from mft_bench.evaluation.registry import metric_notes

    notes = []
    for benchmark, metric in _columns(report):
        note = metric_notes(benchmark).get(metric)
        if note:
            notes.append(f"- {benchmark}:{metric}: {note}")
    return ["", "Metrics (README, 'Metrics'):", *notes] if notes else []


def isolation_lines(report: dict[str, Any]) -> list[str]:
    """A section naming the sandbox level each code benchmark's code ran at, per arm (none without one)."""
    levels = {b: info["isolation"] for b, info in (report.get("benchmarks") or {}).items() if info.get("isolation")}
    if not levels:
        return []
    lines = ["", "## Code execution", "",
             "Model-written code ran in the sandbox at these isolation levels (namespace, userns: own namespaces "
             "and new root; rlimits: resource limits only, weaker; README, Sandbox):", ""]
    for benchmark, by_arm in levels.items():
        groups: dict[str, list[str]] = {}
        for arm, level in by_arm.items():
            groups.setdefault(level, []).append(display_arm(arm))
        if len(groups) == 1:
            lines.append(f"- {benchmark}: {next(iter(groups))} (every arm)")
        else:
            parts = [f"{level} ({', '.join(arms)})" for level, arms in groups.items()]
            lines.append(f"- {benchmark}: " + ", ".join(parts))
    return lines


def test_selection_lines(report: dict[str, Any]) -> list[str]:
    """The section that says which rows were chosen on the test set, and where the masks started (none when the
    run has no test-selected rows)."""
    chosen = report.get("test_selection") or {}
    if not chosen:
        return []
    lines = ["", "## Test-selected checkpoints", "", TEST_SELECTED_NOTE + ".", ""]
    for arm, by_benchmark in chosen.items():
        picks = ", ".join(f"{bench}: {c['checkpoint']} (step {c['step']})" for bench, c in by_benchmark.items())
        lines.append(f"- {display_arm(arm)}: {picks}")
    return lines


def mask_start_lines(report: dict[str, Any]) -> list[str]:
    """Where MFT and the mask baselines started, when not from FFT's last checkpoint."""
    starts = report.get("mask_start") or {}
    if not starts:
        return []
    return ["", "## Mask starting point", "",
            *(f"- {display_arm(arm)}: FFT step {start['step']} ({start['rule']})" for arm, start in starts.items())]


def render_markdown(report: dict[str, Any]) -> str:
    header, body = wide_cells(report)
    settings = report.get("settings") or {}
    confidence = settings.get("confidence", 0.95)
    commit = (report.get("provenance") or {}).get("git_commit") or "—"
    lines = [
        f"# mft-bench report: {report.get('recipe')}",
        "",
        f"backbone: {report.get('backbone')} · domain: {report.get('domain')} · "
        f"paper: {report.get('paper_key') or '—'} · commit: {commit}",
        "",
        f"Cells: value [{confidence:.0%} CI] in points (Wilson for 0/1 item scores, percentile bootstrap "
        f"otherwise) and (Δ vs FFT on the same items); {MARK} = paired test significant at "
        f"{1 - confidence:.0%} (McNemar exact for 0/1 scores, paired bootstrap interval excluding 0 otherwise).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(line) + " |" for line in body),
    ]
    paper = report.get("paper") or {}
    if paper.get("entry"):
        source = paper.get("source") or {}
        selection = f"; checkpoints {paper['selection']}" if paper.get("selection") else ""
        lines += ["", f"Paper numbers ({paper.get('model')}, {paper['entry'].get('measure', '')}{selection}): "
                  f"{source.get('figure') or source.get('paper') or ''} — {source.get('repository') or ''}"]
    lines += metric_note_lines(report)
    lines += ["", "## Resolution", "", *resolution_lines(report)]
    method = [c for c in report["comparisons"] if c["arm_a"].split("@")[0] == "mft"]
    primary = {b: info["primary_metric"] for b, info in (report.get("benchmarks") or {}).items()}
    method = [c for c in method if primary.get(c["benchmark"]) == c["metric"]]
    if method:
        lines += ["", "## MFT vs each arm (primary metrics)", "",
                  "| A | B | benchmark | n | Δ (pts) | CI | p | test |", "|---|---|---|---:|---:|---|---:|---|"]
        for c in method:
            lines.append(
                f"| {display_arm(c['arm_a'])} | {display_arm(c['arm_b'])} | {c['benchmark']} | {c['n']} | "
                f"{c['diff'] * 100:+.1f}{MARK if c['significant'] else ''} | "
                f"[{c['ci_low'] * 100:.1f}, {c['ci_high'] * 100:.1f}] | {c['p_value']:.3g} | {c['test']} |"
            )
    lines += isolation_lines(report)
    lines += test_selection_lines(report) + mask_start_lines(report)
    selection = report.get("selection") or {}
    if selection:
        lines += ["", "## Validation-selected checkpoints", "",
                  "Selection uses the validation split only (best mean primary metric; ties -> earliest); "
                  "rows marked (val-selected) report that checkpoint's test numbers.", ""]
        for arm, chosen in sorted(selection.items()):
            lines.append(f"- {display_arm(arm)}: {chosen['checkpoint']} (step {chosen['step']}), validation "
                         f"score {chosen['validation_score']:.4f} over {', '.join(chosen['validation_benchmarks'])}")
    return "\n".join(lines) + "\n"


def render_latex(report: dict[str, Any]) -> str:
    header, body = wide_cells(report)
    lines = [
        "% generated by mft-bench report; needs \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    for line in body:
        cells = [latex_escape(cell).replace(MARK, "$^\\dagger$").replace(READ_OFF_MARK, "$\\approx$")
                 for cell in line]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(report: dict[str, Any], out_dir: Path, *, stem: str = "report") -> list[Path]:
    """``<stem>.md``, ``<stem>.csv``, ``<stem>.tex`` in ``out_dir`` (atomic writes)."""
    out_dir = Path(out_dir)
    return [
        write_text_atomic(out_dir / f"{stem}.md", render_markdown(report)),
        write_text_atomic(out_dir / f"{stem}.csv", tidy_frame(report).to_csv(index=False, float_format="%.6g")),
        write_text_atomic(out_dir / f"{stem}.tex", render_latex(report)),
    ]
