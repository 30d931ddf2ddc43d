"""All-or-nothing file writes: a temporary file in the same folder, fsync, then ``os.replace``.

A reader (or a rerun after SIGKILL) sees either the old file or the complete new one, never a torn one.

Also the project's one JSON rendering (:func:`dumps_json`, :func:`dumps_json_line`): sorted keys, UTF-8 kept
readable, strict JSON (NaN/inf become null), so the same value always gives the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes 0600 files: give the mode any new file would get
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """JSON-safe copy: numpy/torch scalars -> Python numbers, tuples -> lists, keys -> str, NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps_json(value: Any) -> str:
    """A JSON document: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(json_safe(value), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def dumps_json_line(value: Any) -> str:
    """One JSON-lines row (no newline): sorted keys, compact."""
    return json.dumps(json_safe(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def write_json_atomic(path: str | os.PathLike, value: Any) -> Path:
    return write_text_atomic(path, dumps_json(value))


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    return write_text_atomic(path, "".join(dumps_json_line(row) + "\n" for row in rows))


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform has directory descriptors)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """``MftBenchError`` unless ``folder`` is a folder this process can write into, or could create: said before
    anything is written, rather than as an OSError halfway through."""
    from mft_bench.errors import MftBenchError

    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f": {existing} "
        raise MftBenchError(f"{what} {folder}{where or ' '}is a file, not a folder; choose another")
    effective = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    if not os.access(existing, os.W_OK | os.X_OK, **effective):
        raise MftBenchError(f"{what} {folder} is not writable ({existing}: permission denied or a read-only disk); "
                            "choose another")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask
