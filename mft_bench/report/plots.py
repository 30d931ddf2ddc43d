"""Report figures (matplotlib, object API only — no pyplot global state), each saved as PNG and SVG.

- ``metrics``: bars with interval error bars, one panel per benchmark (primary metric), one bar per arm;
  the paper's number, when there is one, as a black diamond.
- ``training``: training/eval loss against step per arm from Trainer ``log_history``; primary metric
  against step when intermediate checkpoints were evaluated.
- ``masks``: removed fraction per layer and module of the MFT mask, and the overlap of the MFT mask with
  each baseline mask. Needs ``mft_bench.masking`` (mask files and statistics); skipped with a log
  message when it is unavailable.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from mft_bench.atomic import write_bytes_atomic
from mft_bench.report.collect import LAST, RunData, read_log_history
from mft_bench.report.paper_numbers import paper_value
from mft_bench.report.tables import display_arm

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_OVERLAP_KEYS = ("removed_overlap", "overlap", "jaccard", "removed_jaccard", "agreement")


def save_figure(figure: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` atomically, with no timestamps (reproducible files)."""
    import matplotlib

    written = []
    for fmt, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
        buffer = io.BytesIO()
        with matplotlib.rc_context({"svg.hashsalt": "mft-bench"}):  # stable SVG element ids
            figure.savefig(buffer, format=fmt, dpi=100, metadata=metadata)
        written.append(write_bytes_atomic(Path(out_dir) / f"{stem}.{fmt}", buffer.getvalue()))
    return written


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def plot_metric_bars(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Bars with CI error bars per benchmark (primary metric) and arm."""
    benchmarks = report.get("benchmarks") or {}
    if not benchmarks:
        return []
    paper = report.get("paper") or {}
    entry = paper.get("entry") or {}
    figure = _new_figure(max(4.0, 3.2 * len(benchmarks)), 3.6)
    axes = figure.subplots(1, len(benchmarks), squeeze=False)[0]
    for ax, (benchmark, info) in zip(axes, benchmarks.items()):
        rows = [r for r in report["rows"] if r["benchmark"] == benchmark and r["metric"] == info["primary_metric"]]
        labels = [display_arm(r["arm"]) for r in rows]
        values = [100.0 * r["value"] for r in rows]
        errors = [[100.0 * (r["value"] - r["ci_low"]) for r in rows],
                  [100.0 * (r["ci_high"] - r["value"]) for r in rows]]
        positions = list(range(len(rows)))
        colors = ["tab:red" if r["arm"].startswith("mft") else "tab:blue" if r["arm"].startswith("fft")
                  else "tab:gray" for r in rows]
        ax.bar(positions, values, yerr=errors, capsize=3, color=colors)
        if entry.get("benchmark") == benchmark:
            marks = [(i, paper_value(entry, r["arm"])) for i, r in enumerate(rows)]
            marks = [(i, v) for i, v in marks if v is not None]
            if marks:
                ax.scatter([i for i, _ in marks], [v for _, v in marks], marker="D", color="black", zorder=3,
                           label=f"paper ({paper.get('model')})")
                ax.legend(fontsize=7)
        ax.set_xticks(positions, labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{benchmark} (n={info.get('n')})", fontsize=9)
        ax.set_ylabel(f"{info['primary_metric']} (%)", fontsize=8)
    return save_figure(figure, out_dir, "metrics")


def _curve_points(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(float(e["step"]), float(e[key])) for e in history if key in e and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


def _last_steps(run: RunData, histories: Mapping[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Arm -> the step of its "last" checkpoint: from an evaluation that states it, else the training log."""
    steps: dict[str, float] = {}
    for arm, history in histories.items():
        logged = [float(e["step"]) for e in history if "step" in e]
        if logged:
            steps[arm] = max(logged)
    for e in run.evaluations:
        if e.checkpoint == LAST and e.step is not None:
            steps[e.arm] = float(e.step)
    return steps


def _checkpoint_series(
    run: RunData, histories: Mapping[str, list[dict[str, Any]]]
) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    """(arm, benchmark, split) -> [(step, primary metric %)] over checkpoints, for arms with several of them."""
    last_steps = _last_steps(run, histories)
    series: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for e in run.evaluations:
        step = float(e.step) if e.step is not None else last_steps.get(e.arm) if e.checkpoint == LAST else None
        metric = e.metrics.get(e.primary_metric, {})
        if step is None or "mean" not in metric:
            continue
        series.setdefault((e.arm, e.benchmark, e.split), []).append((step, 100.0 * float(metric["mean"])))
    return {key: sorted(points) for key, points in series.items() if len(points) > 1}


def plot_training_curves(run: RunData, out_dir: Path) -> list[Path]:
    """Loss against step (fft, mft, any other logged arm) and, when available, metric against step."""
    histories = {arm: read_log_history(path) for arm, path in sorted(run.training.items()) if path.is_file()}
    for arm, path in run.training.items():
        if not path.is_file():
            log.warning("training log of %s not found (%s); not plotted", arm, path)
    series = _checkpoint_series(run, histories)
    if not histories and not series:
        return []
    panels = int(bool(histories)) + int(bool(series))
    figure = _new_figure(5.0 * panels, 3.6)
    axes = list(figure.subplots(1, panels, squeeze=False)[0])
    if histories:
        ax = axes.pop(0)
        for arm, history in histories.items():
            steps, values = _curve_points(history, "loss")
            if steps:
                ax.plot(steps, values, label=f"{arm} train")
            steps, values = _curve_points(history, "eval_loss")
            if steps:
                ax.plot(steps, values, linestyle="--", marker="o", markersize=3, label=f"{arm} eval")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss", fontsize=9)
        ax.legend(fontsize=7)
    if series:
        ax = axes.pop(0)
        colours: dict[tuple[str, str], str] = {}
        for (arm, benchmark, split), points in sorted(series.items()):
            colour = colours.setdefault((arm, benchmark), f"C{len(colours) % 10}")
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, color=colour,
                    linestyle="--" if split == "validation" else "-", label=f"{arm} {benchmark} ({split})")
        ax.set_xlabel("step")
        ax.set_ylabel("primary metric (%)")
        ax.set_title("metric over checkpoints", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(figure, out_dir, "training")


def _split_name(name: str) -> tuple[int | None, str]:
    match = _LAYER.search(name)
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]


def _removed_fraction(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping):
        for key in ("removed_fraction", "removed_ratio", "fraction_removed", "sparsity"):
            if key in value:
                return float(value[key])
        if "removed" in value and "numel" in value and value["numel"]:
            return float(value["removed"]) / float(value["numel"])
    return None


def mask_stats_frame(statistics: Any) -> pd.DataFrame:
    """Normalise ``mask_statistics`` output to columns name, layer, module, removed_fraction.

    Accepts a DataFrame, a list of per-matrix dicts (with ``name``), or ``{name: dict | float}``.
    """
    if isinstance(statistics, pd.DataFrame):
        records = statistics.to_dict("records")
    elif isinstance(statistics, Mapping):
        inner = statistics.get("per_module") or statistics.get("modules") or statistics
        records = [{"name": name, **(v if isinstance(v, Mapping) else {"removed_fraction": v})}
                   for name, v in inner.items() if isinstance(v, (Mapping, int, float))]
    else:
        records = list(statistics)
    rows = []
    for record in records:
        name = str(record.get("name") or record.get("module_name") or "")
        fraction = _removed_fraction(record)
        if fraction is None:
            continue
        layer, module = _split_name(name)
        layer = record.get("layer", layer)
        module = record.get("module") or module
        rows.append({"name": name, "layer": layer, "module": str(module), "removed_fraction": fraction})
    return pd.DataFrame(rows, columns=["name", "layer", "module", "removed_fraction"])


def overlap_value(overlap: Any) -> float | None:
    """A scalar from ``mask_overlap`` output (a float, or a dict with one of the usual keys)."""
    if isinstance(overlap, (int, float)):
        return float(overlap)
    if isinstance(overlap, Mapping):
        for key in _OVERLAP_KEYS:
            if key in overlap and isinstance(overlap[key], (int, float)):
                return float(overlap[key])
    return None


def plot_mask_frames(stats: pd.DataFrame, overlaps: Mapping[str, float], out_dir: Path) -> list[Path]:
    """Heat map of removed fraction (layer x module) and bars of MFT-vs-baseline overlap."""
    if stats.empty and not overlaps:
        return []
    panels = int(not stats.empty) + int(bool(overlaps))
    figure = _new_figure(5.0 * panels, 3.6)
    axes = list(figure.subplots(1, panels, squeeze=False)[0])
    if not stats.empty:
        ax = axes.pop(0)
        grid = stats.dropna(subset=["layer"]).pivot_table(
            index="layer", columns="module", values="removed_fraction", aggfunc="mean")
        if grid.empty:
            grid = stats.pivot_table(index="name", values="removed_fraction", aggfunc="mean")
        image = ax.imshow(grid.to_numpy(dtype=float) * 100.0, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index], fontsize=7)
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title("MFT mask: removed % per layer and module", fontsize=9)
        figure.colorbar(image, ax=ax, label="removed (%)")
    if overlaps:
        ax = axes.pop(0)
        names = sorted(overlaps)
        ax.bar(range(len(names)), [overlaps[n] for n in names], color="tab:gray")
        ax.set_xticks(range(len(names)), [display_arm(n) for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("overlap with MFT mask (Jaccard, removed)", fontsize=8)
        ax.set_title("MFT vs baseline masks", fontsize=9)
    return save_figure(figure, out_dir, "masks")


def plot_mask_statistics(run: RunData, out_dir: Path) -> list[Path]:
    """Mask figure from the run's mask files; [] (with a log message) when masks or the masking API are absent."""
    mft_path = run.masks.get("mft")
    if mft_path is None or not mft_path.is_file():
        log.info("no MFT mask file in the run; mask plot skipped")
        return []
    try:
        from mft_bench.masking.mask_io import load_masks as load
        from mft_bench.masking.stats import mask_overlap, mask_statistics
    except ImportError as exc:
        log.info("mask statistics unavailable (%s); mask plot skipped", exc)
        return []
    mft = load(mft_path, base_model=None)
    stats = mask_stats_frame(mask_statistics(mft))
    overlaps: dict[str, float] = {}
    for arm, path in sorted(run.masks.items()):
        if arm == "mft" or not path.is_file():
            continue
        value = overlap_value(mask_overlap(mft, load(path, base_model=None)))
        if value is None:
            log.info("mask_overlap(mft, %s) gave no scalar; left out of the plot", arm)
        else:
            overlaps[arm] = value
    return plot_mask_frames(stats, overlaps, out_dir)


def write_plots(report: dict[str, Any], run: RunData | None, out_dir: Path) -> list[Path]:
    """Every figure this report can have, into ``out_dir`` (typically ``RUN_DIR/plots``)."""
    written = plot_metric_bars(report, out_dir)
    if run is not None:
        written += plot_training_curves(run, out_dir)
        written += plot_mask_statistics(run, out_dir)
    return written

