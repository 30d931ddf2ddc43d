"""What each kind of stage does (``RUNNERS``: kind -> runner), and how each training method trains
(``TRAINERS``: ``arms.Arm.trainer`` -> trainer). A runner writes its files into the stage folder and returns the
outputs its manifest records; ``run.py`` decides where and when it runs.
"""

from __future__ import annotations

import copy
import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mft_bench.arms import ARMS
from mft_bench.atomic import write_json_atomic
from mft_bench.checkpoints import start_step
from mft_bench.distributed import RunProcesses
from mft_bench.recipe import Recipe, stable_hash
from mft_bench.stage_models import (
    ModelCache,
    evaluated_model,
    fresh_tmp_dir,
    materialize,
    replace_dir,
    save_model_atomic,
    saved_folder,
)
from mft_bench.stages import Stage
from mft_bench.translate import run_context

Stages = dict[str, Stage]


def run_data_stage(recipe: Recipe, stage: Stage, stages: Stages, models: ModelCache,
                   procs: RunProcesses | None = None) -> dict[str, Any]:
    from mft_bench.data import build_splits, tokenize_conversations

    splits = build_splits(recipe.data.sources, seed=recipe.seed, validation_rows=recipe.data.validation_rows,
                          data_dir=recipe.data.data_dir, selection=recipe.data.selection)
    stage.folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, conversations in splits.items():
        dataset = tokenize_conversations(conversations, models.tokenizer(), max_length=recipe.data.max_length,
                                         chat_template=recipe.data.chat_template)
        tmp = fresh_tmp_dir(stage.folder / split)
        dataset.save_to_disk(str(tmp))
        replace_dir(tmp, stage.folder / split)
        counts[split] = {"conversations": len(conversations), "rows": len(dataset),
                         "tokens": int(sum(len(ids) for ids in dataset["input_ids"]))}
    return {"counts": counts, "data_hash": stable_hash(splits, length=16)}


def _load_split(data_stage: Stage, split: str):
    from datasets import load_from_disk

    return load_from_disk(str(data_stage.folder / split))


# ----------------------------------------------------------------------------- training


def _train_fft(recipe: Recipe, model, tokenizer, train_ds, val_ds, spec, run, work: Path):
    from mft_bench.train import train_fft

    return train_fft(model, tokenizer, train_ds, val_ds, spec, run, work)


def _train_mft(recipe: Recipe, model, tokenizer, train_ds, val_ds, spec, run, work: Path):
    from mft_bench.train import train_mft

    return train_mft(model, tokenizer, train_ds, val_ds, spec, run, recipe.mask, work)


def _train_lora(recipe: Recipe, model, tokenizer, train_ds, val_ds, spec, run, work: Path):
    from mft_bench.train import train_lora

    return train_lora(model, tokenizer, train_ds, val_ds, spec, run, work)


# the training method of each arm (arms.Arm.trainer): (recipe, start model, tokenizer, train, validation, the arm's
# settings (recipe.train_spec), its RunContext, work folder) -> the trainer's result
TRAINERS: dict[str, Callable[..., Any]] = {"fft": _train_fft, "mft": _train_mft, "lora": _train_lora}


def run_train_stage(recipe: Recipe, stage: Stage, stages: Stages, models: ModelCache,
                    procs: RunProcesses) -> dict[str, Any] | None:
    """Train one arm on every process; the main process writes the stage's files and returns its outputs."""
    from transformers import set_seed

    from mft_bench.train.trainer import export_steps

    arm = ARMS[stage.arm]
    set_seed(recipe.seed)  # the stage's result depends on its inputs only, not on what ran before in this process
    data_stage = stages["data"]
    train_ds, val_ds = _load_split(data_stage, "train"), _load_split(data_stage, "validation")
    tokenizer = models.tokenizer()
    work = stage.folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    spec = recipe.train_spec(stage.name)
    run = run_context(recipe, stage.name, procs.world_size, device_bytes())
    outputs: dict[str, Any] = {"strategy": run.strategy, "processes": procs.world_size,
                               "gradient_accumulation_steps": run.gradient_accumulation_steps}
    if arm.needs_fft:
        outputs["start"] = mask_start(recipe, stage, stages)
        model = copy.deepcopy(models.fft_model(stages["fft"], outputs["start"]["step"]))
    else:
        model = copy.deepcopy(models.backbone())
    result = TRAINERS[arm.trainer](recipe, model, tokenizer, train_ds, val_ds, spec, run, work)
    del model
    if procs.is_main:
        if arm.trainer == "mft":
            from mft_bench.masking import apply_masks, save_masks

            base = models.fft_model(stages["fft"], outputs["start"]["step"])
            save_masks(result.masks, stage.folder / "masks.safetensors", base_model=base)
            save_model_atomic(apply_masks(copy.deepcopy(base), result.masks).eval(), tokenizer, stage.folder / "model")
            outputs["masks"] = "masks.safetensors"
        else:  # the last export is the trained model, in the recipe's dtype (gathered when it was sharded)
            materialize(max(result.checkpoints)[1], stage.folder / "model")
        write_json_atomic(stage.folder / "log_history.json", result.log_history)
    outputs.update({"model": "model", "log_history": "log_history.json", "checkpoints": _checkpoint_names(result, stage),
                    "export_steps": export_steps(spec.export_count, max(step for step, _ in result.checkpoints)),
                    "validation_loss": {str(k): v for k, v in (result.validation_loss or {}).items()}})
    del result
    release_memory()
    return outputs if procs.is_main else None


def _checkpoint_names(result, stage: Stage) -> list[dict[str, Any]]:
    """Checkpoints relative to the stage folder, so a run folder can be moved."""
    root = stage.folder.resolve()
    return [{"step": int(step), "path": str(Path(path).resolve().relative_to(root))}
            for step, path in result.checkpoints]


def device_bytes() -> int | None:
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory) \
        if torch.cuda.is_available() else None


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- masks


def run_mask_stage(recipe: Recipe, stage: Stage, stages: Stages, models: ModelCache,
                   procs: RunProcesses | None = None) -> dict[str, Any]:
    from transformers import set_seed

    from mft_bench.masking import apply_masks, baseline_masks, read_mask_metadata, save_masks

    set_seed(recipe.seed)
    start = mask_start(recipe, stage, stages)
    base = models.fft_model(stages["fft"], start["step"])
    # in a global mask mode, the counts per matrix of MFT's final mask (stages.build_plan adds the dependency)
    counts = read_mask_metadata(stages["mft"].folder / "masks.safetensors")["removed"] if "mft" in stage.deps else None
    masks = baseline_masks(base, recipe.mask, kind=ARMS[stage.arm].mask_kind, seed=recipe.seed,
                           removed_counts=counts)
    stage.folder.mkdir(parents=True, exist_ok=True)
    save_masks(masks, stage.folder / "masks.safetensors", base_model=base)
    dense = apply_masks(copy.deepcopy(base), masks)
    save_model_atomic(dense.eval(), models.tokenizer(), stage.folder / "model")
    return {"masks": "masks.safetensors", "model": "model", "start": start}


def mask_start(recipe: Recipe, stage: Stage, stages: Stages) -> dict[str, Any]:
    """The FFT checkpoint a stage starting from FFT (MFT, its control, a mask baseline) starts from, chosen among
    its evaluation dependencies."""
    selection = [stages[dep] for dep in stage.deps if stages[dep].kind == "eval"]
    return start_step(recipe.mask.start_from, stages["fft"], selection)


# ----------------------------------------------------------------------------- evaluation


def run_eval_stage(recipe: Recipe, stage: Stage, stages: Stages, models: ModelCache,
                   procs: RunProcesses) -> dict[str, Any]:
    """Evaluate one arm on one benchmark on this process's device: in this process (a cached model goes back to
    the CPU after), or in a fresh one on the model's folder (``evaluation.in_fresh_process``). What to run is read
    from the stage's key alone."""
    from mft_bench.evaluation.runner import evaluate

    bench = stage.key["benchmark"]
    common = dict(options=bench["options"], limit=bench["limit"], backend=recipe.evaluation.backend,
                  batch_size=recipe.evaluation.batch_size, data_dir=recipe.data.data_dir, seed=stage.key.get("seed", 0),
                  dtype=recipe.backbone.dtype, sandbox=recipe.evaluation.sandbox)
    source = evaluated_model(stage, stages, models)
    if recipe.evaluation.in_fresh_process:
        from mft_bench.evaluation.worker import EvaluationJob, evaluate_in_subprocess

        folder = saved_folder(source, stage, models)
        device = {"CUDA_VISIBLE_DEVICES": str(procs.local_rank)} if procs.device().type == "cuda" else {}
        metrics = evaluate_in_subprocess(
            EvaluationJob(model_path=str(folder), benchmark=bench["name"], out_dir=str(stage.folder), **common),
            env=device)
    else:
        model = source.load().to(procs.device())
        try:
            metrics = evaluate(model, models.tokenizer(), bench["name"], stage.folder,
                               model_path=str(source.folder) if source.folder else None, **common)
        finally:
            if source.cached:
                model.to("cpu")
            del model
            release_memory()
    return {"metrics": "metrics.json", "records": "records.jsonl", "n": metrics.get("n"),
            "summary": metrics.get("metrics", {})}


def evaluation_metrics(stage: Stage) -> dict[str, Any]:
    """The ``metrics.json`` a finished evaluation stage wrote."""
    return json.loads((stage.folder / "metrics.json").read_text())


@dataclass(frozen=True)
class StageRunner:
    """A kind of stage: what runs it and where. ``runs_on``: ``all`` processes together (training), the ``main``
    one, or ``shared``: consecutive stages of the kind are dealt out to the processes (evaluations)."""

    run: Callable[..., dict[str, Any] | None]
    runs_on: Literal["all", "main", "shared"] = "main"


# kind -> runner; each is called as run(recipe, stage, stages, models, procs)
RUNNERS: dict[str, StageRunner] = {
    "data": StageRunner(run_data_stage),
    "train": StageRunner(run_train_stage, runs_on="all"),
    "mask": StageRunner(run_mask_stage),
    "eval": StageRunner(run_eval_stage, runs_on="shared"),
}
