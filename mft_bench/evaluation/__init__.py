"""Evaluation: benchmarks (one module each), generation backends, the registry, their options and the runner.

Kept import-light: submodules load on first use, so ``import mft_bench.evaluation`` costs nothing and
``from mft_bench.evaluation import gsm8k, humaneval`` imports just those two.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_SUBMODULES = (
    "backends",
    "base",
    "gsm8k",
    "humaneval",
    "humaneval_plus",
    "ifeval",
    "lm_eval_task",
    "options",
    "registry",
    "runner",
    "synthetic_math",
)


def __getattr__(name: str) -> ModuleType:
    # PEP 562: `mft_bench.evaluation.gsm8k` works after a bare `import mft_bench.evaluation`.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
