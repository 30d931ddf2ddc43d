"""HumanEval+ (EvalPlus, Liu et al. 2023): the HumanEval problems with many more test inputs.

Data: the evalplus release file (``HumanEvalPlus-v0.1.10.jsonl.gz`` or any later ``HumanEvalPlus*.jsonl[.gz]``),
never downloaded here. Give its path with ``path=...``, or the environment variable ``HUMANEVAL_OVERRIDE_PATH``
(the one evalplus itself honours) or ``MFT_BENCH_HUMANEVAL_PLUS``.

Prompts, stop sequences and post-processing are those of :mod:`mft_bench.evaluation.humaneval` (same variants).

Scoring follows ``evalplus.eval.unsafe_execute`` for the ``humaneval`` dataset, reimplemented because the
``evalplus`` package pulls in API clients we do not need, and its checker runs the code in-process:

* expected outputs come from the file's ``canonical_solution`` run on every ``base_input`` + ``plus_input``
  (each call on a deep copy of the input, since solutions may mutate arguments), computed inside the sandbox by
  the judge process, which also does every comparison; the completion runs in the candidate process, never
  sees the reference or the inputs it is not called with, and its outputs reach the judge as plain built-in
  data (see :mod:`mft_bench.evaluation.humaneval` for what that changes);
* an output matches when ``out == expected``; otherwise, if ``atol`` is non-zero (it becomes 1e-6 once a float or
  list of floats is expected and ``atol`` is 0, as in evalplus), types and lengths must agree and values must be
  close like ``np.allclose(out, expected, rtol=1e-7, atol=atol)``;
* ``find_zero`` uses evalplus's special oracle: ``|poly(xs, out)| <= atol``.

The whole run has one wall-time limit (``timeout``, default 20 s as oe-eval uses for the plus sets) instead of
evalplus's per-input limits derived from the reference's timing. A sample passes only if every input matches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.evaluation import humaneval, sandbox
from mft_bench.evaluation.base import Item

ENV_VARS = ("HUMANEVAL_OVERRIDE_PATH", "MFT_BENCH_HUMANEVAL_PLUS")
REQUIRED_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol")
HOW_TO_GET = (
    "download HumanEvalPlus-v0.1.10.jsonl.gz from https://github.com/evalplus/humanevalplus_release/releases "
    "(tag v0.1.10) on a machine with internet, copy it here and pass its path (benchmark setting `path`, or "
    "the environment variable HUMANEVAL_OVERRIDE_PATH or MFT_BENCH_HUMANEVAL_PLUS)"
)

# The judge: runs in the sandbox's judge process after the header defines _SOLUTION, _ENTRY, _INPUTS_JSON, _ATOL;
# the candidate's function is reached through candidate_function.
_CHECKER = '''
import copy as _copy, json as _json, math as _math


def _is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def _close(out, exp, atol, rtol=1e-07):
    if isinstance(exp, (list, tuple)):
        return len(out) == len(exp) and all(_close(o, e, atol, rtol) for o, e in zip(out, exp))
    out, exp = float(out), float(exp)
    if _math.isnan(out) or _math.isnan(exp):
        return False
    if _math.isinf(out) or _math.isinf(exp):
        return out == exp
    return abs(out - exp) <= atol + rtol * abs(exp)


def _poly(xs, x):
    return sum(coeff * _math.pow(x, i) for i, coeff in enumerate(xs))


def _run():
    inputs = _json.loads(_INPUTS_JSON)
    reference = {"__name__": "__reference__"}
    exec(compile(_SOLUTION, "<canonical_solution>", "exec"), reference)
    expected = [reference[_ENTRY](*_copy.deepcopy(inp)) for inp in inputs]
    fn = candidate_function(_ENTRY)
    atol = _ATOL
    for i, (inp, exp) in enumerate(zip(inputs, expected)):
        out = fn(*_copy.deepcopy(inp))
        if _ENTRY == "find_zero":
            assert abs(_poly(*inp, out)) <= atol, "input %d: not a zero" % i
            continue
        exact = out == exp
        if atol == 0 and _is_floats(exp):
            atol = 1e-6  # evalplus: enforce a tolerance for float outputs (and keep it)
        if not exact and atol != 0:
            assert type(out) == type(exp), "input %d: type %s, expected %s" % (i, type(out).__name__,
                                                                            type(exp).__name__)
            assert _close(out, exp, atol), "input %d: output not close to the expected one" % i
        else:
            assert exact, "input %d: wrong output" % i


_run()
'''


def resolve_path(path: str | None) -> Path:
    """The HumanEval+ file from ``path`` or the environment, else a user-facing error saying how to get it."""
    for source, value in [("path", path)] + [(name, os.environ.get(name)) for name in ENV_VARS]:
        if value:
            candidate = Path(value).expanduser()
            if not candidate.is_file():
                raise MftBenchError(f"humaneval_plus: {source} points at {candidate}, which is not a file; "
                                    f"{HOW_TO_GET}")
            return candidate
    raise MftBenchError(f"humaneval_plus needs the HumanEval+ data file, which is not set; {HOW_TO_GET}")


def build_plus_job(problem: dict[str, Any], completion: str) -> sandbox.Job:
    """The completion (candidate) and a judge that checks it on all base + plus inputs against the reference."""
    inputs = list(problem["base_input"]) + list(problem["plus_input"])
    header = (
        f"_SOLUTION = {problem['prompt'] + problem['canonical_solution']!r}\n"
        f"_ENTRY = {problem['entry_point']!r}\n"
        f"_INPUTS_JSON = {json.dumps(inputs)!r}\n"
        f"_ATOL = {float(problem.get('atol') or 0)!r}\n"
    )
    return sandbox.Job(candidate=problem["prompt"] + completion, judge=header + _CHECKER)


class HumanEvalPlus(humaneval.HumanEval):
    """HumanEval+ with the prompts of :class:`~mft_bench.evaluation.humaneval.HumanEval`."""

    scorer_version = "2"  # 2: tests in their own process, results compared as plain data

    def __init__(self, path: str | None = None, variant: str = "olmes", timeout: float = 20.0,
                 **kwargs: Any) -> None:
        super().__init__(variant=variant, timeout=timeout, **kwargs)
        self.name = "humaneval_plus" if variant == "olmes" else "humaneval_plus_plain"
        self.path = path

    def _resolve_data_file(self) -> Path:
        return resolve_path(self.path)

    def _load(self, path: Path) -> list[dict[str, Any]]:
        problems = humaneval.load_problems(path)
        for number, problem in enumerate(problems, 1):
            missing = [f for f in REQUIRED_FIELDS if f not in problem]
            if missing:
                raise MftBenchError(f"{path} line {number} lacks {missing}: not a HumanEval+ file; {HOW_TO_GET}")
        return problems

    def jobs(self, item: Item, outputs: list[str]) -> list[sandbox.Job]:
        return [build_plus_job(item.data, self.extract(o)) for o in outputs]
