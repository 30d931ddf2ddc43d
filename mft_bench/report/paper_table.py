"""The paper-shaped table across recipes, built from each run's report.

One block per run (domain x backbone x recipe) with our row and, where the run names a ``paper_key``, the
paper's row beneath, labelled with the paper's checkpoint selection; columns are the arms (pretrained, FFT, LoRA,
random mask, magnitude mask, L1 rows mask, MFT) on the domain's headline benchmark (primary metric), each with
its delta vs FFT; a paper value read off a plot rather than printed shows as ``≈``. The paper's numbers come
from ``paper_numbers``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from mft_bench.arms import arm_labels
from mft_bench.atomic import dumps_json, write_text_atomic
from mft_bench.errors import MftBenchError
from mft_bench.report.build import build_report
from mft_bench.report.collect import SELECTION_SUFFIXES, comparable_selection
from mft_bench.report.paper_extras import extra_rows, render_extras_latex, render_extras_markdown
from mft_bench.report.paper_numbers import (
    PAPER_ARMS,
    READ_OFF_MARK,
    headline_benchmark,
    load_paper_numbers,
    paper_read_off,
    paper_value,
)
from mft_bench.report.tables import latex_escape

log = logging.getLogger(__name__)

ARM_LABELS = arm_labels()


def paper_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Tidy rows (one per arm) of one run's block of the paper-shaped table. Values in percent."""
    found = headline_benchmark(report)
    if found is None:
        return []
    benchmark, metric = found
    entry = (report.get("paper") or {}).get("entry")
    selection = (report.get("paper") or {}).get("selection")
    our_selection = comparable_selection(report, benchmark, metric, selection)
    suffix = SELECTION_SUFFIXES[our_selection]
    rows = {r["arm"]: r for r in report["rows"] if r["benchmark"] == benchmark and r["metric"] == metric}
    deltas = {c["arm_a"]: c for c in report["comparisons"]
              if c["arm_b"] == "fft" + suffix and c["benchmark"] == benchmark and c["metric"] == metric}
    paper_fft = paper_value(entry, "fft")
    out = []
    for arm in PAPER_ARMS:
        # a selected family has rows only for the trained arms; the others have one checkpoint: their last
        row = rows.get(arm + suffix) or rows.get(arm)
        delta = deltas.get(arm + suffix) or deltas.get(arm) if suffix else deltas.get(arm)
        ours = row["value"] * 100.0 if row else None
        if arm == "fft" and row:
            delta_value: float | None = 0.0
        else:
            delta_value = delta["diff"] * 100.0 if delta else None
        paper = paper_value(entry, arm)
        out.append({
            "recipe": report.get("recipe"), "backbone": report.get("backbone"), "domain": report.get("domain"),
            "benchmark": benchmark, "metric": metric, "arm": arm,
            "value": ours, "ci_low": row["ci_low"] * 100.0 if row else None,
            "ci_high": row["ci_high"] * 100.0 if row else None, "n": row["n"] if row else None,
            "delta_vs_fft": delta_value, "delta_significant": bool(delta["significant"]) if delta else None,
            "delta_p_value": delta["p_value"] if delta else None,
            "paper_value": paper,
            "paper_delta_vs_fft": (paper - paper_fft) if paper is not None and paper_fft is not None else None,
            "paper_read_off": paper_read_off(entry, arm) if paper is not None else None,
            "paper_selection": selection if paper is not None else None,
            "selection": our_selection,
        })
    return out


def _present(value: Any) -> bool:
    return value is not None and not pd.isna(value)


def _cell(value: float | None, delta: float | None, significant: Any, arm: str, *, mark: str) -> str:
    if not _present(value):
        return "—"
    text = f"{value:.1f}"
    if arm != "fft" and _present(delta):
        text += f" ({delta:+.1f}{mark if _present(significant) and bool(significant) else ''})"
    return text


def _load_report(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return build_report(Path(run_dir))


def _paper_cell(row: Any) -> str:
    cell = _cell(row.paper_value, row.paper_delta_vs_fft, False, row.arm, mark="")
    return READ_OFF_MARK + cell if _present(row.paper_read_off) and bool(row.paper_read_off) else cell


def _blocks(frame: pd.DataFrame) -> list[tuple[list[str], list[str] | None, str]]:
    """Per run: (our cells, the paper's cells or None, the paper row's label) in PAPER_ARMS order."""
    blocks = []
    for _, group in frame.groupby(["domain", "backbone", "recipe"], sort=False, dropna=False):
        ours = [_cell(r.value, r.delta_vs_fft, r.delta_significant, r.arm, mark="†") for r in group.itertuples()]
        paper = [_paper_cell(r) for r in group.itertuples()] if group["paper_value"].notna().any() else None
        selections = group["paper_selection"].dropna().unique()
        label = f"paper ({selections[0]})" if len(selections) else "paper"
        blocks.append((ours, paper, label, str(group["selection"].iloc[0])))
    return blocks


def _selection_label(selection: str) -> str:
    return "test-selected‡" if selection == "test-selected" else f"{selection} checkpoint"


def render_paper_markdown(frame: pd.DataFrame) -> str:
    header = ["domain", "benchmark", "source", *[ARM_LABELS[a] for a in PAPER_ARMS]]
    lines = [
        "# MFT and baselines across domains",
        "",
        "Primary metric of each domain's headline benchmark, percent; (Δ vs FFT); † paired test significant "
        "at 5% (McNemar exact for 0/1 scores, paired bootstrap otherwise). Paper rows: numbers the paper "
        "reports (results/paper/), not comparable in backbone size unless the backbone matches; in brackets "
        "how the paper chose each arm's checkpoint (test-selected: best on the test benchmark itself); "
        f"{READ_OFF_MARK} read off the paper's plot. Our rows use the paper's selection where the run evaluated its "
        "checkpoints for it (test-selected‡: chosen on the test set, optimistic, there only to be compared with the "
        "paper's), else the last checkpoint, as their label says.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * len(header)) + "|",
    ]
    groups = list(frame.groupby(["domain", "backbone", "recipe"], sort=False, dropna=False))
    for (key, group), (ours, paper, paper_label, selection) in zip(groups, _blocks(frame)):
        domain, backbone, recipe = key
        first = group.iloc[0]
        label = f"{first['benchmark']}:{first['metric']}"
        source = f"ours ({recipe}, {backbone}; {_selection_label(selection)})"
        lines.append("| " + " | ".join([str(domain or "—"), label, source, *ours]) + " |")
        if paper is not None:
            lines.append("| " + " | ".join(["", "", paper_label, *paper]) + " |")
    return "\n".join(lines) + "\n"


def render_paper_latex(frame: pd.DataFrame) -> str:
    columns = "lll" + "r" * len(PAPER_ARMS)
    lines = [
        "% generated by mft-bench report; needs \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{{columns}}}",
        "\\toprule",
        " & ".join(["Domain", "Benchmark", "Source", *[ARM_LABELS[a] for a in PAPER_ARMS]]) + " \\\\",
        "\\midrule",
    ]
    groups = list(frame.groupby(["domain", "backbone", "recipe"], sort=False, dropna=False))
    for (key, group), (ours, paper, paper_label, selection) in zip(groups, _blocks(frame)):
        domain, _, recipe = key
        first = group.iloc[0]
        cells = [latex_escape(c).replace("†", "$^\\dagger$") for c in ours]
        lines.append(" & ".join([latex_escape(str(domain or "--")), latex_escape(str(first["benchmark"])),
                                 latex_escape(f"ours ({recipe}; {_selection_label(selection)})"), *cells]) + " \\\\")
        if paper is not None:
            lines.append(" & ".join(["", "", latex_escape(paper_label),
                                     *[latex_escape(c).replace(READ_OFF_MARK, "$\\approx$") for c in paper]]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_paper_table(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Across recipes: domains x arms with deltas vs FFT and the paper's numbers beside, then the domain averages
    and extra benchmarks of the official evaluation (``paper_extras``).

    Reads each run's ``report.json`` (built when absent). Writes ``paper_table.{md,csv,tex,json}`` (and
    ``paper_table_extras.csv`` when a run has extras).
    """
    if not run_dirs:
        raise MftBenchError("paper table: give at least one run folder")
    rows: list[dict[str, Any]] = []
    extras: list[dict[str, Any]] = []
    for run_dir in run_dirs:
        report = _load_report(Path(run_dir))
        block = paper_rows(report)
        if not block:
            log.warning("%s: no benchmark rows; left out of the paper table", run_dir)
        rows += block
        key = (report.get("paper") or {}).get("key")
        extras += extra_rows(report, PAPER_ARMS, load_paper_numbers(key) if key else None) if block else []
    if not rows:
        raise MftBenchError("paper table: none of the run folders has evaluated benchmarks")
    frame = pd.DataFrame(rows)
    out_dir = Path(out_dir)
    written = [
        write_text_atomic(out_dir / "paper_table.md",
                          render_paper_markdown(frame) + render_extras_markdown(extras, PAPER_ARMS, ARM_LABELS)),
        write_text_atomic(out_dir / "paper_table.csv", frame.to_csv(index=False, float_format="%.6g")),
        write_text_atomic(out_dir / "paper_table.tex",
                          render_paper_latex(frame) + render_extras_latex(extras, PAPER_ARMS, ARM_LABELS)),
        write_text_atomic(out_dir / "paper_table.json", dumps_json({"rows": rows, "extras": extras})),
    ]
    if extras:
        written.append(write_text_atomic(out_dir / "paper_table_extras.csv",
                                         pd.DataFrame(extras).to_csv(index=False, float_format="%.6g")))
    return written
