"""Typed settings and results of the training arms (fft, mft, lora).

Defaults are the paper's (arXiv 2503.22764, LLaMA2-7B; see DESIGN.md): AdamW lr 2e-5, linear schedule with 3%
warmup, no weight decay, 2 epochs, effective batch 128 (4 per device x 32 accumulation steps on one process).
A recipe overrides any of them; the pipeline derives the accumulation from the recipe's global batch and the
number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.recipe import SCHEDULERS

PRECISIONS = ("mixed", "pure")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("ddp", "fsdp")
LOSS_REDUCTIONS = ("token", "sequence")


@dataclass
class TrainConfig:
    """Hyperparameters of one training stage (one arm)."""

    epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-5
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0  # MFT always trains without weight decay, whatever is set here
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 32  # effective 128 on 1 device
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    # mixed: trained weights kept in fp32, compute (autocast) and exports in compute_dtype; pure: trained weights in
    # compute_dtype themselves. compute_dtype is the backbone's dtype.
    precision: str = "mixed"
    compute_dtype: str = "float32"
    strategy: str = "ddp"  # ddp: a whole replica per process; fsdp: weights, grads and optimizer state sharded
    save_every: float | None = None  # fraction of an epoch (paper: 1/3) -> intermediate exports; None = final only
    logging_steps: int = 1
    seed: int = 0
    group_by_length: bool = True
    # Optimizer steps between Trainer resume checkpoints; None = only at the save_every intervals (and the end).
    resume_every_steps: int | None = None
    # token: mean over every labelled token of a step; sequence: mean over the step's sequences of each one's token
    # mean (the official code's per-example loss at micro-batch 1, averaged over accumulation and processes)
    loss_reduction: str = "token"

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs, allow_zero=self.max_steps > 0)
        _positive("learning_rate", self.learning_rate)
        _positive("per_device_batch_size", self.per_device_batch_size)
        _positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive("logging_steps", self.logging_steps)
        if self.max_steps == 0 or self.max_steps < -1:
            raise MftBenchError(f"train.max_steps must be -1 (use epochs) or a positive step count, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise MftBenchError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise MftBenchError("train.weight_decay and train.max_grad_norm must be >= 0")
        if self.lr_scheduler not in SCHEDULERS:
            raise MftBenchError(f"train.lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.save_every is not None and not 0.0 < self.save_every <= max(self.epochs, 1.0):
            raise MftBenchError(
                f"train.save_every is a fraction of an epoch (paper: 0.3333), got {self.save_every}; use null for final only"
            )
        if self.save_every is not None and self.max_steps > 0:
            raise MftBenchError("train.save_every is a fraction of the epochs trained; with max_steps leave it null")
        if self.resume_every_steps is not None:
            _positive("resume_every_steps", self.resume_every_steps)
        for name, value, allowed in (("precision", self.precision, PRECISIONS),
                                     ("compute_dtype", self.compute_dtype, COMPUTE_DTYPES),
                                     ("strategy", self.strategy, STRATEGIES),
                                     ("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)):
            if value not in allowed:
                raise MftBenchError(f"train.{name} must be one of {', '.join(allowed)}, got {value!r}")

    @property
    def export_count(self) -> int:
        return export_count(self.epochs, self.save_every)


def export_count(epochs: float, save_every: float | None) -> int:
    """Evaluable exports an arm writes: one every ``save_every`` epochs, evenly spaced, the last at the end (the
    paper's 1/3 over 2 epochs: 6); 1 (the end) without ``save_every``. Known before training."""
    return 1 if save_every is None else max(1, round(epochs / save_every))


@dataclass
class LoraSettings:
    """LoRA adapter settings; defaults are the paper's LoRA baseline (r=64, alpha=16, dropout 0.1, 7 projections)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] | None = None  # None: the 7 projections when present, else every linear layer

    def __post_init__(self) -> None:
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise MftBenchError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and (isinstance(self.target_modules, str) or not self.target_modules):
            raise MftBenchError(f"lora.target_modules must be a non-empty list or null, got {self.target_modules!r}")


@dataclass
class TrainResult:
    """What a training arm hands back to the pipeline."""

    model: Any  # fft: trained model; mft: model with masks attached (scores trained); lora: merged dense model
    log_history: list[dict]  # trainer.state.log_history (loss per step, eval loss)
    # (global step, path): fft/lora -> dense HF folders (exports/step-N); mft -> bit-packed mask files
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    masks: dict | None = None  # mft: current_masks at the end
    validation_loss: dict[int, float] = field(default_factory=dict)  # step -> eval loss at each saved checkpoint


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise MftBenchError(f"train.{name} must be a positive number, got {value!r}")
