"""More of the official evaluation beside the paper-shaped table: domain averages and the extra benchmarks.

* **Domain average.** The abstract (arXiv v1) claims "1.95% / 1.88% average gain in coding with LLaMA2-7B /
  3.1-8B". The official coding evaluation runs HumanEval and HumanEval+ (OLMES ``codex_humaneval`` and
  ``codex_humanevalplus``), so a coding run's domain average is, per arm, the mean of the two benchmarks' primary
  metrics (pass@1), and its Δ vs FFT the mean of their two Δ (no significance test: the two benchmarks share
  their problems). Beside it stands the paper file's ``abstract.mft_gain_vs_fft``, MFT's gain, the only number
  of this average ever published.
* **Extra benchmarks.** A run's benchmarks other than the headline one that the official README's rerun reports
  (HumanEval+ for coding, MATH as ``lm_eval:minerva_math`` for math), ours beside the README's numbers
  (``domains.<domain>.official_readme``, checkpoint selection not stated there).

Our numbers here are the last checkpoint's. Values in percent.
"""

from __future__ import annotations

import logging
from typing import Any

from mft_bench.report.collect import SELECTION_SUFFIXES, comparable_selection, split_arm

log = logging.getLogger(__name__)

# domain -> the benchmarks its average is made of (the official evaluation of that domain)
DOMAIN_AVERAGES = {"coding": ("humaneval", "humaneval_plus")}
LM_EVAL_PREFIX = "lm_eval:"
ABSTRACT_LABEL = "paper abstract (MFT's gain only)"
README_LABEL = "official README rerun"


def _values(report: dict[str, Any], benchmark: str, wanted: str | None) -> tuple[str, dict[str, float]]:
    """The benchmark's primary metric and each arm's value on it (percent), from the rows of the checkpoint
    selection ``wanted`` (the paper's) where the report has them, else the last checkpoint's; the metric's label
    says which."""
    metric = report["benchmarks"][benchmark]["primary_metric"]
    selection = comparable_selection(report, benchmark, metric, wanted)
    suffix = SELECTION_SUFFIXES[selection]
    rows = {r["arm"]: r["value"] * 100.0 for r in report["rows"]
            if r["benchmark"] == benchmark and r["metric"] == metric and r["value"] is not None}
    values = {split_arm(arm)[0]: value for arm, value in rows.items() if split_arm(arm)[1] == "last"}
    values.update({split_arm(arm)[0]: value for arm, value in rows.items() if suffix and arm.endswith(suffix)})
    return (f"{metric} ({selection})" if selection != "last" else metric), values


def _row(report: dict[str, Any], arms: tuple[str, ...], what: str, made_of: str, values: dict[str, float],
         paper: dict[str, float], paper_source: str | None, paper_deltas: dict[str, float] | None = None) -> list[dict]:
    fft, paper_fft = values.get("fft"), paper.get("fft")
    out = []
    for arm in arms:
        value, paper_value = values.get(arm), paper.get(arm)
        paper_delta = (paper_deltas or {}).get(arm)
        if paper_delta is None and paper_value is not None and paper_fft is not None:
            paper_delta = paper_value - paper_fft
        out.append({
            "recipe": report.get("recipe"), "backbone": report.get("backbone"), "domain": report.get("domain"),
            "what": what, "made_of": made_of, "arm": arm, "value": value,
            "delta_vs_fft": value - fft if value is not None and fft is not None else None,
            "paper_value": paper_value, "paper_delta_vs_fft": paper_delta, "paper_source": paper_source,
        })
    return out


def extra_rows(report: dict[str, Any], arms: tuple[str, ...], paper_file: dict[str, Any] | None) -> list[dict]:
    """Tidy rows (one per arm and line) of one run's domain average and extra benchmarks."""
    domain = report.get("domain") or ""
    benchmarks = report.get("benchmarks") or {}
    entry = ((paper_file or {}).get("domains") or {}).get(domain) or {}
    out: list[dict] = []
    parts = DOMAIN_AVERAGES.get(domain)
    if parts and all(p in benchmarks for p in parts):
        wanted = (paper_file or {}).get("selection")
        per_part = [_values(report, p, wanted) for p in parts]
        averages = {arm: sum(v[arm] for _, v in per_part) / len(parts)
                    for arm in arms if all(arm in v for _, v in per_part)}
        abstract = (paper_file or {}).get("abstract") or {}
        gain = {"mft": float(abstract["mft_gain_vs_fft"])} if abstract.get("domain") == domain else {}
        made_of = " + ".join(f"{p}:{m}" for p, (m, _) in zip(parts, per_part))
        out += _row(report, arms, "domain average", f"mean of {made_of}", averages, {},
                    abstract.get("claim") if gain else None, paper_deltas=gain)
    elif parts:
        log.info("%s: no %s domain average (needs %s)", report.get("recipe"), domain, " and ".join(parts))
    readme = (entry.get("official_readme") or {}).get("benchmarks") or {}
    headline = entry.get("benchmark")
    for benchmark in benchmarks:
        key = benchmark.removeprefix(LM_EVAL_PREFIX)
        if benchmark == headline or key not in readme:
            continue
        metric, values = _values(report, benchmark, (paper_file or {}).get("selection"))
        out += _row(report, arms, benchmark, f"{benchmark}:{metric}", values, readme[key],
                    (entry.get("official_readme") or {}).get("source"))
    return out


def _cell(value: float | None, delta: float | None, arm: str) -> str:
    if value is None and delta is None:
        return "—"
    text = f"{value:.1f}" if value is not None else ""
    if arm != "fft" and delta is not None:
        text += f" ({delta:+.2f})" if value is None else f" ({delta:+.1f})"
    return text.strip()


def _lines(rows: list[dict], arms: tuple[str, ...]) -> list[tuple[list[str], list[str], str, str, list[str] | None]]:
    """Per (run, line): (first cells, our cells, paper label, made_of, paper cells or None)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["domain"], row["backbone"], row["recipe"], row["what"]), []).append(row)
    out = []
    for (domain, backbone, recipe, what), group in groups.items():
        by_arm = {r["arm"]: r for r in group}
        ours = [_cell(by_arm[a]["value"], by_arm[a]["delta_vs_fft"], a) for a in arms]
        has_paper = any(r["paper_value"] is not None or r["paper_delta_vs_fft"] is not None for r in group)
        paper = [_cell(by_arm[a]["paper_value"], by_arm[a]["paper_delta_vs_fft"], a) for a in arms]
        label = ABSTRACT_LABEL if what == "domain average" else README_LABEL
        out.append(([str(domain or "—"), group[0]["made_of"]], ours, label, f"ours ({recipe}, {backbone})",
                    paper if has_paper else None))
    return out


def render_extras_markdown(rows: list[dict], arms: tuple[str, ...], labels: dict[str, str]) -> str:
    if not rows:
        return ""
    header = ["domain", "what", "source", *[labels[a] for a in arms]]
    lines = [
        "",
        "## More of the official evaluation",
        "",
        "Percent, last checkpoint, (Δ vs FFT). Domain average: per arm the mean of the benchmarks named, as the "
        "official evaluation of the domain runs them (coding: HumanEval + HumanEval+, OLMES codex_humaneval and "
        "codex_humanevalplus), its Δ the mean of their Δ, no significance test; beside it the paper abstract's "
        "MFT gain over FFT, the only published number of this average. Extra benchmarks: ours beside the official "
        "README's rerun (checkpoint selection not stated; its MATH is OLMES minerva_math exact_match_flex averaged "
        "over the 7 subjects, ours lm-eval's minerva_math, README \"MATH\").",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * len(header)) + "|",
    ]
    for first, ours, label, source, paper in _lines(rows, arms):
        lines.append("| " + " | ".join([*first, source, *ours]) + " |")
        if paper is not None:
            lines.append("| " + " | ".join(["", "", label, *paper]) + " |")
    return "\n".join(lines) + "\n"


def render_extras_latex(rows: list[dict], arms: tuple[str, ...], labels: dict[str, str]) -> str:
    from mft_bench.report.tables import latex_escape

    if not rows:
        return ""
    lines = [
        "% more of the official evaluation: domain averages and extra benchmarks (last checkpoint)",
        f"\\begin{{tabular}}{{lll{'r' * len(arms)}}}",
        "\\toprule",
        " & ".join(["Domain", "What", "Source", *[labels[a] for a in arms]]) + " \\\\",
        "\\midrule",
    ]
    for first, ours, label, source, paper in _lines(rows, arms):
        lines.append(" & ".join(latex_escape(c) for c in [*first, source, *ours]) + " \\\\")
        if paper is not None:
            lines.append(" & ".join(latex_escape(c) for c in ["", "", label, *paper]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
