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
from mft_bench.recipe import MASK_BASELINES, TRAINED_ARMS, Recipe, stable_hash
from mft_bench.run_folder import MANIFEST, file_inventory

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


def _place(stage: Stage, upstream: dict[str, str], env: dict[str, str], stages_dir: Path) -> None:
    """Content address of a stage: the hash of its key, its upstream stages' hashes and the package versions."""
    stage.hash = stable_hash({"key": stage.key, "upstream": upstream, "env": env, "format": STAGE_FORMAT_VERSION})
    stage.folder = stages_dir / f"{stage.name}-{stage.hash}"


TRAIN_ARMS = TRAINED_ARMS
LAST = "last"
# benchmarks with a held-out validation split of their own (option ``split``), used for checkpoint selection
VALIDATION_BENCHMARKS = ("synthetic_math",)


def checkpoint_labels(recipe: Recipe, arm: str) -> list[str]:
    """The evaluated checkpoints of an arm: ``ckpt-1`` ... ``ckpt-(n-1)`` and ``last`` for the n exports of a
    training arm when the recipe evaluates them all (``evaluation.checkpoints: all``), else ``last`` alone. Known
    before training: the count follows from ``epochs / save_every``, the steps are resolved when it ran."""
    if recipe.evaluation.checkpoints != "all" or arm not in TRAIN_ARMS:
        return [LAST]
    return [f"ckpt-{i}" for i in range(1, recipe.train_spec(arm).export_count)] + [LAST]


def checkpoint_index(label: str, export_count: int) -> int:
    """1-based export index of a checkpoint label (``last`` is the n-th)."""
    return export_count if label == LAST else int(label.removeprefix("ckpt-"))


def build_plan(recipe: Recipe, run_dir: Path, stages_dir: Path | None = None) -> list[Stage]:
    """All stages of a recipe in execution order, with hashes and folders (nothing is loaded or run). The graph is
    whole before anything runs: intermediate checkpoints are planned by index (their steps come from training);
    when the masks start from a selected FFT checkpoint, FFT's evaluations run before MFT and the baselines and
    are among their dependencies. Stage folders go in ``stages_dir`` (default ``RUN_DIR/stages``): recipes that
    share one (a sweep's variants) share every stage whose inputs are equal."""
    env = package_versions()
    stages: dict[str, Stage] = {}
    stages_dir = Path(stages_dir) if stages_dir is not None else Path(run_dir) / "stages"

    def add(stage: Stage) -> Stage:
        _place(stage, {dep: stages[dep].hash for dep in stage.deps}, env, stages_dir)
        stages[stage.name] = stage
        return stage

    backbone = recipe.backbone.model_dump(mode="json")
    add(Stage("data", "data", {"data": recipe.data.model_dump(mode="json"), "seed": recipe.seed, "backbone": backbone}))
    mask = recipe.mask.model_dump(mode="json")
    if "fft" in recipe.arms:
        add(Stage("fft", "train", {"train": recipe.fft.model_dump(mode="json"), "backbone": backbone,
                                   "seed": recipe.seed}, deps=["data"], arm="fft"))
    start_deps: list[str] = []
    if "fft" in recipe.arms and recipe.mask.start_from.startswith("best"):
        for stage in evaluation_stages(recipe, "fft"):
            add(stage)
        start_deps = start_selection_stages(recipe, stages)
    if "mft" in recipe.arms:
        add(Stage("mft", "train", {"train": recipe.mft.model_dump(mode="json"), "mask": mask, "seed": recipe.seed},
                  deps=["data", "fft", *start_deps], arm="mft"))
    if "fft_continued" in recipe.arms:  # the compute-matched control of MFT, from the same FFT checkpoint
        add(Stage("fft_continued", "train", {"train": recipe.train_spec("fft_continued").model_dump(mode="json"),
                                             "start_from": recipe.mask.start_from, "seed": recipe.seed},
                  deps=["data", "fft", *start_deps], arm="fft_continued"))
    if "lora" in recipe.arms:
        add(Stage("lora", "train", {"train": recipe.lora.model_dump(mode="json"), "backbone": backbone,
                                    "seed": recipe.seed}, deps=["data"], arm="lora"))
    for arm, kind in MASK_BASELINES.items():
        if arm in recipe.arms:
            key: dict[str, Any] = {"mask": mask, "kind": kind, "seed": recipe.seed}
            deps = ["fft", *start_deps]
            if recipe.mask.mode != "local" and kind != "l1_rows":
                # a global selection removes different counts per matrix: the baseline removes MFT's counts
                key["removed_counts"] = "mft"
                deps.append("mft")
            add(Stage(arm, "mask", key, deps=deps, arm=arm))
    for arm in recipe.arms:
        for stage in evaluation_stages(recipe, arm):
            if stage.name not in stages:
                add(stage)
    return list(stages.values())


def evaluation_stages(recipe: Recipe, arm: str) -> list[Stage]:
    """The arm's evaluation stages, unplaced: every checkpoint label x benchmark on the test split, and on the
    validation split for the benchmarks that have one (intermediate checkpoints are selected there)."""
    evaluation = recipe.evaluation
    artifact = arm_artifact_stage(arm)
    out = []
    for label in checkpoint_labels(recipe, arm):
        for bench in evaluation.benchmarks:
            splits = ["test"]
            if evaluation.checkpoints == "all" and arm in TRAIN_ARMS and bench.name in VALIDATION_BENCHMARKS:
                splits.append("validation")
            for split in splits:
                options = bench.options if split == "test" else {**bench.options, "split": "validation"}
                key = {"benchmark": {**bench.model_dump(mode="json"), "options": options}, "split": split,
                       "backend": evaluation.backend, "dtype": recipe.backbone.dtype, "seed": recipe.seed,
                       "checkpoint": label, "prompt_version": _prompt_version(bench.name, options)}
                if artifact is None:
                    key["backbone"] = recipe.backbone.model_dump(mode="json")
                prefix = "eval" if split == "test" else "val"
                out.append(Stage(f"{prefix}-{arm}-{label}-{_slug(bench.name)}", "eval", key,
                                 deps=[artifact] if artifact else [], arm=arm, benchmark=bench.name,
                                 checkpoint=label))
    return out


def start_selection_stages(recipe: Recipe, stages: dict[str, Stage]) -> list[str]:
    """The FFT evaluations ``mask.start_from`` chooses among: every checkpoint on the first benchmark's test split
    (``best-test``), or on the validation split of the first benchmark that has one (``best-val``; none: the
    validation loss FFT logged, no stage needed)."""
    first = recipe.evaluation.benchmarks[0].name
    if recipe.mask.start_from == "best-test":
        wanted = ("eval", first)
    else:
        with_validation = [b.name for b in recipe.evaluation.benchmarks if b.name in VALIDATION_BENCHMARKS]
        if not with_validation:
            return []
        wanted = ("val", with_validation[0])
    return [s.name for s in stages.values()
            if s.kind == "eval" and s.arm == "fft" and s.name.startswith(wanted[0] + "-") and s.benchmark == wanted[1]]


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


def retire_folder(folder: Path, *, into: Path | None = None) -> Path | None:
    """Move a stage folder (or a file) aside instead of deleting it, into ``.superseded`` beside it unless ``into``
    says where: nothing finished is lost, even on ``--force``."""
    if not folder.exists():
        return None
    target = (into or folder.parent / ".superseded") / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(target))
    return target


def finish_stage(stage: Stage, outputs: dict[str, Any]) -> None:
    """Write the manifest last: from here on the stage counts as finished. It lists the stage's files, so a rerun
    can tell a stage whose files were lost or changed (``run_folder.stage_problem``)."""
    write_json_atomic(stage.manifest_path, {"stage": stage.name, "hash": stage.hash, "key": stage.key,
                                            "deps": stage.deps, "outputs": outputs,
                                            "files": file_inventory(stage.folder)})
