"""Which saved checkpoint a stage reads: the step behind a planned checkpoint label, its folder, and the FFT
checkpoint the masks start from (``mask.start_from``).

A training stage's manifest lists its exports (``checkpoints``: step and path of each distinct export) and, by
index, the step of each of the ``export_count`` exports the plan labelled ``ckpt-1`` ... ``last``
(``export_steps``). Selections read finished evaluation stages' ``metrics.json``; ties go to the earliest
checkpoint, as ``Trainer(load_best_model_at_end=True)`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.stages import LAST, Stage, checkpoint_index


def export_step(train_stage: Stage, label: str) -> int:
    """The optimizer step of the export a checkpoint label stands for."""
    steps = train_stage.manifest()["outputs"]["export_steps"]
    return int(steps[checkpoint_index(label, len(steps)) - 1])


def export_path(train_stage: Stage, step: int) -> Path:
    """The export of ``step`` (a dense folder, or for MFT a mask file)."""
    for entry in train_stage.manifest()["outputs"]["checkpoints"]:
        if int(entry["step"]) == step:
            path = Path(entry["path"])
            return path if path.is_absolute() else train_stage.folder / path
    raise MftBenchError(f"{train_stage.name} has no export at step {step}")


def start_step(start_from: str, fft: Stage, selection: list[Stage]) -> dict[str, Any]:
    """The FFT step the masks start from and why: ``{"from", "step", "rule", "candidates"}``.

    ``selection``: the finished FFT evaluation stages ``start_from`` chooses among (``stages.start_selection_stages``),
    primary metric highest wins; for ``best-val`` without any, FFT's validation loss at each export, lowest wins.
    """
    return {"from": start_from, **_choose(start_from, fft, selection)}


def _choose(start_from: str, fft: Stage, selection: list[Stage]) -> dict[str, Any]:
    steps = [int(step) for step in fft.manifest()["outputs"]["export_steps"]]
    final = steps[-1]
    if start_from == LAST:
        return {"step": final, "rule": "last FFT checkpoint"}
    if start_from.startswith("step-"):
        step = int(start_from.removeprefix("step-"))
        if step not in steps:
            raise MftBenchError(f"mask.start_from {start_from}: FFT has no export at that step; its exports are at "
                                f"steps {sorted(set(steps))}")
        return {"step": step, "rule": f"FFT checkpoint at step {step} (the recipe's choice)"}
    if selection:
        scores = {}
        for stage in selection:
            metrics = json.loads((stage.folder / "metrics.json").read_text())
            scores[export_step(fft, stage.checkpoint)] = float(metrics["metrics"][metrics["primary_metric"]]["mean"])
        split = "test" if start_from == "best-test" else "validation"
        bench = selection[0].benchmark
        best = max(sorted(scores), key=lambda s: scores[s])  # sorted: the first maximum is the earliest step
        rule = f"best {bench} {split} primary metric among FFT checkpoints" + \
            (" (test-selected: the paper's protocol, optimistic)" if split == "test" else "")
        return {"step": best, "rule": rule, "candidates": {str(s): v for s, v in sorted(scores.items())}}
    losses = {int(step): float(loss) for step, loss in fft.manifest()["outputs"]["validation_loss"].items()}
    if not losses:
        raise MftBenchError("mask.start_from best-val: FFT logged no validation loss and no benchmark has a "
                            "validation split; use last or step-N")
    best = min(sorted(losses), key=lambda s: losses[s])
    return {"step": best, "rule": "lowest FFT validation loss (held-out training rows)",
            "candidates": {str(s): v for s, v in sorted(losses.items())}}
