"""Run-folder reading for the report: ``run.json`` and what it points at; checkpoint selection.

``RUN_DIR/run.json`` (written by the pipeline) lists every evaluation (arm, checkpoint, step, split,
benchmark, metrics.json, records.jsonl), the training logs and the mask files; paths are relative to
RUN_DIR. Missing or malformed files are user-fixable problems (:class:`MftBenchError`).

Checkpoint selection: on the validation split (:func:`select_by_validation`); on the test benchmark itself
only where the recipe asks for it to stand beside a paper that did so (:func:`select_by_test`, labelled).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mft_bench.errors import MftBenchError

log = logging.getLogger(__name__)

LAST = "last"
VAL_SUFFIX = "@val"
TEST_SUFFIX = "@test"
# row families by how their checkpoint was chosen: the suffix of the row's arm name
SELECTION_SUFFIXES = {"last": "", "val": VAL_SUFFIX, "test-selected": TEST_SUFFIX}


def comparable_selection(report: dict[str, Any], benchmark: str, metric: str, wanted: str | None) -> str:
    """The family of a report's rows to set beside a number chosen by ``wanted`` (a paper's selection): the same
    selection where the report has rows of it on that benchmark and metric, else ``last``."""
    wanted = wanted if wanted in SELECTION_SUFFIXES else "last"
    suffix = SELECTION_SUFFIXES[wanted]
    present = not suffix or any(r["arm"].endswith(suffix) for r in report["rows"]
                                if r["benchmark"] == benchmark and r["metric"] == metric)
    return wanted if present else "last"


def split_arm(name: str) -> tuple[str, str]:
    """``"mft@test"`` -> ``("mft", "test-selected")``; a plain arm -> ``(arm, "last")``."""
    for selection, suffix in SELECTION_SUFFIXES.items():
        if suffix and name.endswith(suffix):
            return name[: -len(suffix)], selection
    return name, "last"


@dataclass(frozen=True)
class Evaluation:
    """One (arm, checkpoint, split, benchmark) evaluation with its aggregate metrics and item scores."""

    arm: str
    checkpoint: str
    step: int | None
    split: str
    benchmark: str
    primary_metric: str
    n: int
    metrics: dict[str, dict[str, float]]  # name -> {"mean", "stderr"}
    scores: dict[str, dict[str, float]]  # item id -> {metric: score}; empty when there are no records
    versions: dict[str, Any] = field(default_factory=dict)
    isolation: str | None = None  # code benchmarks: the sandbox level their code ran at

    def item_scores(self, metric: str) -> dict[str, float]:
        """Item id -> score for one metric (items that lack the metric are left out)."""
        return {item: values[metric] for item, values in self.scores.items() if metric in values}


@dataclass(frozen=True)
class RunData:
    """Everything ``run.json`` describes, loaded."""

    run_dir: Path
    recipe: str
    domain: str | None
    backbone: str | None
    paper_key: str | None
    arms: list[str]
    evaluations: list[Evaluation]
    training: dict[str, Path]  # arm -> log_history.json
    masks: dict[str, Path]  # arm -> masks.safetensors
    provenance: dict[str, Any]
    raw: dict[str, Any]


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, turning absence or bad JSON into an :class:`MftBenchError` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MftBenchError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise MftBenchError(f"{what} is not valid JSON: {path} ({exc})") from None
    except UnicodeDecodeError as exc:
        raise MftBenchError(f"{what} is not UTF-8 text: {path} (byte at offset {exc.start})") from None
    except IsADirectoryError:
        raise MftBenchError(f"{what} is a folder, not a file: {path}") from None


def read_records(path: Path) -> dict[str, dict[str, float]]:
    """``records.jsonl`` -> item id -> scores. A torn last line (interrupted write) is skipped with a warning."""
    scores: dict[str, dict[str, float]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MftBenchError(f"records file not found: {path}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("skipping a torn last line in %s", path)
                continue
            raise MftBenchError(f"{path}:{number} is not valid JSON") from None
        if "id" not in record or not isinstance(record.get("scores"), dict):
            raise MftBenchError(f"{path}:{number} lacks 'id' or 'scores'")
        item = str(record["id"])
        if item in scores:
            raise MftBenchError(f"{path}:{number} repeats item id {item!r}")
        scores[item] = {
            str(name): float(value)
            for name, value in record["scores"].items()
            if isinstance(value, (int, float)) and math.isfinite(float(value))
        }
    return scores


def _resolve(run_dir: Path, relative: str | None) -> Path | None:
    if not relative:
        return None
    path = Path(relative)
    return path if path.is_absolute() else run_dir / path


def _load_evaluation(run_dir: Path, entry: dict[str, Any], index: int) -> Evaluation:
    where = f"run.json evaluations[{index}]"
    for key in ("arm", "benchmark", "metrics"):
        if key not in entry:
            raise MftBenchError(f"{where} lacks {key!r}")
    metrics_path = _resolve(run_dir, entry["metrics"])
    assert metrics_path is not None
    metrics = read_json(metrics_path, f"metrics of {where}")
    if not isinstance(metrics.get("metrics"), dict) or not metrics["metrics"]:
        raise MftBenchError(f"{metrics_path} has no 'metrics' mapping")
    records_path = _resolve(run_dir, entry.get("records"))
    scores = read_records(records_path) if records_path is not None else {}
    primary = metrics.get("primary_metric") or sorted(metrics["metrics"])[0]
    step = entry.get("step")
    return Evaluation(
        arm=str(entry["arm"]),
        checkpoint=str(entry.get("checkpoint") or LAST),
        step=int(step) if step is not None else None,
        split=str(entry.get("split") or "test"),
        benchmark=str(entry["benchmark"]),
        primary_metric=str(primary),
        n=int(metrics.get("n") or len(scores)),
        metrics={str(k): dict(v) for k, v in metrics["metrics"].items() if isinstance(v, dict)},
        scores=scores,
        versions=dict(metrics.get("versions") or {}),
        isolation=str(metrics["isolation"]) if metrics.get("isolation") else None,
    )


def load_run(run_dir: Path) -> RunData:
    """Read ``RUN_DIR/run.json`` and every metrics/records file it names."""
    run_dir = Path(run_dir)
    raw = read_json(run_dir / "run.json", "run description (run.json)")
    if not isinstance(raw, dict):
        raise MftBenchError(f"{run_dir / 'run.json'} must hold a JSON object")
    evaluations = [_load_evaluation(run_dir, entry, i) for i, entry in enumerate(raw.get("evaluations") or [])]
    if not evaluations:
        raise MftBenchError(f"{run_dir / 'run.json'} lists no evaluations; run the pipeline first")
    arms = [str(a) for a in raw.get("arms") or []]
    for evaluation in evaluations:  # arms evaluated but not listed still get rows, after the listed ones
        if evaluation.arm not in arms:
            arms.append(evaluation.arm)
    training = {}
    for entry in raw.get("training") or []:
        path = _resolve(run_dir, entry.get("log_history"))
        if entry.get("arm") and path is not None:
            training[str(entry["arm"])] = path
    masks = {}
    for arm, relative in (raw.get("masks") or {}).items():
        path = _resolve(run_dir, relative)
        if path is not None:
            masks[str(arm)] = path
    return RunData(
        run_dir=run_dir,
        recipe=str(raw.get("recipe") or run_dir.name),
        domain=raw.get("domain"),
        backbone=raw.get("backbone"),
        paper_key=raw.get("paper_key"),
        arms=arms,
        evaluations=evaluations,
        training=training,
        masks=masks,
        provenance=dict(raw.get("provenance") or {}),
        raw=raw,
    )


def _step_order(evaluation: Evaluation) -> float:
    """Training progress of a checkpoint: its step; "last" without a step counts as the end."""
    if evaluation.step is not None:
        return float(evaluation.step)
    return math.inf if evaluation.checkpoint == LAST else -math.inf


def last_test_evaluations(run: RunData, arm: str) -> dict[str, Evaluation]:
    """Benchmark -> the test evaluation of the arm's last checkpoint ("last", else the latest step)."""
    chosen: dict[str, Evaluation] = {}
    for evaluation in run.evaluations:
        if evaluation.arm != arm or evaluation.split != "test":
            continue
        current = chosen.get(evaluation.benchmark)
        if current is None or _rank_last(evaluation) > _rank_last(current):
            chosen[evaluation.benchmark] = evaluation
    return chosen


def _rank_last(evaluation: Evaluation) -> tuple[int, float]:
    return (1 if evaluation.checkpoint == LAST else 0, _step_order(evaluation))


@dataclass(frozen=True)
class Selection:
    """The validation-selected checkpoint of one arm."""

    arm: str
    checkpoint: str
    step: int | None
    score: float
    benchmarks: list[str]
    candidates: dict[str, float]  # checkpoint -> validation score


def select_by_validation(run: RunData, arm: str) -> Selection | None:
    """Pick the arm's checkpoint by its validation score only; None when it has no validation evaluations.

    Score of a checkpoint = mean of the primary metric over the benchmarks evaluated on the validation
    split for *every* candidate checkpoint. Candidates are checkpoints that also have test evaluations
    (their test numbers are what the "<arm>@val" row reports). Ties go to the EARLIEST checkpoint (fewest
    steps), as ``transformers.Trainer(load_best_model_at_end=True)`` does: a later checkpoint must be
    strictly better on validation to be chosen.
    """
    validation = [e for e in run.evaluations if e.arm == arm and e.split == "validation"]
    if not validation:
        return None
    tested = {e.checkpoint for e in run.evaluations if e.arm == arm and e.split == "test"}
    by_checkpoint: dict[str, dict[str, Evaluation]] = {}
    for evaluation in validation:
        if evaluation.checkpoint in tested:
            by_checkpoint.setdefault(evaluation.checkpoint, {})[evaluation.benchmark] = evaluation
    if not by_checkpoint:
        log.warning("arm %s: validation evaluations exist but none of those checkpoints has test results", arm)
        return None
    common = sorted(set.intersection(*(set(v) for v in by_checkpoint.values())))
    if not common:
        log.warning("arm %s: no benchmark was evaluated on validation for every checkpoint", arm)
        return None
    candidates: dict[str, float] = {}
    order: list[tuple[float, str]] = []
    for checkpoint, evaluations in by_checkpoint.items():
        values = [_primary_mean(evaluations[b]) for b in common]
        candidates[checkpoint] = sum(values) / len(values)
        order.append((_step_order(evaluations[common[0]]), checkpoint))
    best: str | None = None
    for _, checkpoint in sorted(order):
        if best is None or candidates[checkpoint] > candidates[best]:
            best = checkpoint
    assert best is not None
    step = by_checkpoint[best][common[0]].step
    return Selection(arm, best, step, candidates[best], common, dict(sorted(candidates.items())))


def select_by_test(run: RunData, arm: str) -> dict[str, Evaluation]:
    """Benchmark -> the arm's test evaluation whose primary metric is highest among its checkpoints (ties: the
    earliest): the paper's protocol. Optimistic (the test set chose it); {} with a single checkpoint."""
    by_benchmark: dict[str, list[Evaluation]] = {}
    for evaluation in run.evaluations:
        if evaluation.arm == arm and evaluation.split == "test":
            by_benchmark.setdefault(evaluation.benchmark, []).append(evaluation)
    chosen = {}
    for benchmark, candidates in by_benchmark.items():
        if len(candidates) < 2:
            continue
        best = None
        for evaluation in sorted(candidates, key=_step_order):
            if best is None or _primary_mean(evaluation) > _primary_mean(best):
                best = evaluation
        chosen[benchmark] = best
    return chosen


def evaluations_at(run: RunData, arm: str, checkpoint: str) -> dict[str, Evaluation]:
    """Benchmark -> test evaluation of one checkpoint of an arm."""
    return {
        e.benchmark: e
        for e in run.evaluations
        if e.arm == arm and e.split == "test" and e.checkpoint == checkpoint
    }


def _primary_mean(evaluation: Evaluation) -> float:
    metric = evaluation.metrics.get(evaluation.primary_metric)
    if metric is not None and "mean" in metric:
        return float(metric["mean"])
    values = list(evaluation.item_scores(evaluation.primary_metric).values())
    if not values:
        raise MftBenchError(
            f"validation evaluation of {evaluation.arm}/{evaluation.checkpoint}/{evaluation.benchmark} "
            f"has no value for its primary metric {evaluation.primary_metric!r}"
        )
    return sum(values) / len(values)


def read_log_history(path: Path) -> list[dict[str, Any]]:
    """Trainer ``log_history`` (a list of dicts); also accepts ``{"log_history": [...]}`` (trainer_state.json)."""
    data = read_json(path, "training log history")
    if isinstance(data, dict):
        data = data.get("log_history", [])
    if not isinstance(data, list):
        raise MftBenchError(f"{path} must hold a list of Trainer log entries")
    return [entry for entry in data if isinstance(entry, dict)]

