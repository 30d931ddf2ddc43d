"""Small pieces every benchmark shares: provenance hashes, mean ± stderr, and rows from the offline
directory or the hub."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from mft_bench.data.offline import resolve_offline

logger = logging.getLogger(__name__)


def short_hash(data: bytes) -> str:
    """sha256 of ``data``, first 16 hex digits (the project's provenance hash)."""
    return hashlib.sha256(data).hexdigest()[:16]


def mean_stderr(values: list[float]) -> dict[str, float]:
    """Mean and standard error of the mean (sample std, ddof=1, as lm-eval's ``mean_stderr``)."""
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "stderr": float("nan")}
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "stderr": 0.0}
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": mean, "stderr": math.sqrt(variance / n)}


def aggregate_scores(records: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Metric -> mean/stderr over the per-item ``scores`` of ``records``."""
    return {m: mean_stderr([float(r["scores"][m]) for r in records]) for m in metrics}


def load_rows(hub_name: str, split: str, data_dir: str | None,
              load_from_hub: Callable[[], list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], str]:
    """(rows, data hash): from the offline directory's JSONL when it has the dataset (hash of the file's bytes),
    else from the hub (hash of the rows' canonical JSON)."""
    path = resolve_offline(hub_name, split, data_dir)
    if path is not None:
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        logger.info("%s: %d rows from %s", hub_name, len(rows), path)
        return rows, short_hash(path.read_bytes())
    rows = load_from_hub()
    canonical = "\n".join(json.dumps(row, sort_keys=True, ensure_ascii=False) for row in rows)
    return rows, short_hash(canonical.encode("utf-8"))
