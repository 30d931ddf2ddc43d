"""Where training conversations come from: hub datasets, local files, the offline directory, the generator.

A ``SourceSpec`` names one source; ``load_conversations`` reads it, takes ``rows`` rows after a seeded shuffle
(the paper's mixtures: N rows from each source) and converts each row to a chat conversation.
``read_table`` and ``convert_rows`` serve other selections (``mft_bench.data.official``).

How ``kind: auto`` resolves ``name``:
1. ``synthetic_math`` -> the project's generator (``mft_bench.data.synthetic_math``);
2. an existing path, or a name ending in .json/.jsonl/.parquet -> that local file (a relative path that does not
   exist is also looked up inside the offline data directory);
3. a hub name the offline data directory holds for ``split`` -> that local file (the hub is never contacted);
4. otherwise the hub, through ``datasets.load_dataset(name, config, split=split)``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mft_bench.data import converters, offline, synthetic_math
from mft_bench.data.local_files import LOCAL_BUILDERS, check_local_file
from mft_bench.errors import MftBenchError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

SYNTHETIC_NAMES = ("synthetic_math",)


class SourceSpec(BaseModel):
    """One training data source of a recipe.

    ``split`` picks the hub split or the offline directory's file; a local file is a single split, taken whole.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, description="hub id ('openai/gsm8k'), a local .json/.jsonl/.parquet path, or 'synthetic_math'"
    )
    kind: Literal["auto", "hub", "local", "synthetic"] = "auto"
    config: str | None = Field(default=None, description="hub config, e.g. 'main' for openai/gsm8k")
    split: str = "train"
    format: Literal["auto", "gsm8k", "alpaca", "messages"] = "auto"
    rows: int | None = Field(default=None, gt=0, description="rows taken after a seeded shuffle; None = all")


def _looks_local(name: str) -> bool:
    return Path(name).suffix.lower() in LOCAL_BUILDERS or Path(name).expanduser().exists()


def resolve(source: SourceSpec, data_dir: str | None = None) -> tuple[str, Path | None]:
    """``("synthetic", None)``, ``("local", path)`` or ``("hub", None)`` for ``source`` (see module docstring)."""
    kind = source.kind
    if kind == "synthetic" or (kind == "auto" and source.name in SYNTHETIC_NAMES):
        if source.name not in SYNTHETIC_NAMES:
            raise MftBenchError(
                f"data source '{source.name}': kind 'synthetic' needs one of the generators "
                f"{', '.join(SYNTHETIC_NAMES)}"
            )
        return "synthetic", None
    if kind == "local" or (kind == "auto" and _looks_local(source.name)):
        path = Path(source.name).expanduser()
        root = offline.data_dir(data_dir)
        if not path.exists() and not path.is_absolute() and root is not None and (root / path).exists():
            path = root / path
        return "local", path
    hit = offline.resolve_offline(source.name, source.split, data_dir)
    if hit is not None:
        return "local", hit
    return "hub", None


def _read_local(source: SourceSpec, path: Path) -> datasets.Dataset:
    import datasets

    check_local_file(source, path)  # missing, empty, binary, not JSON: said plainly, not as datasets' error
    builder = LOCAL_BUILDERS[path.suffix.lower()]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets/pyarrow raise many types for unreadable files
        raise MftBenchError(f"data source '{source.name}': cannot read {path}: {_first_line(exc)}") from exc


def _read_hub(source: SourceSpec) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(source.name, source.config, split=source.split)
    except Exception as exc:  # offline mode, missing dataset, bad config/split: all fixed the same way
        raise MftBenchError(
            f"data source '{source.name}' (config {source.config!r}, split '{source.split}') could not be loaded "
            f"from the hub ({_first_line(exc)}); offline, set ${offline.ENV_VAR} or the recipe's data_dir to a "
            f"folder holding it, or give a local .json/.jsonl/.parquet path as name"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def sample_indices(total: int, rows: int | None, seed: int) -> list[int]:
    """Indices of ``rows`` items out of ``total`` after a seeded shuffle (all of them, shuffled, when None)."""
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return order if rows is None else order[:rows]


def convert_rows(
    source: SourceSpec, rows: list[dict[str, Any]], columns: list[str], positions: list[int]
) -> list[list[dict]]:
    """Conversations of ``rows`` (the table rows at ``positions``, named in errors) in the source's format."""
    fmt = source.format
    try:
        if fmt == "auto":
            fmt = converters.detect_format(dict.fromkeys(columns))
        else:
            missing = [f for f in converters.REQUIRED_FIELDS[fmt] if f not in columns]
            if missing:
                wanted = "/".join(repr(f) for f in missing)
                raise MftBenchError(f"rows lack {wanted} needed by format '{fmt}'; found fields {sorted(columns)}")
    except MftBenchError as exc:
        raise MftBenchError(f"data source '{source.name}': {exc}") from exc
    conversations = []
    for position, row in zip(positions, rows):
        try:
            conversations.append(converters.to_messages(row, fmt))
        except MftBenchError as exc:
            raise MftBenchError(f"data source '{source.name}', row {position}: {exc}") from exc
    return conversations


def read_table(source: SourceSpec, data_dir: str | None = None) -> tuple[str, Path | None, datasets.Dataset | None]:
    """``(kind, path, table)`` of a source: its whole table as ``datasets`` loads it (None for the generator)."""
    kind, path = resolve(source, data_dir)
    if kind == "synthetic":
        return kind, None, None
    return kind, path, _read_local(source, path) if kind == "local" else _read_hub(source)


def load_conversations(source: SourceSpec, *, seed: int, data_dir: str | None = None) -> list[list[dict]]:
    """The conversations of ``source``: ``rows`` of them after a seeded shuffle (all, shuffled, when None).

    Same seed, same conversations in the same order.
    """
    kind, path = resolve(source, data_dir)
    if kind == "synthetic":
        n = source.rows if source.rows is not None else synthetic_math.DEFAULT_ROWS.get(source.split, 0)
        rows = synthetic_math.generate(source.split, n, seed)  # already seeded and shuffled
        conversations = convert_rows(source, rows, ["question", "answer"], list(range(len(rows))))
    else:
        table = _read_local(source, path) if kind == "local" else _read_hub(source)
        if source.rows is not None and source.rows > len(table):
            raise MftBenchError(
                f"data source '{source.name}': rows {source.rows} asked but it has only {len(table)}; lower rows"
            )
        positions = sample_indices(len(table), source.rows, seed)
        conversations = convert_rows(source, table.select(positions).to_list(), table.column_names, positions)
    where = path if kind == "local" else kind
    logger.info("data source %s (%s): %d conversations", source.name, where, len(conversations))
    return conversations
