"""The arm registry drives the recipe, the stage graph, the runners and the labels; the graph is built by one
evaluation-stage factory; each benchmark's facts come from its own module."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mft_bench.arms import ARM_NAMES, ARMS, REGISTRY, Arm, paper_arms
from mft_bench.errors import MftBenchError
from mft_bench.evaluation.registry import (
    BENCHMARK_NAMES,
    benchmark_facts,
    benchmark_versions,
    headline_benchmarks,
)
from mft_bench.masking.baselines import BASELINE_KINDS
from mft_bench.recipe import Recipe, validate_recipe
from mft_bench.stage_runners import RUNNERS, TRAINERS
from mft_bench.stages import build_plan

ROOT = Path(__file__).resolve().parent.parent
SMOKE = yaml.safe_load((ROOT / "tasks" / "smoke.yaml").read_text())


def _recipe(**changes) -> Recipe:
    data = yaml.safe_load(yaml.safe_dump(SMOKE))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return validate_recipe(data)


def test_every_arm_is_complete():
    """A training arm names a trainer the runners have and a recipe section to train with; a mask arm a mask
    kind the masker knows; every stage kind has a runner."""
    for arm in REGISTRY:
        assert arm.label and (arm.stage is None or arm.stage in RUNNERS)
        if arm.trained:
            assert arm.trainer in TRAINERS and arm.settings in Recipe.model_fields and arm.key
        if arm.stage == "mask":
            assert arm.mask_kind in BASELINE_KINDS
        assert not (arm.shardable and arm.replicated)
    assert set(RUNNERS) == {"data", "train", "mask", "eval"}
    assert len({arm.label for arm in REGISTRY}) == len(REGISTRY)


def test_paper_columns_and_labels():
    assert paper_arms() == ("pretrained", "fft", "lora", "random_mask", "magnitude_mask", "l1_mask", "mft")
    from mft_bench.report.paper_table import ARM_LABELS

    assert ARM_LABELS["pretrained"] == "Pretrained" and ARM_LABELS["l1_mask"] == "L1 mask (rows)"


def test_old_arm_name_is_refused_with_its_new_name():
    with pytest.raises(MftBenchError) as caught:
        _recipe(arms=["baseline", "fft", "mft"])
    message = str(caught.value)
    assert "\n" not in message and "'baseline' is now called 'pretrained'" in message and "arms" in message
    with pytest.raises(MftBenchError, match="unknown arm 'dpo'"):
        _recipe(arms=["pretrained", "dpo"])
    assert validate_recipe({k: v for k, v in SMOKE.items() if k != "arms"}).arms == list(ARM_NAMES)


def test_plan_follows_the_registry(tmp_path):
    recipe = _recipe(arms=list(ARM_NAMES))
    stages = {s.name: s for s in build_plan(recipe, tmp_path)}
    for arm in REGISTRY:
        evals = [s for s in stages.values() if s.kind == "eval" and s.arm == arm.name]
        assert len(evals) == len(recipe.evaluation.benchmarks)
        if arm.has_stage:
            own = stages[arm.name]
            assert own.kind == arm.stage and set(own.key) == set(arm.key)
            assert ("fft" in own.deps) == arm.needs_fft and ("data" in own.deps) == arm.trained
            assert all(s.deps == [arm.name] and "backbone" not in s.key for s in evals)
        else:
            assert arm.name not in stages and all(not s.deps and "backbone" in s.key for s in evals)
    order = list(stages)
    assert order.index("fft") < order.index("mft") < order.index("random_mask")


def test_a_new_arm_is_one_registry_entry(tmp_path, monkeypatch):
    """A second magnitude baseline added to the registry alone is accepted by the recipe, planned after FFT with
    its evaluations, labelled, and its stage runs with the mask runner."""
    monkeypatch.setitem(ARMS, "magnitude_mask_b", Arm("magnitude_mask_b", "Magnitude mask B", stage="mask",
                                                      mask_kind="magnitude", starts_from="fft",
                                                      key=("mask", "kind", "seed")))
    recipe = _recipe(arms=["pretrained", "fft", "magnitude_mask_b"])
    stages = {s.name: s for s in build_plan(recipe, tmp_path)}
    assert stages["magnitude_mask_b"].kind == "mask" and stages["magnitude_mask_b"].deps == ["fft"]
    assert "eval-magnitude_mask_b-last-gsm8k" in stages
    with pytest.raises(MftBenchError, match="add 'fft' to arms"):
        _recipe(arms=["pretrained", "magnitude_mask_b"])


def test_every_evaluation_stage_comes_from_one_factory(tmp_path):
    """Test and validation evaluations carry their split on the stage and in the key alike; the validation one's
    options say so (what the runner reads)."""
    recipe = _recipe(arms=["pretrained", "fft", "mft"], evaluation__checkpoints="all", fft__save_every=0.5,
                     mask__start_from="best-val")
    evals = [s for s in build_plan(recipe, tmp_path) if s.kind == "eval"]
    assert {s.split for s in evals} == {"test", "validation"}
    for stage in evals:
        assert stage.key["split"] == stage.split
        assert (stage.key["benchmark"]["options"].get("split") == "validation") == (stage.split == "validation")
        assert stage.name.startswith("val-" if stage.split == "validation" else "eval-")
    validation = [s for s in evals if s.split == "validation"]
    assert validation and all(benchmark_facts(s.benchmark).validation_split and s.arm in ("fft", "mft")
                              for s in validation)
    mft = next(s for s in build_plan(recipe, tmp_path) if s.name == "mft")
    assert sorted(d for d in mft.deps if d.startswith("val-")) == sorted(
        s.name for s in validation if s.arm == "fft")


def test_a_benchmark_twice_is_refused_in_one_line():
    gsm8k = {"name": "gsm8k", "limit": 2, "options": {"max_new_tokens": 16}}
    with pytest.raises(MftBenchError) as caught:
        _recipe(evaluation__benchmarks=[gsm8k, {"name": "ifeval"}, gsm8k])
    assert "benchmarks 0 and 2 are both gsm8k: remove one" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(MftBenchError, match="both gsm8k \\(with different settings\\)"):
        _recipe(evaluation__benchmarks=[gsm8k, {**gsm8k, "options": {"num_fewshot": 4}}])


def test_benchmarks_declare_their_facts():
    for name in BENCHMARK_NAMES:
        facts = benchmark_facts(name)
        assert facts.domain in ("math", "coding", "instruction") and facts.items > 0
    assert headline_benchmarks() == {"math": "gsm8k", "coding": "humaneval", "instruction": "ifeval"}
    assert [n for n in BENCHMARK_NAMES if benchmark_facts(n).validation_split] == ["synthetic_math"]
    assert {n for n in BENCHMARK_NAMES if benchmark_facts(n).runs_code} == {"humaneval", "humaneval_plain",
                                                                             "humaneval_plus"}
    gsm8k = benchmark_facts("gsm8k")
    assert gsm8k.cost_shape({}, None) == (1319, 900, 150, 740)
    assert gsm8k.cost_shape({"num_fewshot": 4, "max_new_tokens": 64}, 100) == (100, 900 - 370, 64, 370)
    assert benchmark_facts("synthetic_math").cost_shape({"n": 12}, None)[0] == 12
    assert dataclasses.asdict(benchmark_facts("lm_eval:arc_easy"))["domain"] is None


def test_prompt_version_names_the_options_that_change_the_prompt():
    assert benchmark_versions("gsm8k") == benchmark_versions("gsm8k", {"max_new_tokens": 16}) == "1/1"
    assert benchmark_versions("gsm8k", {"num_fewshot": 8}) == "1/1"  # the default
    assert benchmark_versions("gsm8k", {"num_fewshot": 4}) == "1+num_fewshot=4/1"
    assert benchmark_versions("humaneval_plus", {"variant": "plain"}) == "1+variant=plain/2"
    assert benchmark_versions("synthetic_math", {"split": "validation", "n": 4}) == "1/1"


def test_a_run_folder_of_the_earlier_arm_name_is_adopted(tmp_path):
    """Evaluations of the pretrained arm keep the hash they had as ``baseline``: their finished folders are
    renamed into place, not evaluated again; a folder of another hash is left alone."""
    from mft_bench.stages import adopt_renamed_folders

    stages = build_plan(_recipe(arms=["pretrained", "fft"]), tmp_path)
    pretrained = [s for s in stages if s.arm == "pretrained"]
    earlier = pretrained[0].folder.with_name(pretrained[0].folder.name.replace("-pretrained-", "-baseline-"))
    earlier.mkdir(parents=True)
    (earlier / "manifest.json").write_text("{}")
    stranger = pretrained[1].folder.with_name(
        pretrained[1].folder.name.replace("-pretrained-", "-baseline-")[:-12] + "0" * 12)
    stranger.mkdir()
    assert adopt_renamed_folders(stages) == [pretrained[0].folder]
    assert pretrained[0].done() and not earlier.exists() and stranger.is_dir() and not pretrained[1].done()
