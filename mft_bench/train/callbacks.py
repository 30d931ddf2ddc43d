"""Trainer callbacks of the arms: evaluable exports at each interval and at the end.

Trainer's own ``checkpoint-N`` folders exist to resume and are pruned; what evaluation reads is the export
written here: a dense HF folder (fft, lora merged) or a bit-packed mask file (mft), one per interval step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from transformers import Trainer, TrainerCallback

from mft_bench.atomic import write_json_atomic

logger = logging.getLogger(__name__)


class Exporter(Protocol):
    """How one arm writes its evaluable state for a step."""

    def path(self, step: int) -> Path:
        """Final location of the export of ``step`` (a folder or a file)."""

    def write(self, trainer: Trainer, target: Path) -> None:
        """Write the export to ``target``. Called on every rank (collective saves); rank-0-only work inside."""


class ExportCallback(TrainerCallback):
    """Exports at each of ``steps`` (optimizer steps; the last is the end of training), right after the Trainer
    saved: at those steps it asks the Trainer for a save and, with ``evaluate``, a validation-loss evaluation.

    Exports are written to a temporary name and renamed, so a kill never leaves a half-written export. A kill
    between Trainer's checkpoint and the export is repaired on resume: the resumed weights are that step's.
    """

    def __init__(self, exporter: Exporter, steps: Sequence[int], *, evaluate: bool = False) -> None:
        self.exporter = exporter
        self.steps = set(steps)
        self.evaluate = evaluate
        self.trainer: Trainer | None = None

    def bind(self, trainer: Trainer | None) -> ExportCallback:
        self.trainer = trainer  # collective saves (FSDP) go through the Trainer; None once training is over
        return self

    def is_due(self, step: int, max_steps: int) -> bool:
        return step > 0 and (step in self.steps or step >= max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.is_due(state.global_step, state.max_steps):
            control.should_save = True
            control.should_evaluate = control.should_evaluate or self.evaluate
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        if self.is_due(state.global_step, state.max_steps):  # only true when resuming
            self._export(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.is_due(state.global_step, state.max_steps):
            self._export(state.global_step)

    def _export(self, step: int) -> None:
        if self.trainer is None:
            raise RuntimeError("ExportCallback.bind(trainer) was not called")
        target = self.exporter.path(step)
        if target.exists():  # an export is never overwritten
            return
        tmp = target.with_name(f".tmp-{target.name}")
        accelerator = self.trainer.accelerator
        if accelerator.is_main_process:
            _remove(tmp)  # a leftover of a killed run
            tmp.parent.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        self.exporter.write(self.trainer, tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(tmp, target)
            logger.info("exported step %d to %s", step, target)
        accelerator.wait_for_everyone()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class MaskRefreshCallback(TrainerCallback):
    """Marks every mask stale after each optimizer step (and after a resume loaded the scores).

    The masking wrappers cache the top-k under the scores' version counter, but fused optimizers (torch's
    default ``adamw_torch_fused``, DeepSpeed's) update parameters without bumping it: without this the masks
    would silently never change. Selection still runs once per optimizer step, at the next forward.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._invalidate(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._invalidate(model)

    @staticmethod
    def _invalidate(model) -> None:
        from mft_bench.masking import invalidate_masks

        if model is not None:
            invalidate_masks(model)


SEAL = ".mft-bench-seal.json"  # in each Trainer checkpoint: its files and sizes, written once all are saved


class SealCallback(TrainerCallback):
    """Seals each Trainer checkpoint once every process has saved its part: a list of its files with their sizes.
    ``trainer.last_checkpoint`` resumes only from a checkpoint whose files still match its seal, so a checkpoint
    damaged later (a deleted or truncated file) is passed over for the one before it."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def bind(self, trainer: Trainer | None) -> SealCallback:
        self.trainer = trainer
        return self

    def on_save(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError("SealCallback.bind(trainer) was not called")
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if accelerator.is_main_process and folder.is_dir():
            sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
                     if p.is_file() and p.name != SEAL}
            write_json_atomic(folder / SEAL, sizes)
        accelerator.wait_for_everyone()


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from (None when its files match its seal)."""
    try:
        sizes = json.loads((folder / SEAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "it was never sealed (interrupted while saving)"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
    return None
