"""Mask fine-tuning (MFT): from the FFT model, learn only the mask scores of a band of layers, same data.

Only ``<module>.scores`` train (AdamW, no weight decay). The weights are frozen, so autograd records nothing below
the lowest masked layer: the embeddings' output needs no gradient, and neither does any block under the band.
Gradient checkpointing stays non-reentrant and without HF's embedding ``requires_grad`` hook, which would make
autograd differentiate the whole frozen stack below the band.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from transformers import Trainer, TrainerCallback

from mft_bench.backbone import release_gguf_quantizer
from mft_bench.errors import MftBenchError
from mft_bench.train.callbacks import MaskRefreshCallback
from mft_bench.recipe import MaskSpec, TrainSpec
from mft_bench.train.context import RunContext, TrainResult
from mft_bench.train.trainer import (
    ArmTrainer,
    collect_exports,
    release,
    run_arm,
    training_arguments,
)

logger = logging.getLogger(__name__)

SCORES_SUFFIX = ".scores"


class MftTrainer(ArmTrainer):
    """Trainer checkpoints hold only the scores: the weights are frozen and equal to the FFT model's, which the
    caller passes in again on resume (a 7B checkpoint shrinks from the full model to the band's scores)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            model = self.accelerator.unwrap_model(self.model)
            state_dict = {n: p.detach() for n, p in model.named_parameters() if n.endswith(SCORES_SUFFIX)}
        super()._save(output_dir, state_dict=state_dict)

    def _issue_warnings_after_load(self, load_result) -> None:
        missing_scores = [k for k in load_result.missing_keys if k.endswith(SCORES_SUFFIX)]
        if missing_scores:  # resuming without the scores would silently restart the masks
            raise MftBenchError(f"MFT checkpoint lacks mask scores {missing_scores[:3]}...; delete it and rerun")
        if load_result.unexpected_keys:
            logger.warning("unexpected keys in the MFT checkpoint: %s", load_result.unexpected_keys[:10])


class MaskExporter:
    """``exports/masks-step-N.safetensors``: the bit-packed keep-masks of the current scores."""

    def __init__(self, output_dir: Path) -> None:
        self.exports = output_dir / "exports"

    def path(self, step: int) -> Path:
        return self.exports / f"masks-step-{step}.safetensors"

    def write(self, trainer: Trainer, target: Path) -> None:
        from mft_bench.masking import current_masks, save_masks

        if not trainer.accelerator.is_main_process:
            return  # DDP replicas hold identical scores
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_masks(current_masks(model), target, base_model=model)


def check_only_scores_train(model) -> int:
    """Number of trainable score entries; raises if anything else would train."""
    others = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(SCORES_SUFFIX)]
    if others:
        raise MftBenchError(f"MFT must train only mask scores, but these require grad: {others[:5]}")
    count = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    if count == 0:
        raise MftBenchError("MFT: no mask scores to train (attach_masks selected nothing)")
    return count


def enable_frozen_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing without the embeddings-require-grad hook HF adds for adapters."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()


def train_mft(
    model,
    tokenizer,
    train_dataset,
    eval_dataset,
    spec: TrainSpec,
    run: RunContext,
    mask_spec: MaskSpec,
    output_dir: str | Path,
    *,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Attach masks per ``mask_spec`` to the FFT ``model`` (in place, scores initialised from ``run.seed``) and
    train their scores; resumable.

    Exports the masks at each interval as ``output_dir/exports/masks-step-N.safetensors``. The scores are fp32
    whatever ``spec.precision`` (as in the official code); the frozen weights stay in the model's dtype and the
    compute runs in ``run.compute_dtype``.
    """
    from mft_bench.masking import attach_masks, current_masks

    if run.strategy != "ddp":
        raise MftBenchError("MFT reads whole weights on every process: train it with strategy ddp")
    output_dir = Path(output_dir)
    release_gguf_quantizer(model, "mft")
    names = attach_masks(model, mask_spec, seed=run.seed)
    n_scores = check_only_scores_train(model)
    logger.info("MFT: %d modules, %d scores train", len(names), n_scores)
    if spec.weight_decay:
        logger.info("MFT ignores weight_decay=%g: scores train without weight decay (paper)", spec.weight_decay)
    if spec.gradient_checkpointing:
        enable_frozen_checkpointing(model)
    exporter = MaskExporter(output_dir)
    # checkpointing is already on the model: Trainer's own switch would re-add the embedding hook
    args = training_arguments(spec, run, output_dir, has_eval=eval_dataset is not None, weight_decay=0.0,
                              activation_checkpointing=False)
    trainer = run_arm(
        model=model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset, spec=spec,
        run=run, output_dir=output_dir, exporter=exporter, args=args, trainer_cls=MftTrainer,
        callbacks=[MaskRefreshCallback(), *callbacks],
    )
    checkpoints, validation = collect_exports(trainer, exporter)
    log_history = list(trainer.state.log_history)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    release(trainer)
    return TrainResult(model=trained.eval(), log_history=log_history, checkpoints=checkpoints,
                       masks=current_masks(trained), validation_loss=validation)
