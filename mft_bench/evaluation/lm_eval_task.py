"""Any lm-evaluation-harness task (``lm_eval:<task>``) run on the in-memory model through lm-eval's Python API.

``run_lm_eval_task`` wraps the model and a *copy* of the tokenizer in ``HFLM`` (HFLM may set a pad token; the
caller's tokenizer is left untouched), resolves the task with a ``TaskManager`` and runs ``simple_evaluate`` with
``log_samples=True``. It writes, atomically, ``records.jsonl`` (one line per document, the project's per-item
format) and ``metrics.json`` (the project's metrics format; metric names keep lm-eval's ``metric,filter`` form,
e.g. ``exact_match,strict-match``).

Custom tasks: the YAMLs in ``mft_bench/evaluation/lm_eval_tasks/`` (shipped as package data) run offline on the
offline data directory. They may use the placeholders ``${MFT_BENCH_DATA_DIR}`` (the offline data directory) and
``${LM_EVAL_TASKS_DIR}`` (lm-eval's own task folder, to ``include:`` an upstream config and so reuse its prompt,
filters and metrics). They are materialised with the placeholders filled in into a temporary include folder per
run; a YAML needing the data directory is left out when none is set. lm-eval's ~15k built-in tasks are indexed
only when the task is not found among ours and ``include_path`` (indexing them takes ~15 s).

Seeds and shots, as a plain lm-eval run: lm-eval's own defaults (``lm_eval.defaults``: Python ``random`` 0, numpy
1234, torch 1234, few-shot sampler 1234), not the recipe seed, so a task that samples its few-shot examples
shows the model the same prompts as ``lm_eval --tasks <task>`` would; ``num_fewshot`` is the task's own unless
given. A recipe overrides either through the benchmark options (``seeds: {fewshot: 7}``, ``num_fewshot: 5``);
the seeds used are recorded in metrics.json.

A task whose dataset lives on the hub fails with a ``MftBenchError`` when it cannot be loaded (set
``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1`` offline so that ``datasets`` fails at once instead of retrying).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from mft_bench.atomic import write_json_atomic, write_jsonl_atomic
from mft_bench.data.offline import data_dir as offline_data_dir
from mft_bench.errors import MftBenchError
from mft_bench.evaluation.ifeval import NLTK_FIX, suppress_nltk_download
from mft_bench.seeds import SEED_MAX

logger = logging.getLogger(__name__)

CUSTOM_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
DATA_PLACEHOLDER = "${MFT_BENCH_DATA_DIR}"
LM_EVAL_PLACEHOLDER = "${LM_EVAL_TASKS_DIR}"
_RESULT_SKIP = {"alias", "name", "sample_len", " "}
SEED_NAMES = ("random", "numpy", "torch", "fewshot")  # simple_evaluate's random_seed, numpy_random_seed, ...


def default_seeds() -> dict[str, int]:
    """lm-eval's own seeds, as ``simple_evaluate`` and the ``lm_eval`` CLI use them when none are given."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    return {"random": DEFAULT_RANDOM_SEED, "numpy": DEFAULT_OTHER_SEED, "torch": DEFAULT_OTHER_SEED,
            "fewshot": DEFAULT_OTHER_SEED}


def resolve_seeds(overrides: Any = None, *, where: str = "options.seeds") -> dict[str, int]:
    """lm-eval's default seeds with ``overrides`` (a mapping of some of ``SEED_NAMES`` to integers) applied."""
    seeds = default_seeds()
    if overrides is None:
        return seeds
    if not isinstance(overrides, dict):
        raise MftBenchError(f"{where} must be a mapping like {{fewshot: 1234}}, got {overrides!r}")
    unknown = sorted(str(k) for k in overrides if k not in SEED_NAMES)
    if unknown:
        raise MftBenchError(f"{where}: unknown seed(s) {', '.join(unknown)}; give any of {', '.join(SEED_NAMES)}")
    for name, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise MftBenchError(f"{where}.{name} must be an integer, got {value!r}")
        if not 0 <= value <= SEED_MAX:  # lm-eval seeds numpy with it
            raise MftBenchError(f"{where}.{name} must be between 0 and {SEED_MAX}, got {value}")
        seeds[name] = value
    return seeds


def lm_eval_tasks_dir() -> Path:
    """lm-eval's built-in task folder (target of ``${LM_EVAL_TASKS_DIR}``)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def materialize_custom_tasks(target: Path, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Copy our task YAMLs into ``target`` with placeholders filled in; returns the file names written."""
    root = offline_data_dir(data_dir)
    replacements = {LM_EVAL_PLACEHOLDER: str(lm_eval_tasks_dir())}
    if root is not None:
        replacements[DATA_PLACEHOLDER] = str(root)
    written = []
    for source in sorted(CUSTOM_TASKS_DIR.glob("*.yaml")):
        text = source.read_text(encoding="utf-8")
        if DATA_PLACEHOLDER in text and root is None:
            logger.debug("custom lm-eval task %s skipped: no offline data directory set", source.name)
            continue
        for placeholder, value in replacements.items():
            text = text.replace(placeholder, value)
        (target / source.name).write_text(text, encoding="utf-8")
        written.append(source.name)
    return written


def custom_task_names() -> list[str]:
    """Names of the tasks shipped in ``lm_eval_tasks/`` (the ``task:`` field of each YAML)."""
    import yaml

    names = []
    for source in sorted(CUSTOM_TASKS_DIR.glob("*.yaml")):
        text = source.read_text(encoding="utf-8").replace(DATA_PLACEHOLDER, "").replace(LM_EVAL_PLACEHOLDER, "")
        config = yaml.safe_load(text) or {}
        if isinstance(config.get("task"), str):
            names.append(config["task"])
    return names


def check_task_exists(task: str, include_path: str | None = None, data_dir: str | os.PathLike | None = None) -> None:
    """``MftBenchError`` unless lm-eval knows ``task`` (ours, ``include_path``'s or its own), in seconds: lm-eval's
    ~14k task files are only searched for the name, and indexed only in the folders of the files that mention it
    (a task's name is written in its YAML), instead of all of them as ``build_task_manager`` must to run it."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise MftBenchError(f"lm-eval task '{task}': options.include_path {include_path} is not a folder")
    with tempfile.TemporaryDirectory(prefix="mft_bench_lm_eval_tasks_") as tmp:
        materialize_custom_tasks(Path(tmp), data_dir)
        include_dirs = [tmp] + ([str(Path(include_path).expanduser().resolve())] if include_path else [])
        if task in TaskManager(include_path=include_dirs, include_defaults=False).all_tasks:
            return
        word = re.compile(rf"(?<![\w-]){re.escape(task)}(?![\w-])")
        folders = {path.parent for path in lm_eval_tasks_dir().rglob("*.yaml")
                   if word.search(path.read_text(encoding="utf-8", errors="replace"))}
        # a folder is indexed with its subfolders: one inside another would index its tasks twice
        outermost = [str(f) for f in sorted(folders) if not any(p in folders for p in f.parents)]
        if outermost and task in TaskManager(include_path=include_dirs + outermost, include_defaults=False).all_tasks:
            return
    stems = {path.stem for path in lm_eval_tasks_dir().rglob("*.yaml")} | set(custom_task_names())
    close = difflib.get_close_matches(task, sorted(stems), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if task in custom_task_names():
        hint += " (this shipped task needs an offline data directory: set MFT_BENCH_DATA_DIR)"
    raise MftBenchError(f"lm-eval task '{task}' not found{hint}")


def build_task_manager(task: str, include_dirs: list[str]) -> Any:
    """A TaskManager that knows ``task``: our folders first; lm-eval's built-in index only when needed."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_dirs, include_defaults=False)
    if task not in manager.all_tasks:
        manager = TaskManager(include_path=include_dirs, include_defaults=True)
    if task not in manager.all_tasks:
        close = difflib.get_close_matches(task, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        needs_data = task in custom_task_names()
        if needs_data:
            hint += " (this shipped task needs an offline data directory: set MFT_BENCH_DATA_DIR)"
        raise MftBenchError(f"lm-eval task '{task}' not found{hint}")
    return manager


def run_lm_eval_task(
    model: Any,
    tokenizer: Any,
    task: str,
    out_dir: Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    seeds: dict[str, int] | None = None,
    data_dir: str | None = None,
    gen_kwargs: dict[str, Any] | None = None,
    bootstrap_iters: int = 100000,
) -> dict[str, Any]:
    """Run lm-eval ``task`` on the in-memory ``model``; write ``records.jsonl`` + ``metrics.json``; return metrics.

    ``num_fewshot``: None keeps the task's own; ``seeds``: overrides of lm-eval's default seeds (see
    ``resolve_seeds``); ``data_dir``: the offline data directory for the shipped task YAMLs (default
    ``$MFT_BENCH_DATA_DIR``); ``gen_kwargs``: overrides of the task's generation settings (e.g.
    ``{"max_gen_toks": 512}``), recorded in metrics.json; ``bootstrap_iters``: lm-eval's bootstrap count for
    stderrs of non-mean aggregations.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    used_seeds = resolve_seeds(seeds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = getattr(model, "training", False)
    tok = copy.deepcopy(tokenizer)  # HFLM may set a pad token / padding side on the tokenizer it is given
    with tempfile.TemporaryDirectory(prefix="mft_bench_lm_eval_tasks_") as tmp:
        materialize_custom_tasks(Path(tmp), data_dir)
        include_dirs = [tmp] + ([str(Path(include_path).expanduser().resolve())] if include_path else [])
        manager = build_task_manager(task, include_dirs)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        try:
            with suppress_nltk_download():  # lm-eval's ifeval imports try to download NLTK data
                results = simple_evaluate(
                    model=lm,
                    tasks=[task],
                    num_fewshot=num_fewshot,
                    limit=limit,
                    gen_kwargs=gen_kwargs,
                    task_manager=manager,
                    log_samples=True,
                    bootstrap_iters=bootstrap_iters,
                    random_seed=used_seeds["random"],
                    numpy_random_seed=used_seeds["numpy"],
                    torch_random_seed=used_seeds["torch"],
                    fewshot_random_seed=used_seeds["fewshot"],
                )
        except MftBenchError:
            raise
        except Exception as exc:
            error = _user_error(task, exc)
            if error is None:
                raise
            raise error from exc
        finally:
            model.train(was_training)
    if results is None:  # only non-zero ranks in distributed runs get None
        raise MftBenchError(f"lm-eval returned no results for task '{task}'")
    records = samples_to_records(results.get("samples", {}))
    metrics = results_to_metrics(task, results, records, limit=limit, num_fewshot=num_fewshot)
    metrics["gen_kwargs"] = gen_kwargs
    metrics["seeds"] = used_seeds
    write_jsonl_atomic(out_dir / "records.jsonl", records)
    write_json_atomic(out_dir / "metrics.json", metrics)  # last: its presence marks the folder finished
    return metrics


def _user_error(task: str, exc: Exception) -> MftBenchError | None:
    """A ``MftBenchError`` for failures a user can fix (dataset unreachable, NLTK data missing), else None."""
    message = str(exc).strip()
    first = message.splitlines()[0][:200] if message else type(exc).__name__
    if isinstance(exc, LookupError) and "punkt" in message:  # IFEval sentence counting without punkt_tab
        return MftBenchError(f"lm-eval task '{task}': " + NLTK_FIX.format(ids="of this task"))
    if isinstance(exc, ImportError):  # a task's utils.py needs an extra (MATH: sympy, math_verify, antlr4 4.11)
        return MftBenchError(f"lm-eval task '{task}' needs a package that is not installed ({type(exc).__name__}: "
                             f"{first}); MATH tasks need pip install 'mft-bench[math]' (lm-eval[math])")
    if _is_data_error(exc):
        return MftBenchError(
            f"lm-eval task '{task}' could not load its dataset ({type(exc).__name__}: {first}); offline, use a task "
            "YAML with 'dataset_path: json' on local files (see mft_bench/evaluation/lm_eval_tasks) or allow hub access"
        )
    return None


def _is_data_error(exc: BaseException) -> bool:
    """Whether an exception from simple_evaluate comes from loading a dataset (hub unreachable, file missing)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        module = type(current).__module__ or ""
        if isinstance(current, (ConnectionError, FileNotFoundError, TimeoutError)) or module.startswith(
            ("datasets", "huggingface_hub", "requests", "urllib3", "httpx")
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """Floats/bools/lists as JSON values (lm-eval returns numpy scalars and tuples)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return str(value)


def _prompt_of(sample: dict[str, Any]) -> str:
    arguments = sample.get("arguments") or []
    first = arguments[0] if arguments else ""
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    return first if isinstance(first, str) else json.dumps(first, default=str, sort_keys=True)


def _output_fields(sample: dict[str, Any]) -> dict[str, Any]:
    resps = sample.get("resps") or []
    if resps and resps[0] and isinstance(resps[0][0], str):  # generate_until: one list of strings per request
        outputs = [str(r) for r in resps[0]]
        return {"output": outputs[0], "outputs": outputs}
    # loglikelihood / multiple_choice: one (logprob, is_greedy) per choice
    loglikelihoods = [_jsonable(r[0][0]) if isinstance(r[0], (list, tuple)) else _jsonable(r[0]) for r in resps]
    return {"output": loglikelihoods, "outputs": [loglikelihoods]}


def samples_to_records(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """lm-eval ``samples`` (one entry per document and filter) -> one record per document, ordered by id."""
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for task_name in sorted(samples):
        for sample in samples[task_name]:
            key = (task_name, int(sample["doc_id"]))
            filter_name = sample.get("filter", "none")
            record = records.get(key)
            if record is None:
                record = {
                    "id": f"{task_name}/{sample['doc_id']}",
                    "prompt_hash": _short_hash(_prompt_of(sample)),
                    **_output_fields(sample),
                    "extracted": {},
                    "scores": {},
                    "target": _jsonable(sample.get("target")),
                    "doc_hash": sample.get("doc_hash"),
                }
                records[key] = record
            filtered = _jsonable(sample.get("filtered_resps"))
            if isinstance(filtered, list) and len(filtered) == 1:  # generate_until: one filtered string
                filtered = filtered[0]
            record["extracted"][filter_name] = filtered
            for metric in sample.get("metrics", []):
                if metric in sample:
                    record["scores"][f"{metric},{filter_name}"] = _jsonable(sample[metric])
    return [records[k] for k in sorted(records)]


def _metric_block(task_results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s}`` -> ``{"acc,none": {"mean": x, "stderr": s}}``."""
    block: dict[str, dict[str, float | None]] = {}
    for key, value in task_results.items():
        if key in _RESULT_SKIP or "," not in key:
            continue
        metric, filter_name = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        stderr = task_results.get(f"{metric}_stderr,{filter_name}")
        block[key] = {
            "mean": _to_float(value),
            "stderr": _to_float(stderr),
        }
    return block


def _to_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return None
    return number if math.isfinite(number) else None


def results_to_metrics(
    task: str, results: dict[str, Any], records: list[dict[str, Any]], *, limit: int | None, num_fewshot: int | None
) -> dict[str, Any]:
    """The project's metrics.json for an lm-eval run (subtasks of a group listed under ``subtasks``)."""
    all_results = results.get("results", {})
    main = _metric_block(all_results.get(task, {}))
    subtasks = {name: _metric_block(r) for name, r in all_results.items() if name != task}
    versions = results.get("versions", {})
    n_samples = results.get("n-samples", {})
    n = sum(int(v.get("effective", 0)) for v in n_samples.values()) if n_samples else len(records)
    doc_hashes = "\n".join(f"{r['id']}:{r.get('doc_hash')}" for r in records)
    return {
        "benchmark": f"lm_eval:{task}",
        "n": n,
        "primary_metric": next(iter(main), None),
        "metrics": main,
        "subtasks": subtasks,
        "versions": {
            "data": _short_hash(doc_hashes),
            "prompt": str(versions.get(task, "")),  # the task's metadata.version
            "scorer": f"lm-eval {results.get('lm_eval_version', '')}".strip(),
            "lm_eval": results.get("lm_eval_version"),
            "tasks": {k: str(v) for k, v in versions.items()},
        },
        "n_shot": results.get("n-shot", {}),
        "backend": "hf",
        "limit": limit,
        "num_fewshot": num_fewshot,
    }
