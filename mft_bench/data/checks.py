"""Checks of a recipe's data that need files or the tokenizer but not the data itself, run before any stage.

``check_data`` refuses, with one line each: a local file that is missing, empty, not UTF-8, not JSON (its first row,
or the whole of a small ``.json``), not parquet, or whose first row lacks the fields of its format; a synthetic
source whose rows could not fit in this machine's memory (their text alone, a lower bound of what holding them
takes); and a ``max_length`` that the chat template's own tokens before an answer fill, so no row could keep a
token to learn. The data stage reads everything (and says so in one line when a later row is bad).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mft_bench.data import converters, offline, synthetic_math
from mft_bench.data.formatting import chat_template_of, render_with_spans
from mft_bench.data.sources import LOCAL_BUILDERS, SourceSpec, resolve
from mft_bench.errors import MftBenchError

WHOLE_JSON_BYTES = 64 << 20  # a .json file up to this size is parsed whole (larger ones: the data stage does it)
HEAD_BYTES = 1 << 16  # the start of a file checked to be UTF-8
LINE_BYTES = 16 << 20  # the longest first line read
SAMPLE_ROWS = 16  # generated rows measured to size a synthetic source


def check_data(sources: Sequence[SourceSpec], *, seed: int, max_length: int, data_dir: str | None,
               tokenizer: Any) -> None:
    """``MftBenchError`` for the first problem (see the module docstring); hub sources are left to the data stage."""
    for source in sources:
        kind, path = resolve(source, data_dir)
        if kind == "local":
            check_local_file(source, path)
        elif kind == "synthetic":
            check_synthetic_rows(source, seed)
    check_max_length(tokenizer, max_length)


def _where(source: SourceSpec) -> str:
    return f"data source '{source.name}'"


def check_local_file(source: SourceSpec, path: Path) -> None:
    """The file exists, is of a known type, and its start is what that type says."""
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise MftBenchError(f"{_where(source)}: unsupported file type '{path.suffix}'; use .json, .jsonl or .parquet")
    if not path.is_file():
        raise MftBenchError(f"{_where(source)}: file not found: {path}; fix the path (relative paths are also "
                            f"looked up in ${offline.ENV_VAR})")
    size = path.stat().st_size
    if size == 0:
        raise MftBenchError(f"{_where(source)}: {path} is empty; give a file with rows")
    if builder == "parquet":
        with path.open("rb") as handle:
            head = handle.read(4)
            handle.seek(max(size - 4, 0))
            tail = handle.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            raise MftBenchError(f"{_where(source)}: {path} is not a parquet file (no PAR1 marks)")
        return
    row = _first_json_row(source, path, size)
    if row is not None:
        _check_fields(source, row)


def _first_json_row(source: SourceSpec, path: Path, size: int) -> dict | None:
    """The first row of a JSON-lines file or of a ``.json`` list; None where this cannot tell cheaply (a first line
    too long to read here, a ``.json`` document that is one object), for the data stage to find out."""
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) == size)
        except UnicodeDecodeError as exc:
            raise MftBenchError(f"{_where(source)}: {path} is not UTF-8 text (byte 0x{head[exc.start]:02x} at "
                                f"offset {exc.start}); save it as UTF-8") from None
        handle.seek(0)
        number, raw = 0, b""
        while not raw.strip():
            raw = handle.readline(LINE_BYTES)
            number += 1
            if not raw:
                raise MftBenchError(f"{_where(source)}: {path} holds only blank lines; give a file with rows")
    if len(raw) == LINE_BYTES and not raw.endswith(b"\n"):
        return None
    text = _utf8(source, path, raw, number)
    document = path.suffix.lower() == ".json"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if not (document and text.lstrip()[:1] in ("[", "{")):
            where = f"line {number} is not JSON" if not document else "is not JSON"
            raise MftBenchError(f"{_where(source)}: {path} {where} ({exc.msg})") from None
        if size > WHOLE_JSON_BYTES:
            return None
        value = _parse_whole(source, path)
        if isinstance(value, dict):
            return None
    if document and isinstance(value, list):
        if not value:
            raise MftBenchError(f"{_where(source)}: {path} is an empty list; give a file with rows")
        value = value[0]
    if not isinstance(value, dict):
        raise MftBenchError(f"{_where(source)}: {path}: the first row is a JSON {type(value).__name__}, not an "
                            "object with a row's fields")
    return value


def _utf8(source: SourceSpec, path: Path, raw: bytes, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MftBenchError(f"{_where(source)}: {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line "
                            f"{number}); save it as UTF-8") from None


def _parse_whole(source: SourceSpec, path: Path) -> Any:
    text = _utf8(source, path, path.read_bytes(), 1)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MftBenchError(f"{_where(source)}: {path} is not JSON ({exc.msg} at line {exc.lineno})") from None


def _check_fields(source: SourceSpec, row: dict) -> None:
    try:
        if source.format == "auto":
            converters.detect_format(row)
        else:
            missing = [f for f in converters.REQUIRED_FIELDS[source.format] if f not in row]
            if missing:
                raise MftBenchError(f"rows lack {'/'.join(map(repr, missing))} needed by format '{source.format}'; "
                                    f"found fields {sorted(row)}")
    except MftBenchError as exc:
        raise MftBenchError(f"{_where(source)}: {exc}") from None


def memory_bytes() -> int | None:
    """This machine's physical memory (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_synthetic_rows(source: SourceSpec, seed: int) -> None:
    """The generated rows' text alone must fit this machine's memory (``rows: 1000000000000`` would never end)."""
    rows = source.rows if source.rows is not None else synthetic_math.DEFAULT_ROWS.get(source.split, 0)
    memory = memory_bytes()
    if not rows or memory is None:
        return
    sample = synthetic_math.generate(source.split, min(rows, SAMPLE_ROWS), seed)
    per_row = sum(len(row["question"].encode()) + len(row["answer"].encode()) for row in sample) / len(sample)
    if rows * per_row > memory:
        raise MftBenchError(f"{_where(source)}: rows {rows} would take at least {rows * per_row / 2**30:,.0f} GiB "
                            f"(~{per_row:.0f} bytes of text each), more than this machine's {memory / 2**30:.0f} "
                            "GiB of memory; lower rows")


def check_max_length(tokenizer: Any, max_length: int) -> None:
    """Some row must be able to keep an answer token: the chat template's tokens before the answer of the shortest
    possible conversation (an empty question) must leave room under ``max_length``."""
    conversation = [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]
    text, spans = render_with_spans(conversation, tokenizer, chat_template_of(tokenizer))
    before_answer = len(tokenizer(text[:spans[0][0]], add_special_tokens=False)["input_ids"])
    if before_answer >= max_length:
        raise MftBenchError(f"data.max_length {max_length} leaves no room for an answer: the chat template alone "
                            f"takes {before_answer} tokens before it, so every row would be dropped; raise max_length")
