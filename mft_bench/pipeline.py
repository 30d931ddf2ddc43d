"""Run a recipe: execute unfinished stages of its plan in order, then write ``run.json`` and the report.

Every stage persists its output in its own folder, so a rerun skips what is finished and resumes what is not
(Trainer checkpoints, per-item evaluation records). Between stages only CPU copies of the backbone and of the FFT
model (as saved, in the recipe's dtype) stay loaded; a finished training stage releases its Trainer, optimizer and
model, and an evaluation holds one model on the device at a time. On several processes (``distributed.py``)
training stages run on all of them, evaluations are dealt out, everything else runs once.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from mft_bench.atomic import check_writable_folder, write_json_atomic
from mft_bench.checkpoints import export_path, export_step, start_step
from mft_bench.distributed import RunProcesses
from mft_bench.errors import MftBenchError
from mft_bench.plan import (
    LAST,
    Stage,
    build_plan,
    finish_stage,
    package_versions,
    retire_folder,
    stages_to_force,
)
from mft_bench.recipe import MASK_BASELINES, TRAINED_ARMS, Recipe, recipe_yaml
from mft_bench.run_folder import RunLock, reopen_stage, stage_problem
from mft_bench.translate import _mask_spec, refuse_what_cannot_fit, train_config

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


def default_run_dir(recipe: Recipe) -> Path:
    return Path(recipe.output_dir or Path("runs") / recipe.name)


def check_run_dir(recipe: Recipe, run_dir: Path) -> None:
    """Refuse a run folder that cannot be written or belongs to another recipe (its results would be mixed)."""
    check_writable_folder(run_dir, "run folder")
    run_file = run_dir / RUN_FILE
    marker = run_dir / "recipe.yaml"
    for existing in (run_file, marker):
        if existing.is_file():
            try:
                name = json.loads(existing.read_text()).get("recipe") if existing.suffix == ".json" else \
                    _recipe_name_from_yaml(existing)
            except (ValueError, OSError, yaml.YAMLError):
                name = None
            if name and name != recipe.name:
                raise MftBenchError(
                    f"run folder {run_dir} holds results of recipe '{name}', not '{recipe.name}': choose another --out"
                )


def _recipe_name_from_yaml(path: Path) -> str | None:
    data = yaml.safe_load(path.read_text())
    return data.get("name") if isinstance(data, dict) else None


class ModelCache:
    """CPU copies of the backbone and of the FFT model, each loaded at most once per process; stages take copies
    of them where they change a model, and evaluation moves one to the device only while it runs."""

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

    def fft_model(self, fft_stage: Stage, step: int | None = None):
        """The FFT model at ``step`` (default: the end) as its stage saved it, so a resumed run and an
        uninterrupted one start MFT alike. One FFT checkpoint is kept loaded."""
        final = int(fft_stage.manifest()["outputs"]["export_steps"][-1])
        step = final if step is None else step
        if self._fft is None or self._fft[0] != step:
            self._fft = None
            folder = fft_stage.folder / "model" if step == final else export_path(fft_stage, step)
            self._fft = (step, load_model_folder(folder, self.recipe.backbone.dtype))
        return self._fft[1]


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
                          data_dir=recipe.data.data_dir, selection=recipe.data.selection)
    stage.folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, conversations in splits.items():
        dataset = tokenize_conversations(conversations, models.tokenizer(), max_length=recipe.data.max_length,
                                         chat_template=recipe.data.chat_template)
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


def _materialize(source: Path, target: Path) -> None:
    """``target`` as a copy of the finished export folder ``source`` (hard links where the disk allows: a 7B model
    is not written twice)."""
    tmp = _fresh_tmp_dir(target)
    tmp.mkdir(parents=True)
    for path in source.iterdir():
        try:
            os.link(path, tmp / path.name)
        except OSError:
            shutil.copy2(path, tmp / path.name)
    _replace_dir(tmp, target)


def run_train_stage(recipe: Recipe, stage: Stage, stages: dict[str, Stage], models: ModelCache,
                    procs: RunProcesses) -> dict[str, Any] | None:
    """Train one arm on every process; the main process writes the stage's files and returns its outputs."""
    from transformers import set_seed

    from mft_bench.train import LoraSettings, train_fft, train_lora, train_mft
    from mft_bench.train.trainer import export_steps

    set_seed(recipe.seed)  # the stage's result depends on its inputs only, not on what ran before in this process
    data_stage = stages["data"]
    train_ds, val_ds = _load_split(data_stage, "train"), _load_split(data_stage, "validation")
    tokenizer = models.tokenizer()
    work = stage.folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    config = train_config(recipe, stage.name, procs.world_size, _device_bytes())
    outputs: dict[str, Any] = {"strategy": config.strategy, "processes": procs.world_size,
                               "gradient_accumulation_steps": config.gradient_accumulation_steps}
    if stage.name == "fft":
        result = train_fft(copy.deepcopy(models.backbone()), tokenizer, train_ds, val_ds, config, work)
    elif stage.name == "fft_continued":
        outputs["start"] = mask_start(recipe, stage, stages)
        model = copy.deepcopy(models.fft_model(stages["fft"], outputs["start"]["step"]))
        result = train_fft(model, tokenizer, train_ds, val_ds, config, work)
        del model
    elif stage.name == "mft":
        outputs["start"] = mask_start(recipe, stage, stages)
        model = copy.deepcopy(models.fft_model(stages["fft"], outputs["start"]["step"]))
        result = train_mft(model, tokenizer, train_ds, val_ds, config, _mask_spec(recipe), work)
        del model
    elif stage.name == "lora":
        lora = recipe.lora
        settings = LoraSettings(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
        result = train_lora(copy.deepcopy(models.backbone()), tokenizer, train_ds, val_ds, config, settings, work)
    else:
        raise ValueError(f"not a training stage: {stage.name}")
    if procs.is_main:
        if stage.name == "mft":
            from mft_bench.masking import apply_masks, save_masks

            base = models.fft_model(stages["fft"], outputs["start"]["step"])
            save_masks(result.masks, stage.folder / "masks.safetensors", base_model=base)
            _save_model_atomic(apply_masks(copy.deepcopy(base), result.masks).eval(), tokenizer, stage.folder / "model")
            outputs["masks"] = "masks.safetensors"
        else:  # the last export is the trained model, in the recipe's dtype (gathered when it was sharded)
            _materialize(max(result.checkpoints)[1], stage.folder / "model")
        write_json_atomic(stage.folder / "log_history.json", result.log_history)
    outputs.update({"model": "model", "log_history": "log_history.json", "checkpoints": _checkpoint_names(result, stage),
                    "export_steps": export_steps(config.export_count, max(step for step, _ in result.checkpoints)),
                    "validation_loss": {str(k): v for k, v in (result.validation_loss or {}).items()}})
    del result
    _release_memory()
    return outputs if procs.is_main else None


def _device_bytes() -> int | None:
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory) \
        if torch.cuda.is_available() else None


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_mask_stage(recipe: Recipe, stage: Stage, stages: dict[str, Stage], models: ModelCache) -> dict[str, Any]:
    from transformers import set_seed

    from mft_bench.masking import apply_masks, baseline_masks, read_mask_metadata, save_masks

    set_seed(recipe.seed)
    start = mask_start(recipe, stage, stages)
    base = models.fft_model(stages["fft"], start["step"])
    # in a global mask mode, the counts per matrix of MFT's final mask (plan.build_plan adds the dependency)
    counts = read_mask_metadata(stages["mft"].folder / "masks.safetensors")["removed"] if "mft" in stage.deps else None
    masks = baseline_masks(base, _mask_spec(recipe), kind=MASK_BASELINES[stage.name], seed=recipe.seed,
                           removed_counts=counts)
    stage.folder.mkdir(parents=True, exist_ok=True)
    save_masks(masks, stage.folder / "masks.safetensors", base_model=base)
    dense = apply_masks(copy.deepcopy(base), masks)
    _save_model_atomic(dense.eval(), models.tokenizer(), stage.folder / "model")
    return {"masks": "masks.safetensors", "model": "model", "start": start}


def mask_start(recipe: Recipe, stage: Stage, stages: dict[str, Stage]) -> dict[str, Any]:
    """The FFT checkpoint a mask stage (MFT or a baseline) starts from, chosen among its evaluation dependencies."""
    selection = [stages[dep] for dep in stage.deps if stages[dep].kind == "eval"]
    return start_step(recipe.mask.start_from, stages["fft"], selection)


def _arm_model(stage: Stage, stages: dict[str, Stage], models: ModelCache):
    """(model object, model folder or None, whether the cache keeps it) for an evaluation stage's arm and
    checkpoint."""
    if stage.checkpoint != LAST:
        path = export_path(stages[stage.arm], export_step(stages[stage.arm], stage.checkpoint))
        if stage.arm == "mft":  # intermediate MFT checkpoints are mask files over the FFT model it started from
            from mft_bench.masking import apply_masks, load_masks

            base = models.fft_model(stages["fft"], stages["mft"].manifest()["outputs"]["start"]["step"])
            return apply_masks(copy.deepcopy(base), load_masks(path, base_model=base)).eval(), None, False
        return load_model_folder(path, models.recipe.backbone.dtype), path, False
    if stage.arm == "baseline":
        return models.backbone(), None, True
    if stage.arm == "fft":
        return models.fft_model(stages["fft"]), stages["fft"].folder / "model", True
    folder = stages[stage.arm].folder / "model"
    return load_model_folder(folder, models.recipe.backbone.dtype), folder, False


def run_eval_stage(recipe: Recipe, stage: Stage, stages: dict[str, Stage], models: ModelCache,
                   procs: RunProcesses) -> dict[str, Any]:
    """Evaluate one arm on one benchmark on this process's device: in this process (a cached model goes back to
    the CPU after), or in a fresh one on the model's folder (``evaluation.in_fresh_process``)."""
    from mft_bench.evaluation.runner import evaluate

    bench = next(b for b in recipe.evaluation.benchmarks if b.name == stage.benchmark)
    options = stage.key["benchmark"]["options"]
    common = dict(options=options, limit=bench.limit, backend=recipe.evaluation.backend,
                  batch_size=recipe.evaluation.batch_size, data_dir=recipe.data.data_dir, seed=recipe.seed,
                  dtype=recipe.backbone.dtype, sandbox=recipe.evaluation.sandbox)
    if recipe.evaluation.in_fresh_process:
        from mft_bench.evaluation.worker import EvaluationJob, evaluate_in_subprocess

        folder = _evaluation_folder(recipe, stage, stages, models)
        device = {"CUDA_VISIBLE_DEVICES": str(procs.local_rank)} if procs.device().type == "cuda" else {}
        metrics = evaluate_in_subprocess(
            EvaluationJob(model_path=str(folder), benchmark=bench.name, out_dir=str(stage.folder), **common),
            env=device)
    else:
        model, folder, cached = _arm_model(stage, stages, models)
        model = model.to(procs.device())
        try:
            metrics = evaluate(model, models.tokenizer(), bench.name, stage.folder,
                               model_path=str(folder) if folder else None, **common)
        finally:
            if cached:
                model.to("cpu")
            del model
            _release_memory()
    return {"metrics": "metrics.json", "records": "records.jsonl", "n": metrics.get("n"),
            "summary": metrics.get("metrics", {})}


def _evaluation_folder(recipe: Recipe, stage: Stage, stages: dict[str, Stage], models: ModelCache) -> Path:
    """A model folder (or hub id) an engine in another process can load for the stage's arm and checkpoint: the
    arm's saved folder, the backbone's own folder or hub id, else a dense export written into the stage folder
    (GGUF, in-process tiny models, intermediate MFT masks)."""
    if stage.checkpoint == LAST and stage.arm != "baseline":
        return stages[stage.arm].folder / "model"
    if stage.arm == "baseline" and _loadable_by_name(recipe.backbone):
        return Path(recipe.backbone.name)
    if stage.checkpoint != LAST and stage.arm != "mft":
        return export_path(stages[stage.arm], export_step(stages[stage.arm], stage.checkpoint))
    folder = stage.folder / "model"
    if not (folder / "config.json").is_file():
        model, _, _ = _arm_model(stage, stages, models)
        _save_model_atomic(model, models.tokenizer(), folder)
    return folder


def _loadable_by_name(backbone) -> bool:
    """Whether another process loads the backbone from its name alone: a hub id or a plain HF folder (not the
    embedded GGUF, a ``gguf_file`` or an in-process ``tiny:`` model)."""
    from mft_bench.backbone import EMBEDDED_DEFAULT

    if backbone.gguf_file or backbone.name == EMBEDDED_DEFAULT or backbone.name.startswith("tiny:"):
        return False
    path = Path(backbone.name)
    return (path / "config.json").is_file() or not path.exists()


# ----------------------------------------------------------------------------- driver


def preflight(recipe: Recipe, models: ModelCache, world_size: int) -> None:
    """Check what can only be checked against the model or the machine before any stage starts: a bad layer band,
    module name or batch split fails now, not after an hour of FFT."""
    device_bytes = _device_bytes()
    for arm in TRAINED_ARMS:
        if arm in recipe.arms:
            config = train_config(recipe, arm, world_size, device_bytes)
            refuse_what_cannot_fit(recipe, arm, config.strategy, world_size, device_bytes)
    from mft_bench.evaluation.registry import CODE_BENCHMARKS

    if any(bench.name in CODE_BENCHMARKS for bench in recipe.evaluation.benchmarks):
        from mft_bench.evaluation.sandbox import require_isolation

        require_isolation(recipe.evaluation.sandbox)  # no code sandbox here: say so before hours of training
    from mft_bench.evaluation.registry import check_available

    for bench in recipe.evaluation.benchmarks:
        check_available(bench.name, bench.options, recipe.data.data_dir)
    model = models.backbone()
    if any(arm in recipe.arms for arm in ("mft", "random_mask", "magnitude_mask")):
        from mft_bench.masking.architectures import resolve_targets

        resolve_targets(model, list(recipe.mask.layers), recipe.mask.modules)
    if "lora" in recipe.arms and recipe.lora.target_modules:
        from mft_bench.train.lora import check_target_modules

        check_target_modules(model, recipe.lora.target_modules)
    from mft_bench.data.checks import check_data

    check_data(recipe.data.sources, seed=recipe.seed, max_length=recipe.data.max_length,
               data_dir=recipe.data.data_dir, tokenizer=models.tokenizer())


def _run_stage(recipe: Recipe, stage: Stage, stages: dict[str, Stage], models: ModelCache, procs: RunProcesses,
               progress) -> None:
    """Run one stage where it belongs: training on every process, everything else on the process calling it."""
    done = stage.done()
    if progress and procs.is_main:
        progress(stage, "cached" if done else "running")
    if done:
        logger.info("stage %s: cached", stage.name)
        return
    if stage.kind == "train":
        procs.on_main(stage.folder.mkdir, parents=True, exist_ok=True)
        outputs = run_train_stage(recipe, stage, stages, models, procs)
        procs.on_main(finish_stage, stage, outputs)
    else:
        stage.folder.mkdir(parents=True, exist_ok=True)
        if stage.kind == "data":
            outputs = run_data_stage(recipe, stage, models)
        elif stage.kind == "mask":
            outputs = run_mask_stage(recipe, stage, stages, models)
        else:
            outputs = run_eval_stage(recipe, stage, stages, models, procs)
        finish_stage(stage, outputs)
    if progress and procs.is_main:
        progress(stage, "done")


def _run_stages(recipe: Recipe, stages_list: list[Stage], stages: dict[str, Stage], models: ModelCache,
                procs: RunProcesses, progress) -> None:
    """Stages in plan order; a run of consecutive evaluation stages is dealt out to the processes."""
    index = 0
    while index < len(stages_list):
        stage = stages_list[index]
        if stage.kind == "eval":
            block = []
            while index < len(stages_list) and stages_list[index].kind == "eval":
                block.append(stages_list[index])
                index += 1
            procs.share(block, lambda s: _run_stage(recipe, s, stages, models, procs, progress))
            continue
        if stage.kind == "train":
            _run_stage(recipe, stage, stages, models, procs, progress)
        else:
            procs.on_main(_run_stage, recipe, stage, stages, models, procs, progress)
        index += 1


def _prepare_run_dir(recipe: Recipe, run_dir: Path, stages_list: list[Stage], forced: set[str]) -> None:
    """Record the recipe, move forced stages aside, and reopen finished stages whose files no longer match their
    manifest (``run_folder``)."""
    (run_dir / "recipe.yaml").write_text(recipe_yaml(recipe))
    stages = {stage.name: stage for stage in stages_list}
    retired = False
    for name in sorted(forced):
        moved = retire_folder(stages[name].folder)
        if moved:
            retired = True
            logger.info("--force: moved %s aside to %s", stages[name].folder.name, moved)
    if retired and (run_dir / RUN_FILE).exists():  # it names the moved folders; rebuilt when this run ends
        retire_folder(run_dir / RUN_FILE, into=run_dir / "stages" / ".superseded")
    for stage in stages_list:
        if stage.manifest_path.exists():
            problem = stage_problem(stage.folder)
            if problem:
                reopen_stage(stage.folder, problem, stage.name)


def run_recipe(recipe: Recipe, run_dir: Path, *, force: list[str] | None = None,
               progress=None, procs: RunProcesses | None = None, stages_dir: Path | None = None) -> dict[str, Any]:
    """Run every unfinished stage, write run.json, build and write the report. Returns the report (on the main
    process; the others return an empty dict). ``stages_dir``: where the stage folders live (default
    ``RUN_DIR/stages``; a sweep's variants share one, and the caller holds its lock)."""
    from mft_bench.train.strategy import refuse_launcher_strategy

    procs = procs or RunProcesses.from_environment()
    refuse_launcher_strategy()
    stages_list = build_plan(recipe, run_dir, stages_dir)
    stages = {stage.name: stage for stage in stages_list}
    # everything is checked before the run folder is touched (its lock included): bad input never rewrites a run
    forced = stages_to_force(stages_list, force or [])
    procs.on_main(check_run_dir, recipe, run_dir)
    models = ModelCache(recipe)
    checked = bool(forced) or not all(stage.done() for stage in stages_list)
    if checked:
        procs.on_main(preflight, recipe, models, procs.world_size)
    lock = RunLock(run_dir)
    procs.on_main(lock.acquire)  # one run per folder: the main process holds the lock
    try:
        return _run_locked(recipe, run_dir, stages_list, stages, forced, checked, models, progress, procs)
    finally:
        lock.release()


def _run_locked(recipe: Recipe, run_dir: Path, stages_list: list[Stage], stages: dict[str, Stage],
                forced: set[str], checked: bool, models: ModelCache, progress, procs: RunProcesses) -> dict[str, Any]:
    from mft_bench.recipe import stable_hash

    procs.on_main(_prepare_run_dir, recipe, run_dir, stages_list, forced)
    if not checked and not all(stage.done() for stage in stages_list):  # a damaged stage was reopened
        procs.on_main(preflight, recipe, models, procs.world_size)
    _run_stages(recipe, stages_list, stages, models, procs, progress)

    def finish() -> dict[str, Any]:
        from mft_bench.report import build_report, write_report

        write_json_atomic(run_dir / RUN_FILE,
                          build_run_info(recipe, run_dir, stages_list, stable_hash(recipe.model_dump(mode="json"))))
        report = build_report(run_dir)
        write_report(report, run_dir)
        return report

    return procs.on_main(finish) or {}


def build_run_info(recipe: Recipe, run_dir: Path, stages: list[Stage], recipe_hash: str) -> dict[str, Any]:
    def rel(path: Path) -> str:  # stages shared with other runs may lie beside the run folder ("../stages/...")
        return os.path.relpath(path, run_dir)

    evaluations, training, masks, starts = [], [], {}, {}
    by_name = {stage.name: stage for stage in stages}
    data_hashes: dict[str, str] = {}
    prompt_versions: dict[str, str] = {}
    for stage in stages:
        manifest = stage.manifest()
        outputs = manifest["outputs"]
        if "start" in outputs:
            starts[stage.arm] = outputs["start"]
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
            trained = by_name.get(stage.arm)
            step = export_step(trained, stage.checkpoint) if trained is not None and trained.kind == "train" \
                else None
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
        "mask_start": starts,  # the FFT checkpoint MFT and each mask baseline started from, and why
        "test_selected": recipe.evaluation.test_selected,
        "provenance": {"git_commit": git_commit(), "packages": package_versions(), "data_hashes": data_hashes,
                       "prompt_versions": prompt_versions},
    }
