"""The stage graph of a recipe, whole before anything runs: content-addressed stage folders, manifests, cache status.

Stages: ``data``; one per arm that has a stage of its own (``arms.Arm.stage``: a training or a mask stage named
after the arm); and one evaluation per arm x evaluated checkpoint x benchmark x split (``evaluation_stage``, the
only place an evaluation's key is built). ``run.py`` runs them in this order; ``stage_runners.py`` holds what
each kind of stage does.

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
from mft_bench.arms import ARMS, RENAMED_ARMS
from mft_bench.evaluation.registry import benchmark_facts, benchmark_versions
from mft_bench.recipe import BenchmarkSpec, Recipe, stable_hash
from mft_bench.run_folder import MANIFEST, file_inventory

# bump when a stage's on-disk output format or semantics change
STAGE_FORMAT_VERSION = "1"
RESULT_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "lm_eval", "mft-bench")


@dataclass
class Stage:
    name: str  # "data", an arm's name (its training or mask stage), "eval-<arm>-<checkpoint>-<benchmark>"
    kind: str  # data | train | mask | eval
    key: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    arm: str | None = None
    benchmark: str | None = None
    checkpoint: str = "last"
    split: str = "test"  # an evaluation's: "test", or "validation" (a benchmark's held-out split, for selection)
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
    """The stage whose output is the arm's model (None for an arm that is the backbone itself)."""
    return arm if ARMS[arm].has_stage else None


def _place(stage: Stage, upstream: dict[str, str], env: dict[str, str], stages_dir: Path) -> None:
    """Content address of a stage: the hash of its key, its upstream stages' hashes and the package versions."""
    stage.hash = stable_hash({"key": stage.key, "upstream": upstream, "env": env, "format": STAGE_FORMAT_VERSION})
    stage.folder = stages_dir / f"{stage.name}-{stage.hash}"


LAST = "last"


def checkpoint_labels(recipe: Recipe, arm: str) -> list[str]:
    """The evaluated checkpoints of an arm: ``ckpt-1`` ... ``ckpt-(n-1)`` and ``last`` for the n exports of a
    training arm when the recipe evaluates them all (``evaluation.checkpoints: all``), else ``last`` alone. Known
    before training: the count follows from ``epochs / save_every``, the steps are resolved when it ran."""
    if recipe.evaluation.checkpoints != "all" or not ARMS[arm].trained:
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

    add(Stage("data", "data", {"data": recipe.data.model_dump(mode="json"), "seed": recipe.seed,
                               "backbone": recipe.backbone.model_dump(mode="json")}))
    start_deps: list[str] = []
    made = [arm for arm in ARMS.values() if arm.has_stage and arm.name in recipe.arms]
    for arm in sorted(made, key=lambda a: a.stage != "train"):  # training stages first, then mask stages
        deps = ["data"] if arm.trained else []
        if arm.needs_fft:
            deps += ["fft", *start_deps]
        key = stage_key(recipe, arm.name)
        if arm.matches_mft_counts and recipe.mask.mode != "local":
            # a global selection removes different counts per matrix: the baseline removes MFT's counts
            key["removed_counts"] = "mft"
            deps.append("mft")
        add(Stage(arm.name, arm.stage, key, deps=deps, arm=arm.name))
        if arm.name == "fft" and recipe.mask.start_from.startswith("best"):
            # the FFT checkpoints the masks choose among are evaluated before the arms that start from one
            for stage in evaluation_stages(recipe, "fft"):
                add(stage)
            start_deps = start_selection_stages(recipe, stages)
    for arm in recipe.arms:
        for stage in evaluation_stages(recipe, arm):
            if stage.name not in stages:
                add(stage)
    return list(stages.values())


def stage_key(recipe: Recipe, arm: str) -> dict[str, Any]:
    """The part of the recipe an arm's own stage depends on (``arms.Arm.key``): what its content address covers."""
    entry = ARMS[arm]
    parts = {"train": lambda: recipe.train_spec(arm).model_dump(mode="json"),
             "backbone": lambda: recipe.backbone.model_dump(mode="json"),
             "mask": lambda: recipe.mask.model_dump(mode="json"),
             "start_from": lambda: recipe.mask.start_from,
             "kind": lambda: entry.mask_kind,
             "seed": lambda: recipe.seed}
    return {part: parts[part]() for part in entry.key}


def evaluation_stages(recipe: Recipe, arm: str) -> list[Stage]:
    """The arm's evaluation stages, unplaced: every checkpoint label x benchmark on the test split, and on the
    validation split for the benchmarks that have one (intermediate checkpoints are selected there)."""
    evaluation = recipe.evaluation
    out = []
    for label in checkpoint_labels(recipe, arm):
        for bench in evaluation.benchmarks:
            out.append(evaluation_stage(recipe, arm, label, bench, "test"))
            if evaluation.checkpoints == "all" and ARMS[arm].trained and benchmark_facts(bench.name).validation_split:
                out.append(evaluation_stage(recipe, arm, label, bench, "validation"))
    return out


def evaluation_stage(recipe: Recipe, arm: str, label: str, bench: BenchmarkSpec, split: str) -> Stage:
    """One evaluation stage, unplaced: arm ``arm`` at checkpoint ``label`` on ``bench``'s ``split``. Its key holds
    the options the benchmark runs with (the validation split is one of them), so the runner reads them back from
    the key alone."""
    options = bench.options if split == "test" else {**bench.options, "split": "validation"}
    key = {"benchmark": {**bench.model_dump(mode="json"), "options": options}, "split": split,
           "backend": recipe.evaluation.backend, "dtype": recipe.backbone.dtype,
           "checkpoint": label, "prompt_version": benchmark_versions(bench.name, options)}
    if samples(options):
        key["seed"] = recipe.seed
    artifact = arm_artifact_stage(arm)
    if artifact is None:
        key["backbone"] = recipe.backbone.model_dump(mode="json")
    prefix = "eval" if split == "test" else "val"
    return Stage(f"{prefix}-{arm}-{label}-{_slug(bench.name)}", "eval", key, deps=[artifact] if artifact else [],
                 arm=arm, benchmark=bench.name, checkpoint=label, split=split)


def samples(options: dict[str, Any]) -> bool:
    """True when a benchmark with ``options`` decodes by sampling, the only use an evaluation makes of the recipe
    seed (lm-eval tasks run on lm-eval's own seeds, in their options). A greedy evaluation leaves the seed out of
    its key, so the variants of a seed sweep share the pretrained model's evaluations."""
    return float(options.get("temperature", 0) or 0) > 0


def start_selection_stages(recipe: Recipe, stages: dict[str, Stage]) -> list[str]:
    """The FFT evaluations ``mask.start_from`` chooses among: every checkpoint on the first benchmark's test split
    (``best-test``), or on the validation split of the first benchmark that has one (``best-val``; none: the
    validation loss FFT logged, no stage needed)."""
    first = recipe.evaluation.benchmarks[0].name
    if recipe.mask.start_from == "best-test":
        split, benchmark = "test", first
    else:
        with_validation = [b.name for b in recipe.evaluation.benchmarks if benchmark_facts(b.name).validation_split]
        if not with_validation:
            return []
        split, benchmark = "validation", with_validation[0]
    return [s.name for s in stages.values()
            if s.kind == "eval" and s.arm == "fft" and s.split == split and s.benchmark == benchmark]


def _slug(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


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


def adopt_renamed_folders(stages: list[Stage]) -> list[Path]:
    """Give back to each stage the folder it had under an arm's earlier name (``arms.RENAMED_ARMS``): the same
    hash, so the same content, and a run folder of an earlier version resumes instead of evaluating again.
    Returns the folders adopted."""
    adopted = []
    for stage in stages:
        for old, new in RENAMED_ARMS.items():
            if stage.arm != new or stage.folder.exists():
                continue
            prefix = stage.name[: stage.name.index(f"-{new}-")]
            earlier = stage.folder.with_name(f"{prefix}-{old}-" + stage.folder.name[len(f"{prefix}-{new}-"):])
            if earlier.is_dir():
                earlier.rename(stage.folder)
                adopted.append(stage.folder)
    return adopted


def finish_stage(stage: Stage, outputs: dict[str, Any]) -> None:
    """Write the manifest last: from here on the stage counts as finished. It lists the stage's files, so a rerun
    can tell a stage whose files were lost or changed (``run_folder.stage_problem``)."""
    write_json_atomic(stage.manifest_path, {"stage": stage.name, "hash": stage.hash, "key": stage.key,
                                            "deps": stage.deps, "outputs": outputs,
                                            "files": file_inventory(stage.folder)})
