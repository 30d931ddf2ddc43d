"""What a benchmark's ``options`` may hold, checked when the recipe is read rather than after hours of training.

A generation benchmark takes the keyword arguments of its constructor, except ``data_dir`` (the recipe's) and the
options the registry fixes, with the types its signature gives, narrowed in ``OPTION_TYPES`` for the options
several benchmarks share; then the constructor itself runs, for its checks of how options go together
(``n_samples`` and ``temperature``, ``k``). ``lm_eval:<task>`` benchmarks take ``LM_EVAL_OPTIONS``.
Options are checked, never converted: what the recipe says is what the stage key hashes and the benchmark gets.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, create_model

from mft_bench.errors import MftBenchError
from mft_bench.evaluation.base import constructor_options
from mft_bench.seeds import SEED_MAX

LM_EVAL_OPTIONS = ("num_fewshot", "seeds", "include_path", "gen_kwargs", "bootstrap_iters")
# typo guards: far above any real setting, low enough that a slipped exponent is refused instead of generating for days
MAX_NEW_TOKENS = 1 << 20
MAX_SAMPLES = 10_000
MAX_ITEMS = 10_000_000

OPTION_TYPES: dict[str, Any] = {
    "max_new_tokens": Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)],
    "n_samples": Annotated[int, Field(ge=1, le=MAX_SAMPLES)],
    "n": Annotated[int, Field(ge=1, le=MAX_ITEMS)],
    "num_fewshot": Annotated[int, Field(ge=0)],
    "seed": Annotated[int, Field(ge=0, le=SEED_MAX)],
    "temperature": Annotated[float, Field(ge=0)],
    "top_p": Annotated[float, Field(gt=0, le=1)] | None,
    "timeout": Annotated[float, Field(gt=0)],
    "workers": Annotated[int, Field(ge=1)] | None,
    "k": list[Annotated[int, Field(ge=1, le=MAX_SAMPLES)]] | tuple[Annotated[int, Field(ge=1, le=MAX_SAMPLES)], ...],
    "sandbox": Literal["namespace", "rlimits"],
}
_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")  # "16" is not 16: the backend needs an int


def _plural(names: list[str]) -> str:
    return ("option " if len(names) == 1 else "options ") + ", ".join(repr(n) for n in names)


def validate_options(name: str, options: dict[str, Any]) -> None:
    """``MftBenchError`` with one line unless ``options`` are ones benchmark ``name`` takes, with valid values."""
    from mft_bench.evaluation.registry import benchmark_class, is_lm_eval, make_benchmark, validate_benchmark_name

    validate_benchmark_name(name)
    if is_lm_eval(name):
        validate_lm_eval_options(name, options)
        return
    cls, fixed = benchmark_class(name)
    clash = sorted(set(options) & set(fixed))
    if clash:
        raise MftBenchError(f"benchmark '{name}' fixes option(s) {', '.join(clash)}; remove them from its options")
    taken = {key: value for key, value in constructor_options(cls).items() if key != "data_dir" and key not in fixed}
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise MftBenchError(f"benchmark '{name}': unknown {_plural(unknown)}; it takes {', '.join(sorted(taken))}")
    fields = {key: (OPTION_TYPES.get(key, hint), default) for key, (hint, default) in taken.items()}
    try:
        create_model(f"{cls.__name__}Options", __config__=_STRICT, **fields).model_validate(options)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise MftBenchError(f"benchmark '{name}': options.{where}: {error['msg']} (got {error['input']!r:.80})") from None
    make_benchmark(name, options)  # the constructor's own checks; it loads nothing


def validate_lm_eval_options(name: str, options: dict[str, Any]) -> None:
    """The options of an ``lm_eval:<task>`` benchmark (the task's existence needs lm-eval's index: see
    ``lm_eval_task.check_task_exists``)."""
    from mft_bench.evaluation.lm_eval_task import resolve_seeds

    unknown = sorted(set(options) - set(LM_EVAL_OPTIONS))
    if unknown:
        raise MftBenchError(f"benchmark '{name}': unknown {_plural(unknown)}; lm_eval tasks take "
                            f"{', '.join(LM_EVAL_OPTIONS)}")
    for key in ("num_fewshot", "bootstrap_iters"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise MftBenchError(f"benchmark '{name}': options.{key} must be a non-negative integer, got {value!r}")
    for key, kind, example in (("gen_kwargs", dict, "{max_gen_toks: 512}"), ("include_path", str, "a folder")):
        value = options.get(key)
        if value is not None and not isinstance(value, kind):
            raise MftBenchError(f"benchmark '{name}': options.{key} must be {example}, got {value!r}")
    resolve_seeds(options.get("seeds"), where=f"benchmark '{name}': options.seeds")
