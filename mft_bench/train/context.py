"""What a training arm takes besides the recipe's settings (``RunContext``) and what it hands back (``TrainResult``).

The settings of an arm are the recipe's own schema (``recipe.TrainSpec``, ``recipe.LoraSpec``); the few facts
that are not settings, but follow from the rest of the recipe and from the machine, travel beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class RunContext:
    """The run-time facts of one training stage (``translate.run_context`` derives them from the recipe).

    ``gradient_accumulation_steps``: micro-batches per optimizer step on each process, the spec's global batch
    over ``per_device_batch_size`` x processes (``TrainSpec.accumulation_steps``). ``compute_dtype``: the
    backbone's dtype, in which the forward runs (autocast) and the exports are written. ``strategy``: the spec's
    strategy resolved for this machine (``strategy.resolve_strategy``: ``auto`` is decided before training).
    """

    seed: int
    gradient_accumulation_steps: int
    compute_dtype: str
    strategy: str

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be resolved to one of {', '.join(STRATEGIES)} "
                             f"(train.strategy.resolve_strategy), got {self.strategy!r}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")


@dataclass
class TrainResult:
    """What a training arm hands back to the pipeline."""

    model: Any  # fft: trained model; mft: model with masks attached (scores trained); lora: merged dense model
    log_history: list[dict]  # trainer.state.log_history (loss per step, eval loss)
    # (global step, path): fft/lora -> dense HF folders (exports/step-N); mft -> bit-packed mask files
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    masks: dict | None = None  # mft: current_masks at the end
    validation_loss: dict[int, float] = field(default_factory=dict)  # step -> eval loss at each saved checkpoint
