"""MATH in the math paper recipes: the lm-eval task that matches the official evaluation (OLMES
minerva_math_<subject>, 4-shot, over 7 subjects of EleutherAI/hendrycks_math), offline planning, clear errors."""

import importlib
from pathlib import Path

import pytest
import yaml

from mft_bench.errors import MftBenchError
from mft_bench.evaluation.lm_eval_task import _user_error, lm_eval_tasks_dir
from mft_bench.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
MATH_RECIPES = sorted((ROOT / "tasks" / "paper").glob("*-math.yaml"))
# bash/evaluation/llama2-7b_math.sh of the official repository: MATH_TASK_TYPES, each run 4-shot
OFFICIAL_SUBJECTS = {"algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                     "prealgebra", "precalculus"}
OFFICIAL_SHOTS = 4
OLMES_MAX_GEN_TOKS = 1024  # OLMES minerva_math generation_kwargs


class _TaskYaml(yaml.SafeLoader):
    """lm-eval task YAMLs with their ``!function`` tags read as plain strings."""


_TaskYaml.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _task_yaml(path: Path) -> dict:
    config = yaml.load(path.read_text(), Loader=_TaskYaml)
    if "include" in config:  # lm-eval's include: the included file's keys, overridden by this one's
        config = {**_task_yaml(path.parent / config.pop("include")), **config}
    return config


def _math_benchmark(path: Path):
    recipe = load_recipe(path)
    return next(b for b in recipe.evaluation.benchmarks if b.name.startswith("lm_eval:") and "math" in b.name)


@pytest.mark.parametrize("path", MATH_RECIPES, ids=lambda p: p.stem)
def test_math_recipes_run_lm_evals_minerva_math_like_the_official_script(path):
    bench = _math_benchmark(path)
    assert bench.name == "lm_eval:minerva_math"
    assert bench.options["num_fewshot"] == OFFICIAL_SHOTS
    assert bench.options["gen_kwargs"] == {"max_gen_toks": OLMES_MAX_GEN_TOKS}
    recipe = load_recipe(path)
    assert recipe.evaluation.benchmarks[0].name == "gsm8k"  # MATH is an extra column, GSM8K stays the headline


def test_installed_minerva_math_group_is_the_official_subjects_data_and_shots():
    tasks = lm_eval_tasks_dir()
    group = _task_yaml(tasks / "benchmarks" / "minerva_math.yaml")
    assert group["group"] == "minerva_math"
    subjects = set()
    for name in group["task"]:
        config = _task_yaml(tasks / "minerva_math" / f"{name}.yaml")
        assert config["task"] == name
        assert (config["dataset_path"], config["test_split"]) == ("EleutherAI/hendrycks_math", "test")
        assert config["num_fewshot"] == OFFICIAL_SHOTS
        assert config["fewshot_config"]["sampler"] == "first_n"  # the 4 fixed Minerva exemplars, as OLMES
        subjects.add(config["dataset_name"])
    assert subjects == OFFICIAL_SUBJECTS


def test_missing_math_extra_is_one_clear_line():
    try:
        importlib.import_module("lm_eval.tasks.minerva_math.utils")
    except ImportError as exc:
        error = _user_error("minerva_math", exc)
    else:
        pytest.skip("lm-eval's MATH extras are installed here")
    assert isinstance(error, MftBenchError) and "\n" not in str(error)
    assert "pip install 'mft-bench[math]'" in str(error)


@pytest.mark.parametrize("path", MATH_RECIPES, ids=lambda p: p.stem)
def test_plan_works_offline(path, capsys):
    from mft_bench.cli import main

    assert main(["plan", str(path)]) == 0
    assert "eval-mft-last-lm_eval_minerva_math" in capsys.readouterr().out
