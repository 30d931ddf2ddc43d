"""Reading a variant's ``report.json`` for the cross-run tables: its rows and comparisons by key, values in
percentage points, and the ``value [low, high]`` cell every table of a sweep writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mft_bench.errors import MftBenchError


def load_report(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise MftBenchError(f"{run_dir}: no report.json; run the variant (mft-bench sweep reruns what is missing)")
    return json.loads(path.read_text(encoding="utf-8"))


def find_row(report: dict[str, Any], arm: str, benchmark: str, metric: str) -> dict[str, Any] | None:
    return next((r for r in report.get("rows") or []
                 if r["arm"] == arm and r["benchmark"] == benchmark and r["metric"] == metric), None)


def find_comparison(report: dict[str, Any], arm_a: str, arm_b: str, benchmark: str, metric: str) -> dict | None:
    return next((c for c in report.get("comparisons") or [] if c["arm_a"] == arm_a and c["arm_b"] == arm_b
                 and c["benchmark"] == benchmark and c["metric"] == metric), None)


def points(value: Any) -> float | None:
    """A fraction in percentage points; None for a missing or non-finite value."""
    return float(value) * 100.0 if value is not None and math.isfinite(float(value)) else None


def interval_cell(value: Any, low: Any, high: Any, *, signed: bool = False, significant: Any = None) -> str:
    """``12.5 [8.6, 17.8]``, ``+7.0† [...]`` when ``significant`` is True; ``—`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    form = "{:+.1f}" if signed else "{:.1f}"
    mark = "†" if significant is True else ""
    return f"{form.format(value)}{mark} [{form.format(low)}, {form.format(high)}]"
