"""Regression check of a report against ``results/reference/<recipe>.json``.

Reference format::

    {"recipe": "smoke", "created_with": {...},
     "metrics": [{"arm": "mft", "benchmark": "gsm8k", "metric": "exact_match", "value": 0.47, "tolerance": 0.02,
                  "n": 1319}]}

A sweep's reference (``mft-bench check SWEEP_DIR``) holds one such reference per variant::

    {"sweep": "smollm2-math-seeds", "variants": {"base": {"recipe": ..., "metrics": [...]}, "seed-1": {...}}}

and a sweep passes when every variant's report passes its own (a variant without a report fails).

A metric passes when the report has the same (arm, benchmark, metric) row, on the same number of items ``n``
where the reference records it (a records file that lost lines is a regression, not a pass), and
``|value - reference| <= tolerance + 1e-9``; a missing row fails.

Tolerance written by :func:`write_reference` when none is given:

- ``0`` (exact) for deterministic runs: the report says ``"deterministic": true`` (from run.json) or the
  recipe is a smoke recipe (name starting with ``smoke``; CPU runs are bit-reproducible);
- otherwise, per metric, ``max(2 * SE, 0.02)`` where SE is the row's standard error recovered from its
  interval (half-width / z): two standard errors is what a rerun with a different seed can move, and
  0.02 keeps tiny-variance metrics from flagging harmless noise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mft_bench import __version__
from mft_bench.errors import MftBenchError
from mft_bench.atomic import dumps_json, write_text_atomic
from mft_bench.report.stats import z_value

EPSILON = 1e-9
MIN_TOLERANCE = 0.02


def _key(entry: dict[str, Any]) -> tuple[str, str, str]:
    return str(entry["arm"]), str(entry["benchmark"]), str(entry["metric"])


def _name(key: tuple[str, str, str]) -> str:
    return "/".join(key)


def validate_reference(reference: Any, where: str = "reference") -> list[dict[str, Any]]:
    """The reference's metric entries; :class:`MftBenchError` when the file does not have the format above."""
    if not isinstance(reference, dict) or not isinstance(reference.get("metrics"), list):
        raise MftBenchError(f"{where}: expected an object with a 'metrics' list (write one with --update)")
    if not reference["metrics"]:
        raise MftBenchError(f"{where}: no metrics to check against (an empty 'metrics' list); write one with --update")
    entries = []
    for i, entry in enumerate(reference["metrics"]):
        if not isinstance(entry, dict):
            raise MftBenchError(f"{where}: metrics[{i}] is not an object")
        missing = [k for k in ("arm", "benchmark", "metric", "value", "tolerance") if k not in entry]
        if missing:
            raise MftBenchError(f"{where}: metrics[{i}] lacks {', '.join(missing)}")
        for field in ("value", "tolerance"):
            value = entry[field]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MftBenchError(f"{where}: metrics[{i}].{field} must be a finite number, got {value!r}")
        if entry["tolerance"] < 0:
            raise MftBenchError(f"{where}: metrics[{i}].tolerance must be >= 0")
        entries.append(entry)
    return entries


def check_against_reference(report: dict, reference: dict) -> list[str]:
    """One line per reference metric outside tolerance or missing from the report; [] when all pass."""
    entries = validate_reference(reference)
    failures: list[str] = []
    if reference.get("recipe") and report.get("recipe") and reference["recipe"] != report["recipe"]:
        failures.append(f"recipe: report is {report['recipe']!r} but the reference is for {reference['recipe']!r}")
    rows = {_key(r): r for r in report.get("rows") or []}
    for entry in entries:
        key = _key(entry)
        expected, tolerance = float(entry["value"]), float(entry["tolerance"])
        row = rows.get(key)
        if row is None:
            failures.append(f"{_name(key)}: missing from the report (reference {expected:.6g} ± {tolerance:.6g})")
            continue
        value = row.get("value")
        if value is None or not math.isfinite(float(value)):
            failures.append(f"{_name(key)}: no value in the report (reference {expected:.6g} ± {tolerance:.6g})")
            continue
        if "n" in entry and row.get("n") != entry["n"]:
            failures.append(f"{_name(key)}: {row.get('n')} items in the report, {entry['n']} in the reference")
            continue
        difference = float(value) - expected
        if abs(difference) > tolerance + EPSILON:
            failures.append(
                f"{_name(key)}: {float(value):.6g} outside reference {expected:.6g} ± {tolerance:.6g} "
                f"(difference {difference:+.6g})"
            )
    return failures


def is_deterministic(report: dict) -> bool:
    """True when the run is declared reproducible bit for bit (see the module docstring)."""
    return bool(report.get("deterministic")) or str(report.get("recipe") or "").startswith("smoke")


def default_tolerance(row: dict[str, Any], *, confidence: float = 0.95) -> float:
    """``max(2 * SE, 0.02)`` with SE = interval half-width / z."""
    half = (float(row["ci_high"]) - float(row["ci_low"])) / 2.0
    standard_error = half / z_value(confidence) if math.isfinite(half) else 0.0
    return max(2.0 * standard_error, MIN_TOLERANCE)


def reference_from_report(report: dict, *, tolerance: float | None = None) -> dict[str, Any]:
    """The reference structure for a report (see the module docstring for the tolerance rule)."""
    if tolerance is not None and (not math.isfinite(tolerance) or tolerance < 0):
        raise MftBenchError(f"--tolerance must be a non-negative number, got {tolerance}")
    rows = report.get("rows") or []
    if not rows:
        raise MftBenchError("the report has no rows; nothing to write as a reference")
    deterministic = is_deterministic(report)
    confidence = float((report.get("settings") or {}).get("confidence", 0.95))
    if tolerance is not None:
        rule = f"fixed {tolerance}"
    elif deterministic:
        rule = "exact (deterministic run)"
    else:
        rule = f"max(2*SE, {MIN_TOLERANCE})"
    metrics = []
    for row in sorted(rows, key=_key):
        if tolerance is not None:
            allowed = tolerance
        elif deterministic:
            allowed = 0.0
        else:
            allowed = default_tolerance(row, confidence=confidence)
        metrics.append({"arm": row["arm"], "benchmark": row["benchmark"], "metric": row["metric"],
                        "value": float(row["value"]), "tolerance": float(allowed), "n": int(row["n"])})
    provenance = report.get("provenance") or {}
    return {
        "recipe": report.get("recipe"),
        "created_with": {
            "mft_bench": __version__,
            "git_commit": provenance.get("git_commit"),
            "recipe_hash": report.get("recipe_hash"),
            "backbone": report.get("backbone"),
            "tolerance_rule": rule,
        },
        "metrics": metrics,
    }


def write_reference(report: dict, path: Path, *, tolerance: float | None = None) -> Path:
    """Write the report's metrics as the new reference (on purpose: ``mft-bench check --update``)."""
    return write_text_atomic(Path(path), dumps_json(reference_from_report(report, tolerance=tolerance)))


def sweep_reference(reports: dict[str, dict], *, sweep: str, tolerance: float | None = None) -> dict[str, Any]:
    """A sweep's reference: every variant's report's (see the module docstring)."""
    if not reports:
        raise MftBenchError(f"sweep {sweep}: no variant has a report.json; nothing to write as a reference")
    return {"sweep": sweep,
            "variants": {name: reference_from_report(report, tolerance=tolerance) for name, report in reports.items()}}


def check_sweep_against_reference(reports: dict[str, dict], reference: dict) -> list[str]:
    """One line per failing metric of any variant (prefixed with the variant), or per variant the sweep folder
    lacks; [] when every variant passes."""
    variants = reference.get("variants") if isinstance(reference, dict) else None
    if not isinstance(variants, dict) or not variants:
        raise MftBenchError("reference: expected a sweep reference, an object with a 'variants' object "
                            "(write one with --update on the sweep folder)")
    failures = []
    for name, expected in variants.items():
        if name not in reports:
            failures.append(f"{name}: no report.json for this variant in the sweep folder")
            continue
        failures += [f"{name}: {line}" for line in check_against_reference(reports[name], expected)]
    return failures
