"""A run folder that cannot rot: what a finished stage recorded about its files, the check of that record on every
rerun, and the lock that keeps two runs out of one folder.

A finished stage's manifest lists its files (size of each, sha256 of the small ones: records, metrics, masks,
configs) and, for an evaluation, its item count. A rerun checks every finished stage against its manifest; a stage
whose files are missing, truncated or changed, or whose manifest cannot be read, is reopened: its manifest (and an
evaluation's metrics) moved aside, and the stage resumes in place from what is still valid (Trainer checkpoints,
exports, records), saying so in one line.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HASHED_UP_TO = 16 * 2**20  # bytes: larger files (model weights) are checked by size only
LOCK_FILE = ".lock"
METRICS = "metrics.json"


def _skipped(relative: Path) -> bool:
    """Files a manifest does not vouch for: itself, temporaries, and the Trainer's resume checkpoints (pruned as
    training goes, checked by ``train.trainer.last_checkpoint`` instead)."""
    parts = relative.parts
    return (relative.name == MANIFEST or any(p.startswith(".") for p in parts)
            or (len(parts) >= 2 and parts[0] == "work" and parts[1].startswith("checkpoint-")))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_inventory(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256" (None above HASHED_UP_TO)}}`` of the files a stage's manifest vouches
    for."""
    inventory = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not _skipped(relative):
            size = path.stat().st_size
            inventory[str(relative)] = {"size": size, "sha256": _sha256(path) if size <= HASHED_UP_TO else None}
    return inventory


def stage_problem(folder: Path) -> str | None:
    """Why a stage folder with a manifest does not hold what the manifest says (None when it does)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest.get("files")
    except (OSError, ValueError, AttributeError) as exc:
        return f"its manifest cannot be read ({type(exc).__name__})"
    if files is None:
        return None  # written before manifests listed files: nothing to check against
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file():
            return f"{relative} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{relative} has {path.stat().st_size} bytes, not the {expected['size']} it finished with"
        if expected.get("sha256") and _sha256(path) != expected["sha256"]:
            return f"{relative} changed since the stage finished"
    return None


def reopen_stage(folder: Path, problem: str, name: str) -> None:
    """Make a finished stage unfinished so that it resumes: its manifest (and an evaluation's metrics) moved aside,
    never deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for file in (MANIFEST, METRICS):
        if (folder / file).exists():
            os.replace(folder / file, folder / f".{file}.invalid-{stamp}")
    logger.warning("stage %s: %s; redoing it from what is still valid", name, problem)


class RunLock:
    """An exclusive lock on a run folder for the life of a run (``flock``: released when the process ends, however
    it ends). A second run of the same folder stops at once with one line naming the holder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise MftBenchError(f"run folder {self.path.parent} is in use by {holder}: wait for that run to "
                                    "end, or choose another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                     f"({' '.join(sys.argv[:4])})\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
