"""Glue shared by the arms: TrainingArguments from a TrainSpec and RunContext, step schedule, resume, Trainer run,
results.

Everything distributed comes from ``transformers.Trainer`` and accelerate: under several processes (``mft-bench run
--nproc N``, torchrun, accelerate launch) an arm trains data-parallel, or sharded with FSDP2 where its resolved
``RunContext.strategy`` says so (``strategy.py``). Precision settings live in ``precision.py``.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import has_length

from mft_bench.errors import MftBenchError
from mft_bench.recipe import LOSS_REDUCTIONS, TrainSpec
from mft_bench.train.callbacks import ExportCallback, Exporter, SealCallback, checkpoint_problem
from mft_bench.train.context import RunContext
from mft_bench.train.precision import autocast_arguments
from mft_bench.train.sampling import EpochSeededLengthGroupedSampler, sequence_lengths
from mft_bench.train.strategy import fsdp_arguments, fsdp_on_cpu

logger = logging.getLogger(__name__)

MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")
# Trainer checkpoints only serve resuming (evaluation reads the exports), so only the newest are kept; two, so
# that a kill while writing the newest still leaves a complete one.
RESUME_CHECKPOINTS_KEPT = 2
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOGGING_STEPS = 1  # the loss of every optimizer step goes into log_history


IGNORE_INDEX = -100


class ArmTrainer(Trainer):
    """Trainer whose length-grouped data order is a pure function of (seed, epoch), so resumes replay it exactly,
    which asks the model for logits only where a token is labelled (``labelled_logits_only``), and which reduces
    the loss per token (Trainer's own) or per sequence (``loss_reduction``, see ``sequence_loss``)."""

    _labelled_logits: bool | None = None

    def __init__(self, *args, loss_reduction: str = "token", **kwargs) -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise MftBenchError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {loss_reduction!r}")
        super().__init__(*args, **kwargs)
        self.loss_reduction = loss_reduction
        if loss_reduction == "sequence":
            self.loss_is_scaled_for_ga = True  # sequence_loss divides by the step's sequence count itself

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._labelled_logits is None:
            self._labelled_logits = self.label_smoother is None and self.compute_loss_func is None and \
                supports_labelled_logits(self.accelerator.unwrap_model(model))
        if self.loss_reduction == "sequence":
            return self.sequence_loss(model, inputs, return_outputs=return_outputs,
                                      num_sequences=num_items_in_batch)
        if self._labelled_logits:
            inputs = labelled_logits_only(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def sequence_loss(self, model, inputs, *, return_outputs=False, num_sequences=None):
        """The official code's loss: each sequence's mean over its labelled tokens, averaged over the sequences.

        In training ``num_sequences`` is the count of the whole optimizer step (every micro-batch of the
        accumulation on every process, ``_get_num_items_in_batch``): this micro-batch contributes the sum of its
        sequence means over that count, times the process count that data parallelism divides gradients by, so
        the step's gradient is the mean over all its sequences, as the official micro-batch-1 loss averaged by
        accumulation and DDP. Without a count (evaluation) it is the mean over this batch's sequences.
        """
        labels = inputs["labels"]
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        keep = targets != IGNORE_INDEX
        forward = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        if self._labelled_logits and bool(keep.any()):
            outputs = model(**forward, logits_to_keep=keep)
            logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])  # one row per kept position
        else:
            outputs = model(**forward)
            logits = outputs.logits[keep]
        token_loss = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        rows = keep.nonzero(as_tuple=True)[0]
        counts = keep.sum(dim=1)
        sums = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows,
                                                                                                          token_loss)
        labelled = counts > 0
        means = sums[labelled] / counts[labelled]
        if num_sequences is None:
            loss = means.sum() / max(int(labelled.sum()), 1)
        else:
            loss = means.sum() / max(num_sequences, 1) * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples, device):
        if self.loss_reduction != "sequence":
            return super()._get_num_items_in_batch(batch_samples, device)
        # sequences with at least one labelled target, over the step's micro-batches and processes
        count = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).any(dim=-1).sum()) for b in batch_samples)
        count = torch.tensor(count, device=device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or dataset is None or not has_length(dataset):
            return super()._get_train_sampler(train_dataset)
        # grouped by the global batch (all processes), so the rows of each optimizer step do not depend on how many
        # processes share it: accelerate then hands the micro-batches out to the processes in turn
        batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSeededLengthGroupedSampler(sequence_lengths(dataset), batch_size, seed)


def supports_labelled_logits(model) -> bool:
    """Whether the model's forward slices hidden states by a boolean ``logits_to_keep`` mask (transformers'
    shared ``slice_logits_to_keep``) and passes ``shift_labels`` to its loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return False
    return getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None) is not None


def labelled_logits_only(inputs: dict) -> dict:
    """The same loss with logits only at positions whose next token is labelled.

    With assistant-only labels half or more of the tokens are prompt; their vocabulary-sized logits (the largest
    activation of a small model, 49k wide for SmolLM2) were computed, kept for backward and thrown away. The
    boolean ``logits_to_keep`` selects per row; ``shift_labels`` are the matching targets, so the summed loss and
    its token count (``num_items_in_batch``) are unchanged.
    """
    labels = inputs.get("labels")
    if labels is None or "logits_to_keep" in inputs:
        return inputs
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = shifted != IGNORE_INDEX
    if not bool(keep.any()):
        return inputs
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[keep]}


def updates_per_epoch(num_examples: int, per_device_batch_size: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps per epoch, as Trainer counts them (accelerate gives every rank ceil(batches / world))."""
    batches = math.ceil(num_examples / per_device_batch_size)
    per_rank = math.ceil(batches / world_size)
    return max(math.ceil(per_rank / grad_accum), 1)


def export_steps(export_count: int, max_steps: int) -> list[int]:
    """The optimizer step of each of ``export_count`` evaluable exports, evenly spaced, the last at ``max_steps``
    (the i-th at round(i * max_steps / count); with fewer steps than exports two may share a step)."""
    return [max(1, round(i * max_steps / export_count)) for i in range(1, export_count + 1)]


def total_steps(spec: TrainSpec, steps_per_epoch: int) -> int:
    return spec.max_steps if spec.max_steps > 0 else math.ceil(spec.epochs * steps_per_epoch)


def last_checkpoint(output_dir: Path) -> Path | None:
    """Newest Trainer checkpoint that is complete and intact (its files match its seal, ``SealCallback``), or
    None. A damaged newer one is passed over, with one line saying why."""
    if not output_dir.is_dir():
        return None
    found = sorted(((int(m.group(1)), child) for child in output_dir.iterdir()
                    if (m := _CHECKPOINT_RE.match(child.name))), reverse=True)
    for _, child in found:
        problem = checkpoint_problem(child)
        if problem is None:
            return child
        logger.warning("not resuming from %s: %s; trying an older checkpoint", child.name, problem)
    return None


def training_arguments(
    spec: TrainSpec,
    run: RunContext,
    output_dir: Path,
    *,
    has_eval: bool,
    weight_decay: float | None = None,
    activation_checkpointing: bool | None = None,
    model=None,
) -> TrainingArguments:
    """TrainingArguments for one arm; save/eval steps are filled in by ``run_arm`` once the data size is known.

    ``model`` is needed for ``strategy="fsdp"`` (its decoder layer class is the unit of sharding)."""
    checkpointing = spec.gradient_checkpointing if activation_checkpointing is None else activation_checkpointing
    sharding = {}
    if run.strategy == "fsdp":
        sharding = fsdp_arguments(model, activation_checkpointing=checkpointing)
        checkpointing = False  # FSDP's own (fsdp_arguments)
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=spec.weight_decay if weight_decay is None else weight_decay,
        per_device_train_batch_size=spec.per_device_batch_size,
        per_device_eval_batch_size=spec.per_device_batch_size,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        max_grad_norm=spec.max_grad_norm,
        **autocast_arguments(run.compute_dtype),
        # non-reentrant: reentrant checkpointing drops the gradient of a block whose inputs need none (frozen
        # lower layers), see DESIGN.md
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_strategy="steps",
        logging_steps=LOGGING_STEPS,
        eval_strategy="steps" if has_eval else "no",
        prediction_loss_only=True,  # validation loss only: never gather vocabulary-sized logits
        save_strategy="steps",
        save_total_limit=RESUME_CHECKPOINTS_KEPT,
        seed=run.seed,
        data_seed=run.seed,
        train_sampling_strategy="group_by_length" if spec.group_by_length else "random",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable tensor (weights, scores, adapters) is used each step
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning without an accelerator only warns
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        # without it a CPU-only torchrun/accelerate launch initialises gloo but trains each rank alone
        use_cpu=not has_accelerator(),
        **sharding,
    )


def has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def model_columns(dataset):
    """Keep only what the model and collator take (chat-formatting leftovers would break padding)."""
    if hasattr(dataset, "column_names") and hasattr(dataset, "select_columns"):
        missing = {"input_ids", "labels"} - set(dataset.column_names)
        if missing:
            raise MftBenchError(
                f"training data lacks column(s) {sorted(missing)}; tokenize it with mft_bench.data.tokenize_conversations"
            )
        return dataset.select_columns([c for c in MODEL_COLUMNS if c in dataset.column_names])
    return dataset


def run_arm(
    *,
    model,
    tokenizer,
    train_dataset,
    eval_dataset,
    spec: TrainSpec,
    run: RunContext,
    output_dir: Path,
    exporter: Exporter,
    args: TrainingArguments,
    trainer_cls: type[Trainer] = ArmTrainer,
    callbacks: Sequence[TrainerCallback] = (),
) -> Trainer:
    """Train (resuming from the newest checkpoint in ``output_dir`` if any) and return the finished Trainer."""
    output_dir.mkdir(parents=True, exist_ok=True)
    train_dataset = model_columns(train_dataset)
    eval_dataset = model_columns(eval_dataset) if eval_dataset is not None else None
    if not has_length(train_dataset) and spec.max_steps <= 0:
        raise MftBenchError("train.max_steps must be set when the training data has no length (streaming)")
    if has_length(train_dataset) and len(train_dataset) == 0:
        raise MftBenchError("the training data is empty")

    steps_per_epoch = (
        updates_per_epoch(len(train_dataset), spec.per_device_batch_size, run.gradient_accumulation_steps,
                          args.world_size)
        if has_length(train_dataset) else spec.max_steps
    )
    max_steps = total_steps(spec, steps_per_epoch)
    exports = export_steps(spec.export_count, max_steps)
    # Trainer saves (and evaluates) on its own only at resume intervals and the end; the export callback asks
    # for a save and an evaluation at every export step
    args.save_steps = spec.resume_every_steps or max_steps
    args.eval_steps = max_steps
    logger.info("%d optimizer steps (%d per epoch), exports at steps %s, resume checkpoints every %d",
                max_steps, steps_per_epoch, exports, args.save_steps)

    export_callback = ExportCallback(exporter, exports, evaluate=eval_dataset is not None)
    seal_callback = SealCallback()
    sharded_on_cpu = run.strategy == "fsdp" and args.world_size > 1 and not has_accelerator()
    with fsdp_on_cpu() if sharded_on_cpu else contextlib.nullcontext():
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            callbacks=[*callbacks, seal_callback, export_callback],  # arm callbacks (mask refresh) first
            loss_reduction=spec.loss_reduction,
        )
        export_callback.bind(trainer)
        seal_callback.bind(trainer)
        resume = last_checkpoint(output_dir)
        if resume is not None:
            logger.info("resuming from %s", resume)
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        trainer.accelerator.wait_for_everyone()
    export_callback.bind(None)  # the callbacks' references would keep the Trainer (and its optimizer) alive
    seal_callback.bind(None)
    return trainer


def release(trainer: Trainer) -> None:
    """Drop what a finished Trainer holds (optimizer states, wrapped model, accelerator references) and give the
    memory back, so the next stage starts with the device empty."""
    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.model_wrapped = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def collect_exports(trainer: Trainer, exporter: Exporter) -> tuple[list[tuple[int, Path]], dict[int, float]]:
    """(step, export path) of every export that exists, and the validation loss logged at those steps."""
    eval_loss = {int(e["step"]): float(e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e}
    steps = range(1, trainer.state.global_step + 1)
    checkpoints = [(s, exporter.path(s)) for s in steps if exporter.path(s).exists()]
    validation = {s: eval_loss[s] for s, _ in checkpoints if s in eval_loss}
    return checkpoints, validation
