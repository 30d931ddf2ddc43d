"""Evaluate one model folder on one benchmark in a fresh process.

``python -m mft_bench.evaluation.worker '<json job>'`` runs ``runner.evaluate`` on an ``EvaluationJob`` and exits:
0 when ``metrics.json`` is written, 2 with one ``error:`` line on stderr for a problem the user can fix
(``MftBenchError``), 1 (with a traceback) for anything else. ``evaluate_in_subprocess`` starts it and returns the
metrics.

Why a process per evaluation: a vLLM engine checks, when it starts, how much GPU memory is free and takes a fixed
share of it; started in the process that trained, it would find the training's memory still held, and a second
engine in the same process needs the first one torn down completely. A fresh process starts once training
released the GPU, can be pinned to one device (``CUDA_VISIBLE_DEVICES`` in ``env``), and gives everything back
when it exits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
ERROR_PREFIX = "error: "
STDERR_TAIL_LINES = 40  # of a crashed worker's stderr, kept for the RuntimeError
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


@dataclass(frozen=True)
class EvaluationJob:
    """The arguments of one ``runner.evaluate`` call on a checkpoint folder (JSON-serialisable)."""

    model_path: str
    benchmark: str
    out_dir: str
    backend: str = "hf"
    options: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    batch_size: int = 32
    data_dir: str | None = None
    seed: int = 0
    dtype: str | None = None
    max_length: int | None = None
    sandbox: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvaluationJob:
        """The job ``values`` describe; ``MftBenchError`` naming unknown or missing fields."""
        if not isinstance(values, Mapping):
            raise MftBenchError(f"evaluation job must be a JSON object, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise MftBenchError(f"evaluation job: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        required = [name for name, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if values.get(name) in (None, "")]
        if missing:
            raise MftBenchError(f"evaluation job: missing field(s) {', '.join(missing)}")
        return cls(**{name: (dict(value) if name == "options" and value is not None else value)
                       for name, value in values.items()})

    @classmethod
    def from_json(cls, text: str) -> EvaluationJob:
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise MftBenchError(f"evaluation job is not valid JSON: {exc}") from None
        return cls.from_dict(values)


def run_job(job: EvaluationJob) -> dict[str, Any]:
    """``runner.evaluate`` on ``job``, in this process; its metrics."""
    from mft_bench.evaluation.runner import evaluate

    return evaluate(
        None, None, job.benchmark, Path(job.out_dir), options=job.options or None, limit=job.limit,
        backend=job.backend, batch_size=job.batch_size, data_dir=job.data_dir, model_path=job.model_path,
        seed=job.seed, dtype=job.dtype, max_length=job.max_length, sandbox=job.sandbox,
    )


def evaluate_in_subprocess(job: EvaluationJob | Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process (this interpreter, this copy of mft_bench) and return its metrics.

    ``env``: variables set for the worker on top of this process's environment (e.g. ``CUDA_VISIBLE_DEVICES``).
    The worker's stderr (its log) is passed through as it comes. Raises ``MftBenchError`` with the worker's
    one-line message when it rejects its input (exit 2), ``RuntimeError`` with the end of its stderr when it fails
    otherwise."""
    if not isinstance(job, EvaluationJob):
        job = EvaluationJob.from_dict(job)
    # a lone evaluation: never a member of the launching run's process group (vLLM would try to join it)
    child_env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    child_env.update(env or {})
    # The worker imports the same mft_bench as this process, not whichever one its path would find first.
    package_root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, child_env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "mft_bench.evaluation.worker", job.to_json()]
    logger.info("%s on %s: evaluating in a worker process", job.benchmark, job.model_path)
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    with subprocess.Popen(command, env=child_env, stderr=subprocess.PIPE, text=True, errors="replace") as process:
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
    code = process.returncode
    if code == 0:
        return json.loads((Path(job.out_dir) / "metrics.json").read_text(encoding="utf-8"))
    errors = [line for line in tail if line.startswith(ERROR_PREFIX)]
    if code == EXIT_BAD_INPUT and errors:
        raise MftBenchError(errors[-1][len(ERROR_PREFIX):])
    raise RuntimeError(
        f"evaluation worker for {job.benchmark} on {job.model_path} exited with code {code}:\n" + "\n".join(tail)
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mft_bench").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        if len(args) != 1:
            raise MftBenchError("usage: python -m mft_bench.evaluation.worker '<evaluation job as JSON>'")
        run_job(EvaluationJob.from_json(args[0]))
    except MftBenchError as exc:
        print(ERROR_PREFIX + " ".join(str(exc).split()), file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
