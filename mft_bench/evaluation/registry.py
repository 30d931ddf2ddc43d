"""Benchmark names a recipe may use, how each is built, and what is known of it before it runs.

Names are checked without importing any benchmark module (``validate_benchmark_name``);
``benchmark_class``, ``make_benchmark`` and ``benchmark_facts`` import only the module of the benchmark asked for
(options are checked against its constructor: ``mft_bench.evaluation.options``). Each benchmark module declares
its own facts (``FACTS``: domain, validation split, whether it runs code, the shapes the cost model needs) and
its class its prompt and scorer versions; everything here is derived from them.
``lm_eval:<task>`` names are not generation benchmarks of ours: the runner hands them to lm-eval
(``mft_bench.evaluation.lm_eval_task.run_lm_eval_task``).
"""

from __future__ import annotations

import importlib
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.evaluation.base import Benchmark, BenchmarkFacts, constructor_options

LM_EVAL_PREFIX = "lm_eval:"
LM_EVAL_RUN_VERSION = "2"  # how we call lm-eval (seeds, options); in the stage key, so a change reruns cached tasks

# name -> (module under mft_bench.evaluation, class name, fixed constructor options)
_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gsm8k": ("gsm8k", "GSM8K", {}),
    "synthetic_math": ("synthetic_math", "SyntheticMath", {}),
    "humaneval": ("humaneval", "HumanEval", {"variant": "olmes"}),
    "humaneval_plain": ("humaneval", "HumanEval", {"variant": "plain"}),
    "humaneval_plus": ("humaneval_plus", "HumanEvalPlus", {}),
    "ifeval": ("ifeval", "IFEval", {}),
}

BENCHMARK_NAMES: tuple[str, ...] = tuple(_SPECS)
# an lm-eval task, typical shapes (its own protocol decides them)
LM_EVAL_FACTS = BenchmarkFacts(items=1000, prompt_tokens=300, new_tokens=50)


def is_lm_eval(name: str) -> bool:
    """True for ``lm_eval:<task>`` names."""
    return name.startswith(LM_EVAL_PREFIX)


def lm_eval_task(name: str) -> str:
    """The lm-eval task of an ``lm_eval:<task>`` name."""
    return name[len(LM_EVAL_PREFIX):]


def validate_benchmark_name(name: str) -> None:
    """Raise ``MftBenchError`` unless ``name`` is a known benchmark or ``lm_eval:<task>``; imports nothing heavy."""
    if not isinstance(name, str):
        raise MftBenchError(f"benchmark name must be a string, got {type(name).__name__}: {name!r}")
    if is_lm_eval(name):
        if not lm_eval_task(name).strip():
            raise MftBenchError(f"benchmark '{name}' names no lm-eval task: write lm_eval:<task>, e.g. lm_eval:arc_easy")
        return
    if name not in _SPECS:
        raise MftBenchError(
            f"unknown benchmark '{name}'; known: {', '.join(BENCHMARK_NAMES)}, or lm_eval:<task> for any lm-eval task"
        )


def benchmark_class(name: str) -> tuple[type, dict[str, Any]]:
    """The class of the generation benchmark ``name`` and the constructor options the name fixes."""
    validate_benchmark_name(name)
    if is_lm_eval(name):
        raise MftBenchError(
            f"benchmark '{name}' runs through lm-eval as a whole, not as a generation benchmark: "
            "call mft_bench.evaluation.runner.evaluate with it"
        )
    module_name, class_name, fixed = _SPECS[name]
    return getattr(importlib.import_module(f"mft_bench.evaluation.{module_name}"), class_name), dict(fixed)


def check_available(name: str, options: dict[str, Any], data_dir: str | None = None) -> None:
    """What only this machine can tell about a benchmark, checked before any stage runs: that lm-eval knows an
    ``lm_eval:<task>`` task (nothing of its data is loaded)."""
    if is_lm_eval(name):
        from mft_bench.evaluation.lm_eval_task import check_task_exists

        check_task_exists(lm_eval_task(name), options.get("include_path"), data_dir)


def make_benchmark(name: str, options: dict[str, Any] | None = None, data_dir: str | None = None,
                   sandbox: str | None = None) -> Benchmark:
    """Build the generation benchmark ``name`` with the recipe's ``options`` (keyword arguments) and ``data_dir``;
    code benchmarks also get ``sandbox`` (the recipe's ``evaluation.sandbox``) unless their options set it."""
    cls, fixed = benchmark_class(name)
    clash = sorted(set(options or {}) & set(fixed))
    if clash:
        raise MftBenchError(f"benchmark '{name}' fixes option(s) {', '.join(clash)}; remove them from its options")
    kwargs = {**fixed, **(options or {})}
    if sandbox is not None and benchmark_facts(name).runs_code:
        kwargs.setdefault("sandbox", sandbox)
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MftBenchError(f"benchmark '{name}': bad options {sorted(options or {})}: {exc}") from exc


def benchmark_facts(name: str) -> BenchmarkFacts:
    """What benchmark ``name`` declares of itself (``BenchmarkFacts``); lm-eval tasks share ``LM_EVAL_FACTS``."""
    validate_benchmark_name(name)
    if is_lm_eval(name):
        return LM_EVAL_FACTS
    return importlib.import_module(f"mft_bench.evaluation.{_SPECS[name][0]}").FACTS[name]


def headline_benchmarks() -> dict[str, str]:
    """Domain -> the benchmark that heads it (the paper table's column)."""
    return {facts.domain: name for name in BENCHMARK_NAMES if (facts := benchmark_facts(name)).headline}


def benchmark_versions(name: str, options: dict[str, Any] | None = None) -> str:
    """``"<prompt>/<scorer>"`` versions of a benchmark with ``options`` (class attributes: nothing is loaded); the
    prompt part names each option that changes the prompt (``prompt_options``) when it differs from its default,
    e.g. ``1+num_fewshot=4/1``. For ``lm_eval:<task>``, the lm-eval version and ``LM_EVAL_RUN_VERSION`` (task
    versions are recorded in its metrics)."""
    validate_benchmark_name(name)
    if is_lm_eval(name):
        from importlib.metadata import version

        return f"lm-eval {version('lm_eval')}/{LM_EVAL_RUN_VERSION}"
    cls, _ = benchmark_class(name)
    defaults = constructor_options(cls)
    chosen = [f"{key}={options[key]}" for key in cls.prompt_options
              if key in (options or {}) and options[key] != defaults[key][1]]
    return f"{'+'.join([str(cls.prompt_version), *chosen])}/{cls.scorer_version}"


def metric_notes(name: str) -> dict[str, str]:
    """Metric -> one line on what it equals (and which similarly named metric it is not), for the reports;
    empty for benchmarks without notes and for ``lm_eval:<task>`` (its metric names are lm-eval's own)."""
    if is_lm_eval(name) or name not in _SPECS:
        return {}
    module_name, class_name, _ = _SPECS[name]
    cls = getattr(importlib.import_module(f"mft_bench.evaluation.{module_name}"), class_name)
    return dict(getattr(cls, "metric_notes", {}))
