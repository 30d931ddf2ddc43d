"""The stage DAG of a recipe: content-addressed stage folders, manifests, cache status.

Each stage's folder is ``RUN_DIR/stages/<name>-<hash>`` where the hash covers everything the stage's output
depends on: its config subtree, the hashes of its upstream stages and the versions of packages that change
results. A stage is finished when its ``manifest.json`` exists; the manifest is written last and atomically,
so a killed stage is never taken for a finished one, and a finished one is never written again.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mft_bench.atomic import write_json_atomic
from mft_bench.errors import MftBenchError
from mft_bench.recipe import Recipe, stable_hash

MANIFEST = "manifest.json"
# bump when a stage's on-disk output format or semantics change
STAGE_FORMAT_VERSION = "1"
RESULT_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "lm_eval", "mft-bench")


@dataclass
class Stage:
    name: str  # "data", "fft", "mft", "lora", "random_mask", "magnitude_mask", "eval-<arm>-<checkpoint>-<benchmark>"
    kind: str  # data | train | mask | eval
    key: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    arm: str | None = None
    benchmark: str | None = None
    checkpoint: str = "last"
    hash: str = ""
    folder: Path = Path()

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def done(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())


def package_versions() -> dict[str, str]:
    versions = {}
    for name in RESULT_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def arm_artifact_stage(arm: str) -> str | None:
    """The stage whose output is the arm's model (None for the pretrained baseline)."""
    return None if arm == "baseline" else arm


def _place(stage: Stage, upstream: dict[str, str], env: dict[str, str], run_dir: Path) -> None:
    """Content address of a stage: the hash of its key, its upstream stages' hashes and the package versions."""
    stage.hash = stable_hash({"key": stage.key, "upstream": upstream, "env": env, "format": STAGE_FORMAT_VERSION})
    stage.folder = run_dir / "stages" / f"{stage.name}-{stage.hash}"


def build_plan(recipe: Recipe, run_dir: Path) -> list[Stage]:
    """All stages of a recipe in execution order, with hashes and folders (nothing is loaded or run)."""
    env = package_versions()
    stages: dict[str, Stage] = {}

    def add(stage: Stage) -> Stage:
        _place(stage, {dep: stages[dep].hash for dep in stage.deps}, env, run_dir)
        stages[stage.name] = stage
        return stage

    backbone = recipe.backbone.model_dump(mode="json")
    add(Stage("data", "data", {"data": recipe.data.model_dump(mode="json"), "seed": recipe.seed, "backbone": backbone}))
    mask = recipe.mask.model_dump(mode="json")
    if "fft" in recipe.arms:
        add(Stage("fft", "train", {"train": recipe.fft.model_dump(mode="json"), "backbone": backbone,
                                   "seed": recipe.seed}, deps=["data"], arm="fft"))
    if "mft" in recipe.arms:
        add(Stage("mft", "train", {"train": recipe.mft.model_dump(mode="json"), "mask": mask, "seed": recipe.seed},
                  deps=["data", "fft"], arm="mft"))
    if "lora" in recipe.arms:
        add(Stage("lora", "train", {"train": recipe.lora.model_dump(mode="json"), "backbone": backbone,
                                    "seed": recipe.seed}, deps=["data"], arm="lora"))
    for kind in ("random_mask", "magnitude_mask"):
        if kind in recipe.arms:
            add(Stage(kind, "mask", {"mask": mask, "kind": kind, "seed": recipe.seed}, deps=["fft"], arm=kind))

    evaluation = recipe.evaluation
    for arm in recipe.arms:
        artifact = arm_artifact_stage(arm)
        for bench in evaluation.benchmarks:
            key = {"benchmark": bench.model_dump(mode="json"), "backend": evaluation.backend,
                   "dtype": recipe.backbone.dtype, "seed": recipe.seed, "checkpoint": "last",
                   "prompt_version": _prompt_version(bench.name, bench.options)}
            if artifact is None:
                key["backbone"] = backbone
            add(Stage(f"eval-{arm}-last-{_slug(bench.name)}", "eval", key, deps=[artifact] if artifact else [],
                      arm=arm, benchmark=bench.name))
    return list(stages.values())


# benchmarks with a held-out validation split of their own (option ``split``), used for checkpoint selection
VALIDATION_BENCHMARKS = ("synthetic_math",)


def checkpoint_eval_stages(recipe: Recipe, run_dir: Path, train_stage: Stage, steps: list[int],
                           last_step: int) -> list[Stage]:
    """Evaluation stages for a training arm's intermediate checkpoints (test split), and validation-split
    evaluations of every checkpoint, the last included, for benchmarks that have one.

    Known only once training has finished (the checkpoint list lives in its manifest). Checkpoints are selected
    on the validation split, never on test.
    """
    env = package_versions()
    stages = []

    def add(prefix: str, checkpoint: str, bench, options: dict, split: str) -> None:
        key = {"benchmark": {**bench.model_dump(mode="json"), "options": options}, "split": split,
               "backend": recipe.evaluation.backend, "dtype": recipe.backbone.dtype, "seed": recipe.seed,
               "checkpoint": checkpoint, "prompt_version": _prompt_version(bench.name, options)}
        stage = Stage(f"{prefix}-{train_stage.arm}-{checkpoint}-{_slug(bench.name)}", "eval", key,
                      deps=[train_stage.name], arm=train_stage.arm, benchmark=bench.name, checkpoint=checkpoint)
        _place(stage, {train_stage.name: train_stage.hash}, env, run_dir)
        stages.append(stage)

    for step in steps:
        for bench in recipe.evaluation.benchmarks:
            if step != last_step:
                add("eval", f"step-{step}", bench, bench.options, "test")
            if bench.name in VALIDATION_BENCHMARKS:
                add("val", "last" if step == last_step else f"step-{step}", bench,
                    {**bench.options, "split": "validation"}, "validation")
    return stages


def _slug(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def _prompt_version(name: str, options: dict[str, Any]) -> str:
    """The benchmark's prompt and scorer versions, so changing either invalidates cached evaluations."""
    from mft_bench.evaluation.registry import benchmark_versions

    return benchmark_versions(name)


def stages_to_force(stages: list[Stage], names: list[str]) -> set[str]:
    """The named stages (``eval`` = every evaluation; an arm name = its training stage) and all downstream."""
    by_name = {stage.name: stage for stage in stages}
    selected: set[str] = set()
    for name in names:
        matches = [s.name for s in stages if s.name == name or (name == "eval" and s.kind == "eval")
                   or (name.startswith("eval-") and s.name.startswith(name))]
        if not matches:
            known = ", ".join(["eval"] + [s.name for s in stages])
            raise MftBenchError(f"--force {name}: no such stage; stages are: {known}")
        selected.update(matches)
    changed = True
    while changed:  # close over dependents
        changed = False
        for stage in stages:
            if stage.name not in selected and any(dep in selected for dep in stage.deps):
                selected.add(stage.name)
                changed = True
    return {name for name in selected if name in by_name}


def retire_folder(folder: Path) -> Path | None:
    """Move a stage folder aside instead of deleting it: nothing finished is lost, even on ``--force``."""
    if not folder.exists():
        return None
    target = folder.parent / ".superseded" / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(target))
    return target


def finish_stage(stage: Stage, outputs: dict[str, Any]) -> None:
    """Write the manifest last: from here on the stage counts as finished."""
    write_json_atomic(stage.manifest_path, {"stage": stage.name, "hash": stage.hash, "key": stage.key,
                                            "deps": stage.deps, "outputs": outputs})
