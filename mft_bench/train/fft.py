"""Full fine-tuning (FFT): every weight trains. The starting point of MFT and the FFT arm of the comparison."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from transformers import Trainer, TrainerCallback

from mft_bench.backbone import release_gguf_quantizer
from mft_bench.recipe import TrainSpec
from mft_bench.train.context import RunContext, TrainResult
from mft_bench.train.precision import cast_floating, dtype_of, keep_trainable_in_fp32
from mft_bench.train.trainer import collect_exports, release, run_arm, training_arguments

logger = logging.getLogger(__name__)


class DenseExporter:
    """``exports/step-N``: the model as a standard HF folder (safetensors + config + tokenizer) in ``dtype``, the
    backbone's: fp32 master weights of mixed-precision training are cast once, here."""

    def __init__(self, output_dir: Path, dtype: str) -> None:
        self.exports = output_dir / "exports"
        self.dtype = dtype_of(dtype)

    def path(self, step: int) -> Path:
        return self.exports / f"step-{step}"

    def write(self, trainer: Trainer, target: Path) -> None:
        # gathers FSDP shards into a whole state dict on the main process: every process must call it
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.accelerator.is_main_process:
            model = trainer.accelerator.unwrap_model(trainer.model)
            model.save_pretrained(str(target), state_dict=cast_floating(state_dict, self.dtype))
            trainer.processing_class.save_pretrained(str(target))


def train_fft(
    model,
    tokenizer,
    train_dataset,
    eval_dataset,
    spec: TrainSpec,
    run: RunContext,
    output_dir: str | Path,
    *,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Fully fine-tune ``model`` in place; exports under ``output_dir/exports/step-N``, resumable.

    ``TrainResult.model`` is the trained model cast to ``run.compute_dtype`` (what the exports hold), or None when
    it was sharded (FSDP): read the last export then.
    """
    output_dir = Path(output_dir)
    release_gguf_quantizer(model, "fft")
    for param in model.parameters():
        param.requires_grad_(True)  # a backbone may arrive frozen (e.g. from an eval stage)
    if spec.precision == "mixed":
        cast = keep_trainable_in_fp32(model)
        if cast:
            logger.info("mixed precision: %d weight tensors kept in fp32, compute in %s", cast, run.compute_dtype)
    exporter = DenseExporter(output_dir, run.compute_dtype)
    args = training_arguments(spec, run, output_dir, has_eval=eval_dataset is not None, model=model)
    trainer = run_arm(
        model=model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset, spec=spec, run=run,
        output_dir=output_dir, exporter=exporter, args=args, callbacks=callbacks,
    )
    checkpoints, validation = collect_exports(trainer, exporter)
    log_history = list(trainer.state.log_history)
    trained = None if trainer.is_fsdp_enabled else trainer.accelerator.unwrap_model(trainer.model)
    release(trainer)
    if trained is not None:
        trained = trained.to(dtype_of(run.compute_dtype)).eval()
    return TrainResult(model=trained, log_history=log_history, checkpoints=checkpoints, masks=None,
                       validation_loss=validation)
