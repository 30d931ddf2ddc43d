"""Run a recipe: execute the unfinished stages of its graph in order, then write ``run.json`` and the report.

Every stage persists its output in its own folder, so a rerun skips what is finished and resumes what is not
(Trainer checkpoints, per-item evaluation records). Between stages only CPU copies of the backbone and of the FFT
model (as saved, in the recipe's dtype) stay loaded; a finished training stage releases its Trainer, optimizer and
model, and an evaluation holds one model on the device at a time. On several processes (``distributed.py``)
training stages run on all of them, evaluations are dealt out, everything else runs once. What each kind of stage
does is ``stage_runners.RUNNERS``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from mft_bench.arms import ARMS
from mft_bench.atomic import check_writable_folder, write_json_atomic
from mft_bench.checkpoints import export_step
from mft_bench.distributed import RunProcesses
from mft_bench.errors import MftBenchError
from mft_bench.recipe import Recipe, recipe_yaml, stable_hash
from mft_bench.run_folder import RunLock, reopen_stage, stage_problem
from mft_bench.stage_models import ModelCache
from mft_bench.stage_runners import RUNNERS, device_bytes, evaluation_metrics
from mft_bench.stages import (
    Stage,
    adopt_renamed_folders,
    build_plan,
    finish_stage,
    package_versions,
    retire_folder,
    stages_to_force,
)
from mft_bench.translate import refuse_what_cannot_fit, run_context

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


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"



# ----------------------------------------------------------------------------- driver


def preflight(recipe: Recipe, models: ModelCache, world_size: int) -> None:
    """Check what can only be checked against the model or the machine before any stage starts: a bad layer band,
    module name or batch split fails now, not after an hour of FFT."""
    memory = device_bytes()
    arms = [ARMS[name] for name in recipe.arms]
    for arm in arms:
        if arm.trained:
            config = run_context(recipe, arm.name, world_size, memory)
            refuse_what_cannot_fit(recipe, arm.name, config.strategy, world_size, memory)
    from mft_bench.evaluation.registry import benchmark_facts

    if any(benchmark_facts(bench.name).runs_code for bench in recipe.evaluation.benchmarks):
        from mft_bench.evaluation.sandbox import require_isolation

        require_isolation(recipe.evaluation.sandbox)  # no code sandbox here: say so before hours of training
    from mft_bench.evaluation.registry import check_available

    for bench in recipe.evaluation.benchmarks:
        check_available(bench.name, bench.options, recipe.data.data_dir)
    model = models.backbone()
    if any(arm.trainer == "mft" or arm.stage == "mask" for arm in arms):  # arms that mask the recipe's layers
        from mft_bench.masking.architectures import resolve_targets

        resolve_targets(model, list(recipe.mask.layers), recipe.mask.modules)
    if any(arm.trainer == "lora" for arm in arms) and recipe.lora.target_modules:
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
    runner = RUNNERS[stage.kind]
    if runner.runs_on == "all":
        procs.on_main(stage.folder.mkdir, parents=True, exist_ok=True)
        outputs = runner.run(recipe, stage, stages, models, procs)
        procs.on_main(finish_stage, stage, outputs)
    else:
        stage.folder.mkdir(parents=True, exist_ok=True)
        finish_stage(stage, runner.run(recipe, stage, stages, models, procs))
    if progress and procs.is_main:
        progress(stage, "done")


def _run_stages(recipe: Recipe, stages_list: list[Stage], stages: dict[str, Stage], models: ModelCache,
                procs: RunProcesses, progress) -> None:
    """Stages in plan order; a run of consecutive stages of a shared kind (evaluations) is dealt out to the
    processes."""
    index = 0
    while index < len(stages_list):
        stage = stages_list[index]
        runs_on = RUNNERS[stage.kind].runs_on
        if runs_on == "shared":
            block = []
            while index < len(stages_list) and stages_list[index].kind == stage.kind:
                block.append(stages_list[index])
                index += 1
            procs.share(block, lambda s: _run_stage(recipe, s, stages, models, procs, progress))
            continue
        if runs_on == "all":
            _run_stage(recipe, stage, stages, models, procs, progress)
        else:
            procs.on_main(_run_stage, recipe, stage, stages, models, procs, progress)
        index += 1


def _prepare_run_dir(recipe: Recipe, run_dir: Path, stages_list: list[Stage], forced: set[str]) -> None:
    """Record the recipe, move forced stages aside, and reopen finished stages whose files no longer match their
    manifest (``run_folder``)."""
    (run_dir / "recipe.yaml").write_text(recipe_yaml(recipe))
    for folder in adopt_renamed_folders(stages_list):
        logger.info("stage folder of an earlier arm name adopted as %s", folder.name)
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
            metrics = evaluation_metrics(stage)
            versions = metrics.get("versions", {})
            if "data" in versions:
                data_hashes[stage.benchmark] = versions["data"]
            if "prompt" in versions:
                prompt_versions[stage.benchmark] = str(versions["prompt"])
            step = export_step(by_name[stage.arm], stage.checkpoint) if ARMS[stage.arm].trained else None
            evaluations.append({"arm": stage.arm, "checkpoint": stage.checkpoint, "step": step, "split": stage.split,
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
