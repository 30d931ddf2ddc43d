"""The paper's numbers (``results/paper/<key>.json``, shipped inside the package) and lookups in them.

A paper file (format: ``results/paper/README.md``) is validated when loaded; a malformed one is a
``MftBenchError`` naming the field. A leaf of ``report/``: the report builder, tables and plots read it; the
cross-recipe table built from reports is ``paper_table``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mft_bench.arms import paper_arms
from mft_bench.errors import MftBenchError
from mft_bench.evaluation.registry import headline_benchmarks
from mft_bench.report.collect import VAL_SUFFIX, read_json
from mft_bench.resources import paper_numbers_dir

PAPER_ARMS = paper_arms()
DOMAIN_BENCHMARKS = headline_benchmarks()
SELECTIONS = ("last", "val", "test-selected")  # how a number's checkpoint was chosen
READ_OFF_MARK = "≈"


def load_paper_numbers(key: str, directory: Path | None = None) -> dict[str, Any] | None:
    """The paper file for ``key`` (e.g. ``llama2-7b``), or None when there is none."""
    path = (directory or paper_numbers_dir()) / f"{key}.json"
    if not path.is_file():
        return None
    data = read_json(path, "paper numbers")
    validate_paper_numbers(data, str(path))
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_values(values: Any, at: str) -> None:
    if not isinstance(values, dict) or not values:
        raise MftBenchError(f"{at} must map arms to numbers (percent)")
    unknown = sorted(set(values) - set(PAPER_ARMS))
    if unknown:
        raise MftBenchError(f"{at}: unknown arm(s) {', '.join(unknown)}; known: {', '.join(PAPER_ARMS)}")
    for arm, value in values.items():
        if not _is_number(value):
            raise MftBenchError(f"{at}.{arm} must be a number (percent), got {value!r}")


def validate_paper_numbers(data: Any, where: str) -> None:
    """``MftBenchError`` naming the first malformed field of a paper file (format: results/paper/README.md)."""
    if not isinstance(data, dict) or not isinstance(data.get("domains"), dict) or not data["domains"]:
        raise MftBenchError(f"{where}: paper numbers need a non-empty 'domains' mapping")
    if data.get("selection") is not None and data["selection"] not in SELECTIONS:
        raise MftBenchError(f"{where}: selection must be one of {', '.join(SELECTIONS)}, got {data['selection']!r}")
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise MftBenchError(f"{where}: notes must be a list of strings")
    for domain, entry in data["domains"].items():
        at = f"{where}: domains.{domain}"
        if not isinstance(entry, dict):
            raise MftBenchError(f"{at} must be a mapping with 'benchmark' and 'values'")
        _check_values(entry.get("values"), f"{at}.values")
        read_off = entry.get("read_off", [])
        if not isinstance(read_off, list) or not set(read_off) <= set(entry["values"]):
            raise MftBenchError(f"{at}.read_off must list arms that have values, got {read_off!r}")
        readme = entry.get("official_readme")
        if readme is not None:
            benchmarks = readme.get("benchmarks") if isinstance(readme, dict) else None
            if not isinstance(benchmarks, dict) or not benchmarks:
                raise MftBenchError(f"{at}.official_readme needs a 'benchmarks' mapping of benchmark -> arm values")
            for name, values in benchmarks.items():
                _check_values(values, f"{at}.official_readme.benchmarks.{name}")
    abstract = data.get("abstract")
    if abstract is not None and not (isinstance(abstract, dict) and _is_number(abstract.get("mft_gain_vs_fft"))):
        raise MftBenchError(f"{where}: abstract.mft_gain_vs_fft must be a number (points)")


def paper_read_off(paper_entry: dict[str, Any] | None, arm: str) -> bool:
    """Whether the paper's number for ``arm`` was read off a plot (approximate) rather than printed."""
    return bool(paper_entry) and arm.removesuffix(VAL_SUFFIX) in (paper_entry.get("read_off") or [])


def paper_value(paper_entry: dict[str, Any] | None, arm: str) -> float | None:
    """The paper's number (percent) for an arm in one domain entry; None when it was not reported."""
    if not paper_entry:
        return None
    value = (paper_entry.get("values") or {}).get(arm.removesuffix(VAL_SUFFIX))
    return float(value) if value is not None else None


def headline_benchmark(report: dict[str, Any]) -> tuple[str, str] | None:
    """(benchmark, primary metric) a run is summed up by: the paper entry's benchmark, else the domain's, else the
    first evaluated; None without benchmarks."""
    benchmarks = report.get("benchmarks") or {}
    entry = (report.get("paper") or {}).get("entry") or {}
    wanted = entry.get("benchmark") or DOMAIN_BENCHMARKS.get(report.get("domain") or "")
    if wanted in benchmarks:
        return wanted, benchmarks[wanted]["primary_metric"]
    if benchmarks:
        first = next(iter(benchmarks))
        return first, benchmarks[first]["primary_metric"]
    return None
