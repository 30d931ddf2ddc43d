"""HumanEval+ (EvalPlus, Liu et al. 2023): the HumanEval problems with many more test inputs.

Data, the first found of:

1. a file given with ``path=...``, or the environment variable ``HUMANEVAL_OVERRIDE_PATH`` (the one evalplus
   itself honours) or ``MFT_BENCH_HUMANEVAL_PLUS``: the evalplus release file (``HumanEvalPlus-v0.1.10.jsonl.gz``
   or any later ``HumanEvalPlus*.jsonl[.gz]``), or a HumanEval-format copy of the hub dataset (below);
2. ``humanevalplus/test.jsonl`` in the offline data directory (``MFT_BENCH_DATA_DIR``): the hub dataset's file;
3. the hub dataset ``evalplus/humanevalplus`` (split ``test``), what OLMES ``codex_humanevalplus`` (the official
   MFT coding evaluation) loads: HumanEval's fields, its ``test`` a ``check(candidate)`` over every base and plus
   input with the expected outputs written in.

Prompts, stop sequences and post-processing are those of :mod:`mft_bench.evaluation.humaneval` (same variants).

A HumanEval-format problem (``test``) is scored as OLMES scores it: ``test`` and ``check(entry_point)`` run as
HumanEval's (:func:`mft_bench.evaluation.humaneval.build_job`). Its tests compare floats with ``numpy.allclose``,
but the sandbox holds the standard library only: the judge gets a stand-in ``numpy`` (``_NUMPY_STANDIN``) whose
``allclose``/``testing.assert_allclose`` give numpy's verdicts on the plain data a candidate's results arrive as
(numbers, and lists/tuples of them broadcast as numpy does; anything else raises, as numpy's ufuncs do).
A release-file problem (``base_input``,
``plus_input``) is scored following ``evalplus.eval.unsafe_execute`` for the ``humaneval`` dataset, reimplemented
because the ``evalplus`` package pulls in API clients we do not need, and its checker runs the code in-process:

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
from functools import cached_property
from pathlib import Path
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.evaluation import humaneval, sandbox
from mft_bench.evaluation.base import BenchmarkFacts, Item
from mft_bench.evaluation.common import load_rows, short_hash

ENV_VARS = ("HUMANEVAL_OVERRIDE_PATH", "MFT_BENCH_HUMANEVAL_PLUS")
HUB_NAME = "evalplus/humanevalplus"
REQUIRED_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol")
HUB_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
HOW_TO_GET = (
    "allow hub access (evalplus/humanevalplus), or put the hub's test.jsonl at humanevalplus/test.jsonl in "
    "MFT_BENCH_DATA_DIR, or download HumanEvalPlus-v0.1.10.jsonl.gz from "
    "https://github.com/evalplus/humanevalplus_release/releases (tag v0.1.10) and pass its path (benchmark "
    "setting `path`, or the environment variable HUMANEVAL_OVERRIDE_PATH or MFT_BENCH_HUMANEVAL_PLUS)"
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


# Prepended to the judge of a hub-format problem (see the module docstring); trusted code, like the tests.
_NUMPY_STANDIN = '''
import math as _math, sys as _sys, types as _types


def _np_shape(x):
    if isinstance(x, (list, tuple)):
        inner = {_np_shape(e) for e in x}
        if len(inner) > 1:
            raise ValueError("setting an array element with a sequence: the shape is inhomogeneous")
        return (len(x),) + (inner.pop() if inner else ())
    if not isinstance(x, (bool, int, float)):
        raise TypeError("ufunc 'isfinite' not supported for the input types")
    return ()


def _np_pairs(a, b):
    if not isinstance(a, (list, tuple)):
        yield float(a), float(b)
        return
    if len(a) == len(b) or len(b) == 1:
        n = len(a)
    elif len(a) == 1:
        n = len(b)
    else:
        raise ValueError("operands could not be broadcast together")
    for i in range(n):
        yield from _np_pairs(a[i if len(a) > 1 else 0], b[i if len(b) > 1 else 0])


def _np_close(a, b, rtol, atol, equal_nan, same_shape=False):
    sa, sb = _np_shape(a), _np_shape(b)
    if same_shape and sa and sb and sa != sb:  # assert_allclose broadcasts scalars only
        raise AssertionError("shapes %s, %s mismatch" % (sa, sb))
    for _ in range(len(sb) - len(sa)):  # the lower-rank operand gets leading axes of length 1
        a = [a]
    for _ in range(len(sa) - len(sb)):
        b = [b]
    for x, y in _np_pairs(a, b):
        if _math.isnan(x) or _math.isnan(y):
            if not (equal_nan and _math.isnan(x) and _math.isnan(y)):
                return False
        elif _math.isinf(x) or _math.isinf(y):
            if x != y:
                return False
        elif abs(x - y) > atol + rtol * abs(y):
            return False
    return True


def _np_allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    return _np_close(a, b, rtol, atol, equal_nan)


def _np_assert_allclose(actual, desired, rtol=1e-07, atol=0, equal_nan=True, err_msg="", verbose=True):
    if not _np_close(actual, desired, rtol, atol, equal_nan, same_shape=True):
        raise AssertionError("Not equal to tolerance rtol=%g, atol=%g" % (rtol, atol))


_np = _types.ModuleType("numpy")
_np.allclose = _np_allclose
_np.testing = _types.SimpleNamespace(assert_allclose=_np_assert_allclose)
_np.ndarray = type("ndarray", (), {})  # nothing a candidate returns is one: results arrive as plain data
_np.float64 = _np.float32 = type("floating", (), {})
_sys.modules["numpy"] = _np
'''


def build_hub_job(problem: dict[str, Any], completion: str) -> sandbox.Job:
    """A hub-format problem as OLMES runs it (``test`` + ``check(entry_point)``), numpy stood in for."""
    job = humaneval.build_job(problem, completion)
    return sandbox.Job(candidate=job.candidate, judge=_NUMPY_STANDIN + job.judge)


def resolve_path(path: str | None) -> Path | None:
    """The HumanEval+ file from ``path`` or the environment (None when neither names one); a user-facing error
    when the one named is not a file."""
    for source, value in [("path", path)] + [(name, os.environ.get(name)) for name in ENV_VARS]:
        if value:
            candidate = Path(value).expanduser()
            if not candidate.is_file():
                raise MftBenchError(f"humaneval_plus: {source} points at {candidate}, which is not a file; "
                                    f"{HOW_TO_GET}")
            return candidate
    return None


def check_fields(problems: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """``problems`` when each has the release file's fields or the hub's; else a user-facing error."""
    for number, problem in enumerate(problems, 1):
        if all(f in problem for f in HUB_FIELDS) or all(f in problem for f in REQUIRED_FIELDS):
            continue
        missing = [f for f in REQUIRED_FIELDS if f not in problem]
        raise MftBenchError(f"{where} row {number} lacks {missing} (release file) or 'test' (hub copy): not a "
                            f"HumanEval+ file; {HOW_TO_GET}")
    return problems


def _load_from_hub() -> list[dict[str, Any]]:
    try:
        import datasets

        table = datasets.load_dataset(HUB_NAME, split="test")
    except Exception as exc:  # datasets raises many types offline (ConnectionError, OSError, its own)
        text = str(exc).strip()
        first = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        raise MftBenchError(f"humaneval_plus: no data file is set and the hub dataset {HUB_NAME} could not be "
                            f"loaded ({first}); {HOW_TO_GET}") from exc
    return [{field: row[field] for field in HUB_FIELDS} for row in table]


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


FACTS = {"humaneval_plus": BenchmarkFacts(items=164, prompt_tokens=180, new_tokens=200, domain="coding",
                                          runs_code=True)}


class HumanEvalPlus(humaneval.HumanEval):
    """HumanEval+ with the prompts of :class:`~mft_bench.evaluation.humaneval.HumanEval`."""

    scorer_version = "2"  # 2: tests in their own process, results compared as plain data

    def __init__(self, path: str | None = None, variant: str = "olmes", timeout: float = 20.0,
                 **kwargs: Any) -> None:
        super().__init__(variant=variant, timeout=timeout, **kwargs)
        self.name = "humaneval_plus" if variant == "olmes" else "humaneval_plus_plain"
        self.path = path

    def _resolve_data_file(self) -> Path | None:
        return resolve_path(self.path)

    @cached_property
    def _problems_and_hash(self) -> tuple[list[dict[str, Any]], str]:
        if self.data_file is not None:
            return check_fields(humaneval.load_problems(self.data_file), str(self.data_file)), \
                short_hash(self.data_file.read_bytes())
        rows, data_hash = load_rows(HUB_NAME, "test", self.data_dir, _load_from_hub)
        return check_fields(rows, HUB_NAME), data_hash

    @cached_property
    def problems(self) -> list[dict[str, Any]]:
        return self._problems_and_hash[0]

    def data_hash(self) -> str:
        return self._problems_and_hash[1]

    def jobs(self, item: Item, outputs: list[str]) -> list[sandbox.Job]:
        build = build_plus_job if "plus_input" in item.data else build_hub_job
        return [build(item.data, self.extract(o)) for o in outputs]
