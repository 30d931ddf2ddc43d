"""``mft-bench plan``: the stages of a recipe, which are cached, and what each will cost on this machine or on a
node of N GPUs of a named kind (``plan_cost.py``); ``reproduce paper --dry-run`` adds the whole bill."""

from __future__ import annotations

from pathlib import Path

from mft_bench.cost import DDP_EFFICIENCY, FSDP_EFFICIENCY, Hardware
from mft_bench.plan_cost import (
    ASSUMED_TOKENS_PER_ROW,
    DataCounts,
    PlanSummary,
    estimate_stages,
    fmt_bytes,
    fmt_flops,
    fmt_seconds,
    stage_costs,
    summarize,
)
from mft_bench.recipe import Recipe
from mft_bench.stages import build_plan

__all__ = ["estimate_stages", "plan_text", "render_bill", "render_plan"]


def _machine(hardware: Hardware, nproc: int) -> str:
    if hardware.device == "cpu":
        return f"{hardware.name}, {nproc} process{'es' if nproc > 1 else ''}"
    return f"{nproc} x {hardware.name}"


def _hours_line(summary: PlanSummary) -> str:
    wall_h = summary.wall_s / 3600
    if summary.hardware.device == "cpu" or summary.nproc <= 1:
        return f"{fmt_seconds(summary.wall_s)} wall"
    return (f"{fmt_seconds(summary.wall_s)} wall = {wall_h * summary.nproc:.1f} GPU-hours "
            f"(wall hours x {summary.nproc} GPUs)")


def plan_text(recipe: Recipe, run_dir: Path, *, hardware: Hardware | None = None,
              nproc: int = 1) -> tuple[str, PlanSummary | None]:
    """The plan of one recipe as text, and its summary (None when the backbone's shape is unknown)."""
    stages = build_plan(recipe, run_dir)
    costs, shape, hardware, counts = stage_costs(recipe, stages, hardware, nproc)
    lines = [f"recipe {recipe.name}  ->  {run_dir}"]
    if shape is None:
        lines.append(f"no cost model for backbone '{recipe.backbone.name}' (unknown shape): estimates omitted")
    else:
        lines.append(f"hardware: {_machine(hardware, nproc)}; backbone {recipe.backbone.name}: "
                     f"{shape.n_params / 1e6:.0f}M parameters, {shape.num_layers} layers, {recipe.backbone.dtype}")
    memory_title = "mem/GPU" if hardware.device == "cuda" else "memory"
    header = (f"{'stage':<40} {'status':<6} {'runs on':<9} {'FLOPs':>11} {'time':>9} {memory_title:>10} {'disk':>10}"
              "  depends on")
    lines += [header, "-" * len(header)]
    for cost in costs:
        status = "cached" if cost.stage.done() else "todo"
        flops = fmt_flops(cost.flops) if cost.flops else "-"
        seconds = fmt_seconds(cost.seconds) if cost.seconds is not None else "-"
        memory = fmt_bytes(cost.memory_bytes) if cost.memory_bytes is not None else "-"
        disk = fmt_bytes(cost.disk_bytes) if cost.disk_bytes else "-"
        fit = "" if cost.fits else "  [does not fit]"
        lines.append(f"{cost.stage.name:<40} {status:<6} {cost.runs_on:<9} {flops:>11} {seconds:>9} {memory:>10} "
                     f"{disk:>10}  {', '.join(cost.stage.deps)}{fit}")
    if shape is None:
        return "\n".join(lines), None
    summary = summarize(recipe, costs, hardware, nproc)
    lines += [note for cost in costs for note in cost.notes]
    lines += _assumptions(recipe, counts, hardware, nproc)
    verdict = "" if summary.fits else f"; does not fit: {', '.join(summary.not_fitting)}"
    per = "GPU" if hardware.device == "cuda" else "process"
    lines.append(f"estimated time of the remaining stages: {_hours_line(summary)} (plus model loading); peak "
                 f"{fmt_bytes(summary.peak_bytes)} per {per}; disk {fmt_bytes(summary.disk_bytes)} "
                 f"(+{fmt_bytes(summary.transient_disk_bytes)} while a resume checkpoint is written){verdict}")
    return "\n".join(lines), summary


def _assumptions(recipe: Recipe, counts: DataCounts, hardware: Hardware, nproc: int) -> list[str]:
    if counts.measured:
        tokens = f"training tokens: {counts.train_tokens:,} per epoch (measured by the data stage)"
    else:
        tokens = (f"training tokens: {counts.train_tokens:,} per epoch assumed ({counts.train_rows:,} rows x "
                  f"{ASSUMED_TOKENS_PER_ROW:g} x max_length {recipe.data.max_length}); run the data stage, then plan "
                  "again for the measured count")
    lines = [tokens]
    if hardware.device == "cuda" and nproc > 1:
        lines.append(f"on {nproc} GPUs: training runs on all of them at {DDP_EFFICIENCY:.0%} (ddp) / "
                     f"{FSDP_EFFICIENCY:.0%} (fsdp) scaling; evaluation stages are dealt out one per GPU, the "
                     "block lasting as long as its busiest GPU")
    if recipe.evaluation.backend == "vllm":
        lines.append("evaluation times are the hf backend's; vLLM is usually faster")
    return lines


def render_plan(recipe: Recipe, run_dir: Path, *, hardware: Hardware | None = None, nproc: int = 1) -> str:
    return plan_text(recipe, run_dir, hardware=hardware, nproc=nproc)[0]


def render_bill(summaries: list[PlanSummary]) -> str:
    """The whole bill of several plans run one after another on the same machine: node-hours are the wall hours of
    the node, GPU-hours the wall hours times its GPUs."""
    first = summaries[0]
    gpus = first.nproc if first.hardware.device == "cuda" else 0

    def row(name: str, wall_s: float, peak: int, disk: int, fits: str) -> str:
        gpu_hours = f"{wall_s / 3600 * gpus:.1f}" if gpus else "-"
        return (f"{name:<28} {wall_s / 3600:>10.1f} {gpu_hours:>10} {fmt_bytes(peak):>10} {fmt_bytes(disk):>10}  "
                f"{fits}")

    lines = [f"bill on {_machine(first.hardware, first.nproc)}:"]
    header = f"{'recipe':<28} {'node-hours':>10} {'GPU-hours':>10} {'peak/GPU':>10} {'disk':>10}  fits"
    lines += [header, "-" * len(header)]
    for s in summaries:
        lines.append(row(s.recipe, s.wall_s, s.peak_bytes, s.disk_bytes,
                         "yes" if s.fits else "NO: " + ", ".join(s.not_fitting)))
    lines.append(row("all", sum(s.wall_s for s in summaries), max(s.peak_bytes for s in summaries),
                     sum(s.disk_bytes for s in summaries), "yes" if all(s.fits for s in summaries) else "NO"))
    if gpus:
        lines.append(f"node-hours = wall hours of the one node; GPU-hours = wall hours x {gpus} GPUs")
    lines.append(f"disk: every recipe's stage folders kept, +{fmt_bytes(max(s.transient_disk_bytes for s in summaries))}"
                 " while a resume checkpoint is written; times exclude model loading")
    return "\n".join(lines)
