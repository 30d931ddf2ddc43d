"""The cheap check of a local data file (``.json``, ``.jsonl``, ``.parquet``) before its source is read: it exists,
is not empty, is UTF-8 and JSON (its first row, or the whole of a small ``.json``) or parquet, and its first row has
the fields of the source's format. Each problem is one ``MftBenchError`` line naming the file.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mft_bench.data import converters, offline
from mft_bench.errors import MftBenchError

if TYPE_CHECKING:
    from mft_bench.data.sources import SourceSpec

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # file suffix -> datasets builder
WHOLE_JSON_BYTES = 64 << 20  # a .json file up to this size is parsed whole (larger ones: the data stage does it)
HEAD_BYTES = 1 << 16  # the start of a file checked to be UTF-8
LINE_BYTES = 16 << 20  # the longest first line read


def where(source: SourceSpec) -> str:
    """How an error message names a data source."""
    return f"data source '{source.name}'"


def check_local_file(source: SourceSpec, path: Path) -> None:
    """The file exists, is of a known type, and its start is what that type says."""
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise MftBenchError(f"{where(source)}: unsupported file type '{path.suffix}'; use .json, .jsonl or .parquet")
    if not path.is_file():
        raise MftBenchError(f"{where(source)}: file not found: {path}; fix the path (relative paths are also "
                            f"looked up in ${offline.ENV_VAR})")
    size = path.stat().st_size
    if size == 0:
        raise MftBenchError(f"{where(source)}: {path} is empty; give a file with rows")
    if builder == "parquet":
        with path.open("rb") as handle:
            head = handle.read(4)
            handle.seek(max(size - 4, 0))
            tail = handle.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            raise MftBenchError(f"{where(source)}: {path} is not a parquet file (no PAR1 marks)")
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
            raise MftBenchError(f"{where(source)}: {path} is not UTF-8 text (byte 0x{head[exc.start]:02x} at "
                                f"offset {exc.start}); save it as UTF-8") from None
        handle.seek(0)
        number, raw = 0, b""
        while not raw.strip():
            raw = handle.readline(LINE_BYTES)
            number += 1
            if not raw:
                raise MftBenchError(f"{where(source)}: {path} holds only blank lines; give a file with rows")
    if len(raw) == LINE_BYTES and not raw.endswith(b"\n"):
        return None
    text = _utf8(source, path, raw, number)
    document = path.suffix.lower() == ".json"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if not (document and text.lstrip()[:1] in ("[", "{")):
            problem = f"line {number} is not JSON" if not document else "is not JSON"
            raise MftBenchError(f"{where(source)}: {path} {problem} ({exc.msg})") from None
        if size > WHOLE_JSON_BYTES:
            return None
        value = _parse_whole(source, path)
        if isinstance(value, dict):
            return None
    if document and isinstance(value, list):
        if not value:
            raise MftBenchError(f"{where(source)}: {path} is an empty list; give a file with rows")
        value = value[0]
    if not isinstance(value, dict):
        raise MftBenchError(f"{where(source)}: {path}: the first row is a JSON {type(value).__name__}, not an "
                            "object with a row's fields")
    return value


def _utf8(source: SourceSpec, path: Path, raw: bytes, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MftBenchError(f"{where(source)}: {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line "
                            f"{number}); save it as UTF-8") from None


def _parse_whole(source: SourceSpec, path: Path) -> Any:
    text = _utf8(source, path, path.read_bytes(), 1)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MftBenchError(f"{where(source)}: {path} is not JSON ({exc.msg} at line {exc.lineno})") from None


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
        raise MftBenchError(f"{where(source)}: {exc}") from None
