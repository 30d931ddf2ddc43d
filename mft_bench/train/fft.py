"""Full fine-tuning (FFT): every weight trains. The starting point of MFT and the FFT arm of the comparison."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from transformers import Trainer, TrainerCallback

from mft_bench.train.config import TrainConfig, TrainResult
from mft_bench.train.trainer import collect_exports, release_gguf_quantizer, run_arm, training_arguments

logger = logging.getLogger(__name__)

# Trainer's bookkeeping inside a saved model folder; an export is a plain HF model folder without it.
_NOT_EXPORTED = ("training_args.bin",)


class DenseExporter:
    """``exports/step-N``: the model as a standard HF folder (safetensors + config + tokenizer)."""

    def __init__(self, output_dir: Path) -> None:
        self.exports = output_dir / "exports"

    def path(self, step: int) -> Path:
        return self.exports / f"step-{step}"

    def write(self, trainer: Trainer, target: Path) -> None:
        # Trainer.save_model gathers ZeRO-3 / FSDP shards; every rank must call it
        trainer.save_model(str(target))
        if trainer.accelerator.is_main_process:
            for name in _NOT_EXPORTED:
                (target / name).unlink(missing_ok=True)


def train_fft(
    model,
    tokenizer,
    train_dataset,
    eval_dataset,
    config: TrainConfig,
    output_dir: str | Path,
    *,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Fully fine-tune ``model`` in place; exports under ``output_dir/exports/step-N``, resumable."""
    output_dir = Path(output_dir)
    release_gguf_quantizer(model, "fft")
    for param in model.parameters():
        param.requires_grad_(True)  # a backbone may arrive frozen (e.g. from an eval stage)
    exporter = DenseExporter(output_dir)
    args = training_arguments(config, output_dir, has_eval=eval_dataset is not None)
    trainer = run_arm(
        model=model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset, config=config,
        output_dir=output_dir, exporter=exporter, args=args, callbacks=callbacks,
    )
    checkpoints, validation = collect_exports(trainer, exporter)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    return TrainResult(model=trained.eval(), log_history=list(trainer.state.log_history), checkpoints=checkpoints,
                       masks=None, validation_loss=validation)
