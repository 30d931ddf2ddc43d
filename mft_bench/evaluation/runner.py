"""Evaluate one model on one benchmark: generate, score, write per-item records and metrics, resumably.

Folder layout (``out_dir``)::

    records.jsonl   one JSON line per item, appended (flushed) as the backend finishes it and fsynced every
                    batch, then rewritten in item order at the end, so an interrupted-then-resumed run ends
                    byte-identical to an uninterrupted one
    metrics.json    written last, atomically (tmp + os.replace): its presence means "finished"; a finished
                    folder is returned as is and never rewritten

Crash safety: a kill at any point leaves either no metrics.json (the rerun resumes: records already written are
kept, a torn last line is dropped, only missing items are generated) or the finished folder. Records are
matched to items by id and prompt hash; a different prompt under the same id is an error, never silently mixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mft_bench.atomic import dumps_json, dumps_json_line, write_jsonl_atomic, write_text_atomic
from mft_bench.errors import MftBenchError
from mft_bench.evaluation.base import Benchmark, Item
from mft_bench.evaluation.options import validate_lm_eval_options
from mft_bench.evaluation.registry import is_lm_eval, lm_eval_task, make_benchmark, validate_benchmark_name

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
METRICS_FILE = "metrics.json"
CHUNK_BATCHES = 4  # a backend without generate_stream gets this many batches of items per generate call


# -- small pure helpers ---------------------------------------------------------------------------------------
def prompt_hash(prompt: str) -> str:
    """sha256 of the prompt text, first 16 hex digits."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def load_records(path: Path, items: list[Item]) -> dict[str, dict[str, Any]]:
    """Records already written for ``items`` (by id). A torn last line is ignored; records of other ids too.

    Raises ``MftBenchError`` when a record's prompt hash differs from its item's (the prompt changed since), or
    when a line other than the last is not valid JSON (the file was damaged, not merely cut).
    """
    if not path.exists():
        return {}
    expected = {it.id: prompt_hash(it.request.prompt) for it in items}
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    kept: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError("not a record")
        except ValueError as exc:
            if number == len(lines):
                logger.info("%s: ignoring a torn last line (interrupted write)", path)
                continue
            raise MftBenchError(
                f"{path}: line {number} is not a valid record ({exc}); delete the file to re-evaluate"
            ) from exc
        rid = str(record["id"])
        if rid not in expected or rid in kept:
            continue
        if record.get("prompt_hash") != expected[rid]:
            raise MftBenchError(
                f"{path}: item '{rid}' was generated from a different prompt (hash {record.get('prompt_hash')} vs "
                f"{expected[rid]} now); the benchmark's prompt changed; delete {path.parent} to re-evaluate"
            )
        kept[rid] = record
    return kept


def make_record(benchmark: Benchmark, item: Item, outputs: list[str]) -> dict[str, Any]:
    """The per-item record (see ``base.py``): ids and outputs, then the benchmark's scoring fields."""
    scored = benchmark.score(item, outputs)
    if "scores" not in scored:
        raise MftBenchError(f"benchmark '{benchmark.name}' returned no 'scores' for item '{item.id}'")
    record = dict(scored)
    record.update(
        id=item.id,
        prompt_hash=prompt_hash(item.request.prompt),
        output=outputs[0] if outputs else "",
        outputs=list(outputs),
    )
    record.setdefault("extracted", None)
    return record


def build_metrics(
    benchmark: Benchmark, records: list[dict[str, Any]], *, backend: str, limit: int | None
) -> dict[str, Any]:
    """metrics.json content (see ``base.py``)."""
    metrics: dict[str, Any] = {
        "benchmark": benchmark.name,
        "n": len(records),
        "primary_metric": benchmark.primary_metric,
        "metrics": benchmark.aggregate(records),
        "versions": {
            "data": benchmark.data_hash(),
            "prompt": str(benchmark.prompt_version),
            "scorer": str(benchmark.scorer_version),
        },
        "backend": backend,
        "limit": limit,
    }
    isolation = sorted({str(r["isolation"]) for r in records if r.get("isolation") is not None})
    if isolation:
        metrics["isolation"] = isolation[0] if len(isolation) == 1 else ",".join(isolation)
    return metrics


def _generated(generator: Any, items: list[Item], batch_size: int) -> Iterator[tuple[Item, list[str]]]:
    """``(item, its completions)`` for every item as the backend finishes them: all items in one
    ``generate_stream`` call where the backend has one (its batch then stays full across what chunked calls
    would each end by draining), else chunk by chunk through ``generate``."""
    if hasattr(generator, "generate_stream"):
        for index, outputs in generator.generate_stream([it.request for it in items]):
            yield items[index], outputs
        return
    size = CHUNK_BATCHES * batch_size
    for chunk in (items[start:start + size] for start in range(0, len(items), size)):
        outputs = generator.generate([it.request for it in chunk])
        if len(outputs) != len(chunk):
            raise RuntimeError(f"backend returned {len(outputs)} results for {len(chunk)} requests")
        yield from zip(chunk, outputs)


# -- entry point ----------------------------------------------------------------------------------------------
def evaluate(
    model: Any,
    tokenizer: Any,
    benchmark: str,
    out_dir: Path,
    *,
    options: dict[str, Any] | None = None,
    limit: int | None = None,
    backend: str = "hf",
    batch_size: int = 32,
    data_dir: str | None = None,
    model_path: str | None = None,
    seed: int = 0,
    dtype: str | None = None,
    max_length: int | None = None,
    sandbox: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (or the checkpoint at ``model_path``) on ``benchmark``; write and return its metrics.

    Resumes an interrupted evaluation in ``out_dir``; returns a finished one's metrics without recomputing.
    ``dtype``: what a checkpoint loaded from ``model_path`` runs in (the hf backend's load, vLLM's engine; vLLM
    needs it). ``max_length``: the context prompts are cut to, for either backend (see ``backends.make_backend``).
    A backend that holds an engine is closed before this returns.
    ``sandbox``: the weakest isolation code benchmarks accept (the recipe's ``evaluation.sandbox``).
    """
    out_dir = Path(out_dir)
    metrics_path = out_dir / METRICS_FILE
    if metrics_path.exists():
        logger.info("%s: finished earlier, reusing %s", benchmark, metrics_path)
        return json.loads(metrics_path.read_text(encoding="utf-8"))
    validate_benchmark_name(benchmark)
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch  # deferred: validation above needs no torch

    torch.manual_seed(seed)
    if is_lm_eval(benchmark):
        return _evaluate_lm_eval(model, tokenizer, benchmark, out_dir, options=options, limit=limit,
                                 batch_size=batch_size, model_path=model_path, data_dir=data_dir, dtype=dtype)

    bench = make_benchmark(benchmark, options, data_dir, sandbox=sandbox)
    items = bench.items(limit)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise MftBenchError(f"benchmark '{benchmark}' has duplicate item ids; records could not be matched")

    records_path = out_dir / RECORDS_FILE
    done = load_records(records_path, items)
    # Rewrite what is kept before appending: drops a torn last line that the next append would otherwise extend.
    if records_path.exists():
        write_jsonl_atomic(records_path, (done[i] for i in ids if i in done))
    missing = [it for it in items if it.id not in done]
    if done:
        logger.info("%s: resuming, %d of %d items already done", benchmark, len(done), len(items))

    if missing:
        generator = _backend(backend, model, tokenizer, model_path=model_path, batch_size=batch_size, seed=seed,
                             dtype=dtype, max_length=max_length)
        with _closing(generator), open(records_path, "a", encoding="utf-8", newline="\n") as f, tqdm(
            total=len(items), initial=len(done), desc=f"eval {benchmark}", unit="item", disable=None
        ) as bar:
            unsynced = 0
            for item, outputs in _generated(generator, missing, batch_size):
                line = dumps_json_line(make_record(bench, item, outputs))
                f.write(line + "\n")
                f.flush()  # a killed process keeps every record written so far
                done[item.id] = json.loads(line)  # the JSON round trip, exactly as a resumed run reads it
                unsynced += 1
                if unsynced >= batch_size:  # and a crashed machine all but the last batch's
                    os.fsync(f.fileno())
                    unsynced = 0
                bar.update(1)
            os.fsync(f.fileno())
        if any(it.id not in done for it in missing):
            raise RuntimeError(f"backend '{backend}' returned no result for some requests")

    records = [done[i] for i in ids]
    write_jsonl_atomic(records_path, records)
    metrics = build_metrics(bench, records, backend=backend, limit=limit)
    text = dumps_json(metrics)
    write_text_atomic(metrics_path, text)  # last: its presence marks the folder finished
    return json.loads(text)


def _backend(name: str, model: Any, tokenizer: Any, *, model_path: str | None, batch_size: int, seed: int,
             dtype: str | None, max_length: int | None):
    from mft_bench.evaluation.backends import make_backend

    if name == "hf":
        model, tokenizer = _in_memory(model, tokenizer, model_path, dtype)
    return make_backend(name, model=model, tokenizer=tokenizer, model_path=model_path, batch_size=batch_size, seed=seed,
                        dtype=dtype, max_length=max_length)


@contextlib.contextmanager
def _closing(generator: Any) -> Iterator[None]:
    """Close ``generator`` at the end, when it has a ``close()`` (a vLLM engine: one per evaluation)."""
    try:
        yield
    finally:
        close = getattr(generator, "close", None)
        if callable(close):
            close()


def _in_memory(model: Any, tokenizer: Any, model_path: str | None, dtype: str | None) -> tuple[Any, Any]:
    """What an in-process engine (the hf backend, lm-eval) runs: the model object given, else the checkpoint at
    ``model_path`` loaded here (for a stage, ``stage_models.evaluated_model`` has decided which of the two to pass;
    vLLM takes the folder alone, ``backends.make_backend``)."""
    if model is not None:
        return model, tokenizer
    if not model_path:
        raise MftBenchError("evaluate needs a model object or model_path (a checkpoint folder)")
    from mft_bench.backbone import load_backbone

    model, loaded_tokenizer = load_backbone(model_path, dtype=dtype or "float32")
    import torch

    if torch.cuda.is_available():  # the GPU this process was given (an evaluation worker sees only its own)
        model = model.to("cuda")
    return model, tokenizer if tokenizer is not None else loaded_tokenizer


def _evaluate_lm_eval(
    model: Any,
    tokenizer: Any,
    benchmark: str,
    out_dir: Path,
    *,
    options: dict[str, Any] | None,
    limit: int | None,
    batch_size: int,
    model_path: str | None,
    data_dir: str | None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """``lm_eval:<task>``: lm-eval runs the whole loop; its metrics dict is written as metrics.json (last).

    Seeds are lm-eval's own unless ``options["seeds"]`` overrides some; the recipe seed is not used: passed as
    lm-eval's few-shot seed it would show the model other few-shot examples than a plain lm-eval run does.
    """
    options = dict(options or {})
    validate_lm_eval_options(benchmark, options)  # fail before loading
    shots = options.get("num_fewshot")
    from mft_bench.evaluation.lm_eval_task import run_lm_eval_task

    model, tokenizer = _in_memory(model, tokenizer, model_path, dtype)

    # Options are passed only when given, so lm_eval_task's own defaults (e.g. bootstrap_iters) apply otherwise.
    extra = {key: options[key] for key in ("gen_kwargs", "bootstrap_iters", "seeds") if key in options}
    if data_dir is not None:
        extra["data_dir"] = data_dir
    run_lm_eval_task(  # writes records.jsonl and, last, metrics.json itself
        model, tokenizer, lm_eval_task(benchmark), out_dir, limit=limit, batch_size=batch_size,
        num_fewshot=shots, include_path=options.get("include_path"), **extra,
    )
    return json.loads((out_dir / METRICS_FILE).read_text(encoding="utf-8"))  # as written, like the hf path
