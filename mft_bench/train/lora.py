"""LoRA arm via peft: adapters on the projections, merged into a dense model at every export and at the end."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from mft_bench.backbone import release_gguf_quantizer
from mft_bench.errors import MftBenchError
from mft_bench.masking.architectures import LLAMA_PROJECTIONS
from mft_bench.recipe import LoraSpec
from mft_bench.train.context import RunContext, TrainResult
from mft_bench.train.precision import dtype_of
from mft_bench.train.trainer import (
    collect_exports,
    release,
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


def check_target_modules(model, names: Sequence[str]) -> None:
    """``MftBenchError`` unless each of ``names`` matches a module of ``model`` as peft matches a list entry (the
    module's name, or its last dotted parts); peft itself refuses only a list of which nothing matches."""
    modules = [name for name, _ in model.named_modules() if name]
    for target in names:
        if not any(name == target or name.endswith(f".{target}") for name in modules):
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, torch.nn.Linear)})
            raise MftBenchError(f"lora.target_modules: no module '{target}' in {type(model).__name__}; its linear "
                                f"layers are {', '.join(linear)}")


def lora_config(model, spec: LoraSpec):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules or default_target_modules(model),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def merged_dense(peft_model, dtype, *, in_place: bool = False):
    """``peft_model`` with its adapters merged into a dense model: the merge runs in fp32 and the result is cast to
    ``dtype`` once (merging into bf16 weights would round the small adapter deltas away twice). Unless ``in_place``
    a copy is merged: merging and unmerging again is not bit-exact and would perturb a model still training."""
    source = peft_model if in_place else copy.deepcopy(peft_model)
    return source.float().merge_and_unload().to(dtype)


class MergedExporter:
    """``exports/step-N``: base weights with the adapters merged in, as a plain HF folder in ``dtype``."""

    def __init__(self, output_dir: Path, tokenizer, dtype: str) -> None:
        self.exports = output_dir / "exports"
        self.tokenizer = tokenizer
        self.dtype = dtype_of(dtype)

    def path(self, step: int) -> Path:
        return self.exports / f"step-{step}"

    def write(self, trainer: Trainer, target: Path) -> None:
        if not trainer.accelerator.is_main_process:
            return  # data-parallel replicas are identical (LoRA never shards)
        merged = merged_dense(trainer.accelerator.unwrap_model(trainer.model), self.dtype)
        merged.save_pretrained(str(target))
        self.tokenizer.save_pretrained(str(target))


def train_lora(
    model,
    tokenizer,
    train_dataset,
    eval_dataset,
    spec: LoraSpec,
    run: RunContext,
    output_dir: str | Path,
    *,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train LoRA adapters on ``model`` (modified in place); return the merged dense model in
    ``run.compute_dtype``. Mixed precision keeps the adapters in fp32 over a base in the model's dtype."""
    from peft import get_peft_model

    if run.strategy != "ddp":
        raise MftBenchError("LoRA merges adapters into whole weights on every process: train it with strategy ddp")
    output_dir = Path(output_dir)
    release_gguf_quantizer(model, "lora", allow_quantized=True)
    peft_model = get_peft_model(model, lora_config(model, spec), autocast_adapter_dtype=spec.precision == "mixed")
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable of %d parameters (%.3f%%)", trainable, total, 100 * trainable / total)
    exporter = MergedExporter(output_dir, tokenizer, run.compute_dtype)
    args = training_arguments(spec, run, output_dir, has_eval=eval_dataset is not None)
    trainer = run_arm(
        model=peft_model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset,
        spec=spec, run=run, output_dir=output_dir, exporter=exporter, args=args, callbacks=callbacks,
    )
    checkpoints, validation = collect_exports(trainer, exporter)
    log_history = list(trainer.state.log_history)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    release(trainer)
    merged = merged_dense(trained, dtype_of(run.compute_dtype), in_place=True)
    return TrainResult(model=merged.eval(), log_history=log_history, checkpoints=checkpoints,
                       masks=None, validation_loss=validation)
