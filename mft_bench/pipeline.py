"""Run a recipe: execute unfinished stages of its plan in order, then write ``run.json`` and the report.

Models stay in memory between stages of one process (the backbone is loaded once, the FFT model is reused by
MFT and the mask baselines), and every stage persists its output in its own folder, so a rerun skips what
is finished and resumes what is not (Trainer checkpoints, per-item evaluation records).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

from mft_bench.atomic import write_json_atomic
from mft_bench.errors import MftBenchError
from mft_bench.plan import (
    Stage,
    build_plan,
    checkpoint_eval_stages,
    finish_stage,
    package_versions,
    retire_folder,
    stages_to_force,
)
from mft_bench.recipe import Recipe, recipe_yaml

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


def default_run_dir(recipe: Recipe) -> Path:
    return Path(recipe.output_dir or Path("runs") / recipe.name)


def check_run_dir(recipe: Recipe, run_dir: Path) -> None:
    """Refuse a run folder that belongs to another recipe (its results would be mixed)."""
    run_file = run_dir / RUN_FILE
    marker = run_dir / "recipe.yaml"
    for existing in (run_file, marker):
        if existing.is_file():
            try:
                name = json.loads(existing.read_text()).get("recipe") if existing.suffix == ".json" else \
                    _recipe_name_from_yaml(existing)
            except (ValueError, OSError):
                name = None
            if name and name != recipe.name:
                raise MftBenchError(
                    f"run folder {run_dir} holds results of recipe '{name}', not '{recipe.name}': choose another --out"
                )


def _recipe_name_from_yaml(path: Path) -> str | None:
    import yaml

    data = yaml.safe_load(path.read_text())
    return data.get("name") if isinstance(data, dict) else None


class ModelCache:
    """Loads each model at most once per process; hands out copies where a stage mutates them."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self._backbone = None
        self._tokenizer = None
        self._fft = None

    def backbone(self):
        if self._backbone is None:
            from mft_bench.backbone import load_backbone

            spec = self.recipe.backbone
            logger.info("loading backbone %s", spec.name)
            self._backbone, self._tokenizer = load_backbone(spec.name, gguf_file=spec.gguf_file, dtype=spec.dtype,
                                                            seed=self.recipe.seed)
        return self._backbone

    def tokenizer(self):
        if self._tokenizer is None:
            self.backbone()
        return self._tokenizer

    def fft_model(self, fft_stage: Stage):
        if self._fft is None:
            self._fft = load_model_folder(fft_stage.folder / "model", self.recipe.backbone.dtype)
        return self._fft

    def set_fft(self, model) -> None:
        self._fft = model


def load_model_folder(folder: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- stages


def run_data_stage(recipe: Recipe, stage: Stage, models: ModelCache) -> dict[str, Any]:
    from mft_bench.data import build_splits, tokenize_conversations

    splits = build_splits(recipe.data.sources, seed=recipe.seed, validation_rows=recipe.data.validation_rows,
                          data_dir=recipe.data.data_dir)
    stage.folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, conversations in splits.items():
        dataset = tokenize_conversations(conversations, models.tokenizer(), max_length=recipe.data.max_length)
        tmp = _fresh_tmp_dir(stage.folder / split)
        dataset.save_to_disk(str(tmp))
        _replace_dir(tmp, stage.folder / split)
        counts[split] = {"conversations": len(conversations), "rows": len(dataset),
                         "tokens": int(sum(len(ids) for ids in dataset["input_ids"]))}
    data_hash = _hash_conversations(splits)
    return {"counts": counts, "data_hash": data_hash}


def _hash_conversations(splits: dict[str, list]) -> str:
    from mft_bench.recipe import stable_hash

    return stable_hash(splits, length=16)


def _load_split(data_stage: Stage, split: str):
    from datasets import load_from_disk

    return load_from_disk(str(data_stage.folder / split))


def _train_config(spec, seed: int):
    from mft_bench.train import TrainConfig

    fields = spec.model_dump()
    for extra in ("r", "alpha", "dropout", "target_modules"):
        fields.pop(extra, None)
    return TrainConfig(**fields, seed=seed)


def _mask_spec(recipe: Recipe):
    from mft_bench.masking import MaskSpec

    m = recipe.mask
    return MaskSpec(layers=list(m.layers), modules=m.modules, mask_ratio=m.mask_ratio, init=m.init,
                    seed=recipe.seed, mode=m.mode)


def _fresh_tmp_dir(target: Path) -> Path:
    """A sibling temporary folder for ``target``, emptied of what a killed attempt may have left."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a completely written folder into place (the stage is unfinished, so an old copy is a leftover)."""
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def _save_model_atomic(model, tokenizer, folder: Path) -> None:
    tmp = _fresh_tmp_dir(folder)
    model.save_pretrained(tmp)  # safetensors (the only format in transformers 5)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, folder)


def _checkpoint_names(result, stage: Stage) -> list[dict[str, Any]]:
    """Checkpoints relative to the stage folder, so a run folder can be moved."""
    root = stage.folder.resolve()
    return [{"step": int(step), "path": str(Path(path).resolve().relative_to(root))}
            for step, path in result.checkpoints]


def run_train_stage(recipe: Recipe, stage: Stage, stages: dict[str, Stage], models: ModelCache) -> dict[str, Any]:
    from mft_bench.train import LoraSettings, train_fft, train_lora, train_mft

    data_stage = stages["data"]
    train_ds, val_ds = _load_split(data_stage, "train"), _load_split(data_stage, "validation")
    tokenizer = models.tokenizer()
    work = stage.folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Any] = {}
    if stage.name == "fft":
        model = copy.deepcopy(models.backbone())
        result = train_fft(model, tokenizer, train_ds, val_ds, _train_config(recipe.fft, recipe.seed), work)
        _save_model_atomic(result.model.eval(), tokenizer, stage.folder / "model")
        models.set_fft(result.model.eval())
    elif stage.name == "mft":
        from mft_bench.masking import apply_masks, save_masks

        model = copy.deepcopy(models.fft_model(stages["fft"]))
        result = train_mft(model, tokenizer, train_ds, val_ds, _train_config(recipe.mft, recipe.seed),
                           _mask_spec(recipe), work)
        masks = result.masks
        base = models.fft_model(stages["fft"])
        save_masks(masks, stage.folder / "masks.safetensors", base_model=base)
        dense = apply_masks(copy.deepcopy(base), masks)
        _save_model_atomic(dense.eval(), tokenizer, stage.folder / "model")
        outputs["masks"] = "masks.safetensors"
    elif stage.name == "lora":
        lora = recipe.lora
        settings = LoraSettings(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
        model = copy.deepcopy(models.backbone())
        result = train_lora(model, tokenizer, train_ds, val_ds, _train_config(lora, recipe.seed), settings, work)
        _save_model_atomic(result.model.eval(), tokenizer, stage.folder / "model")
    else:
        raise ValueError(f"not a training stage: {stage.name}")
    write_json_atomic(stage.folder / "log_history.json", result.log_history)
    outputs.update({"model": "model", "log_history": "log_history.json", "checkpoints": _checkpoint_names(result, stage),
                    "validation_loss": {str(k): v for k, v in (result.validation_loss or {}).items()}})
    return outputs


def run_mask_stage(recipe: Recipe, stage: Stage, stages: dict[str, Stage], models: ModelCache) -> dict[str, Any]:
    from mft_bench.masking import apply_masks, baseline_masks, save_masks

    base = models.fft_model(stages["fft"])
    kind = "random" if stage.name == "random_mask" else "magnitude"
    masks = baseline_masks(base, _mask_spec(recipe), kind=kind, seed=recipe.seed)
    stage.folder.mkdir(parents=True, exist_ok=True)
    save_masks(masks, stage.folder / "masks.safetensors", base_model=base)
    dense = apply_masks(copy.deepcopy(base), masks)
    _save_model_atomic(dense.eval(), models.tokenizer(), stage.folder / "model")
    return {"masks": "masks.safetensors", "model": "model"}


def _checkpoint_path(train_stage: Stage, step: int) -> Path:
    for entry in train_stage.manifest()["outputs"]["checkpoints"]:
        if int(entry["step"]) == step:
            path = Path(entry["path"])
            return path if path.is_absolute() else train_stage.folder / path
    raise ValueError(f"{train_stage.name} has no checkpoint at step {step}")


def _arm_model(stage: Stage, stages: dict[str, Stage], models: ModelCache):
    """(model object, model folder or None) for an evaluation stage's arm and checkpoint."""
    if stage.checkpoint != "last":
        step = int(stage.checkpoint.removeprefix("step-"))
        path = _checkpoint_path(stages[stage.arm], step)
        if stage.arm == "mft":  # intermediate MFT checkpoints are mask files over the FFT model
            from mft_bench.masking import apply_masks, load_masks

            base = models.fft_model(stages["fft"])
            return apply_masks(copy.deepcopy(base), load_masks(path, base_model=base)).eval(), None
        return load_model_folder(path, models.recipe.backbone.dtype), path
    if stage.arm == "baseline":
        return models.backbone(), None
    if stage.arm == "fft":
        return models.fft_model(stages["fft"]), stages["fft"].folder / "model"
    folder = stages[stage.arm].folder / "model"
    return load_model_folder(folder, models.recipe.backbone.dtype), folder


def _on_accelerator(model):
    """Every arm is evaluated on the same device: the GPU when there is one (Trainer left trained arms there)."""
    import torch

    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model = model.to("cuda")
    return model


def run_eval_stage(recipe: Recipe, stage: Stage, stages: dict[str, Stage], models: ModelCache) -> dict[str, Any]:
    from mft_bench.evaluation.runner import evaluate

    bench = next(b for b in recipe.evaluation.benchmarks if b.name == stage.benchmark)
    options = stage.key["benchmark"]["options"]
    backend = recipe.evaluation.backend
    if backend == "vllm" and stage.checkpoint == "last":  # the engine loads the exported folder itself
        model = None
        folder = stages[stage.arm].folder / "model" if stage.arm != "baseline" else Path(recipe.backbone.name)
    else:
        model, folder = _arm_model(stage, stages, models)
        model = _on_accelerator(model)
        if backend == "vllm" and folder is None:  # an in-memory MFT checkpoint: export it for the engine
            folder = stage.folder / "model"
            if not folder.is_dir():
                _save_model_atomic(model, models.tokenizer(), folder)
    metrics = evaluate(model, models.tokenizer(), bench.name, stage.folder, options=options, limit=bench.limit,
                       backend=backend, batch_size=recipe.evaluation.batch_size, data_dir=recipe.data.data_dir,
                       model_path=str(folder) if folder else None, seed=recipe.seed, sandbox=recipe.evaluation.sandbox)
    if stage.arm not in ("baseline", "fft"):
        del model
        gc.collect()
    return {"metrics": "metrics.json", "records": "records.jsonl", "summary": metrics.get("metrics", {})}


# ----------------------------------------------------------------------------- driver


def preflight(recipe: Recipe, models: ModelCache) -> None:
    """Check what can only be checked against the model (it loads anyway) before any stage starts:
    a bad layer band or module name fails now, not after an hour of FFT."""
    model = models.backbone()
    if any(arm in recipe.arms for arm in ("mft", "random_mask", "magnitude_mask")):
        from mft_bench.masking.architectures import resolve_targets

        resolve_targets(model, list(recipe.mask.layers), recipe.mask.modules)


def _run_stage(recipe: Recipe, stage: Stage, stages: dict[str, Stage], models: ModelCache, progress) -> None:
    if stage.done():
        logger.info("stage %s: cached", stage.name)
        if progress:
            progress(stage, "cached")
        return
    if progress:
        progress(stage, "running")
    stage.folder.mkdir(parents=True, exist_ok=True)
    if stage.kind == "data":
        outputs = run_data_stage(recipe, stage, models)
    elif stage.kind == "train":
        outputs = run_train_stage(recipe, stage, stages, models)
    elif stage.kind == "mask":
        outputs = run_mask_stage(recipe, stage, stages, models)
    else:
        outputs = run_eval_stage(recipe, stage, stages, models)
    finish_stage(stage, outputs)
    if progress:
        progress(stage, "done")


def intermediate_stages(recipe: Recipe, run_dir: Path, stages: dict[str, Stage]) -> list[Stage]:
    """Evaluation stages of every training arm's intermediate checkpoints (known once training finished)."""
    extra = []
    for arm in ("fft", "mft", "lora"):
        if arm not in stages:
            continue
        steps = sorted(int(entry["step"]) for entry in stages[arm].manifest()["outputs"]["checkpoints"])
        if steps:
            extra += checkpoint_eval_stages(recipe, run_dir, stages[arm], steps, last_step=steps[-1])
    return extra


def run_recipe(recipe: Recipe, run_dir: Path, *, force: list[str] | None = None,
               progress=None) -> dict[str, Any]:
    """Run every unfinished stage, write run.json, build and write the report. Returns the report."""
    from mft_bench.recipe import stable_hash

    check_run_dir(recipe, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe_yaml(recipe))
    stages_list = build_plan(recipe, run_dir)
    stages = {stage.name: stage for stage in stages_list}
    for name in stages_to_force(stages_list, force or []):
        moved = retire_folder(stages[name].folder)
        if moved:
            logger.info("--force: moved %s aside to %s", stages[name].folder.name, moved)

    models = ModelCache(recipe)
    if not all(stage.done() for stage in stages_list):
        preflight(recipe, models)
    for stage in stages_list:
        _run_stage(recipe, stage, stages, models, progress)

    if recipe.evaluation.checkpoints == "all":
        extra = intermediate_stages(recipe, run_dir, stages)
        for stage in extra:
            stages[stage.name] = stage
            _run_stage(recipe, stage, stages, models, progress)
        stages_list = stages_list + extra
    run_info = build_run_info(recipe, run_dir, stages_list, stable_hash(recipe.model_dump(mode="json")))
    write_json_atomic(run_dir / RUN_FILE, run_info)
    from mft_bench.report import build_report, write_report

    report = build_report(run_dir)
    write_report(report, run_dir)
    return report


def build_run_info(recipe: Recipe, run_dir: Path, stages: list[Stage], recipe_hash: str) -> dict[str, Any]:
    def rel(path: Path) -> str:
        return str(path.relative_to(run_dir))

    evaluations, training, masks = [], [], {}
    last_steps = {stage.arm: max((int(c["step"]) for c in stage.manifest()["outputs"]["checkpoints"]), default=None)
                  for stage in stages if stage.kind == "train"}
    data_hashes: dict[str, str] = {}
    prompt_versions: dict[str, str] = {}
    for stage in stages:
        manifest = stage.manifest()
        outputs = manifest["outputs"]
        if stage.kind == "data":
            data_hashes["training_data"] = outputs["data_hash"]
        elif stage.kind == "train":
            training.append({"arm": stage.arm, "log_history": rel(stage.folder / outputs["log_history"])})
            if "masks" in outputs:
                masks[stage.arm] = rel(stage.folder / outputs["masks"])
        elif stage.kind == "mask":
            masks[stage.arm] = rel(stage.folder / outputs["masks"])
        else:
            metrics = json.loads((stage.folder / "metrics.json").read_text())
            versions = metrics.get("versions", {})
            if "data" in versions:
                data_hashes[stage.benchmark] = versions["data"]
            if "prompt" in versions:
                prompt_versions[stage.benchmark] = str(versions["prompt"])
            split = stage.key.get("split", "test")
            step = int(stage.checkpoint.removeprefix("step-")) if stage.checkpoint != "last" else \
                last_steps.get(stage.arm)
            evaluations.append({"arm": stage.arm, "checkpoint": stage.checkpoint, "step": step, "split": split,
                                "benchmark": stage.benchmark, "metrics": rel(stage.folder / "metrics.json"),
                                "records": rel(stage.folder / "records.jsonl")})
    return {
        "recipe": recipe.name,
        "recipe_hash": recipe_hash,
        "domain": recipe.domain,
        "backbone": recipe.backbone.name,
        "paper_key": recipe.paper_key,
        "arms": list(recipe.arms),
        "evaluations": evaluations,
        "training": training,
        "masks": masks,
        "provenance": {"git_commit": git_commit(), "packages": package_versions(), "data_hashes": data_hashes,
                       "prompt_versions": prompt_versions},
    }
