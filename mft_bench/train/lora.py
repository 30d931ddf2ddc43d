"""LoRA arm via peft: adapters on the projections, merged into a dense model at every export and at the end."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

from transformers import Trainer, TrainerCallback

from mft_bench.masking.architectures import LLAMA_PROJECTIONS
from mft_bench.train.config import LoraSettings, TrainConfig, TrainResult
from mft_bench.train.trainer import (
    collect_exports,
    release_gguf_quantizer,
    require_replicated_weights,
    run_arm,
    training_arguments,
)

logger = logging.getLogger(__name__)

SEVEN_PROJECTIONS = LLAMA_PROJECTIONS  # the projections MFT masks by default are LoRA's targets too


def default_target_modules(model) -> list[str] | str:
    """The paper's 7 projections when the model has them (llama-like), else every linear layer but the head."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if set(SEVEN_PROJECTIONS) <= leaf_names:
        return list(SEVEN_PROJECTIONS)
    logger.info("%s has no llama-style projections; LoRA targets all linear layers", type(model).__name__)
    return "all-linear"


def lora_config(model, settings: LoraSettings):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules or default_target_modules(model),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


class MergedExporter:
    """``exports/step-N``: base weights with the adapters merged in, as a plain HF folder."""

    def __init__(self, output_dir: Path, tokenizer) -> None:
        self.exports = output_dir / "exports"
        self.tokenizer = tokenizer

    def path(self, step: int) -> Path:
        return self.exports / f"step-{step}"

    def write(self, trainer: Trainer, target: Path) -> None:
        if not trainer.accelerator.is_main_process:
            return  # DDP replicas are identical (ZeRO-3/FSDP-sharded LoRA is not supported here)
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        # merge a copy: merging in place and unmerging again is not bit-exact and would perturb training
        merged = copy.deepcopy(peft_model).merge_and_unload()
        merged.save_pretrained(str(target))
        self.tokenizer.save_pretrained(str(target))


def train_lora(
    model,
    tokenizer,
    train_dataset,
    eval_dataset,
    config: TrainConfig,
    lora: LoraSettings,
    output_dir: str | Path,
    *,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train LoRA adapters on ``model`` (modified in place); return the merged dense model."""
    from peft import get_peft_model

    require_replicated_weights("lora")
    output_dir = Path(output_dir)
    release_gguf_quantizer(model, "lora", allow_quantized=True)
    peft_model = get_peft_model(model, lora_config(model, lora))
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable of %d parameters (%.3f%%)", trainable, total, 100 * trainable / total)
    exporter = MergedExporter(output_dir, tokenizer)
    args = training_arguments(config, output_dir, has_eval=eval_dataset is not None)
    trainer = run_arm(
        model=peft_model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset,
        config=config, output_dir=output_dir, exporter=exporter, args=args, callbacks=callbacks,
    )
    checkpoints, validation = collect_exports(trainer, exporter)
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    return TrainResult(model=merged.eval(), log_history=list(trainer.state.log_history), checkpoints=checkpoints,
                       masks=None, validation_loss=validation)
