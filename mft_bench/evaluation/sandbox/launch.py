"""The evaluator's side of one sandboxed run: start the harness, feed it the job, enforce the wall time and the
output cap, stop it, and read the verdict from the pipe only the judge holds."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mft_bench.evaluation.sandbox.harness import SETUP_FAILED, WORK
from mft_bench.evaluation.sandbox.protocol import encode_frame

logger = logging.getLogger(__name__)

UID_RANGE = (1_500_000_000, 1_600_000_000)  # uids nobody uses: each run draws its own two
STOP_GRACE = 10.0  # seconds the harness gets to end its processes after SIGTERM before it is SIGKILLed
WORKDIR_PREFIX = "mft-sandbox-"  # rlimits level only: mft-sandbox-<evaluator pid>-<random>
HARNESS = Path(__file__).with_name("harness.py")  # run as a script; protocol.py beside it


@dataclass(frozen=True)
class Job:
    """What one run executes: ``candidate`` (untrusted source) in one process; ``judge`` (trusted tests, may be
    empty) in another, calling the candidate's functions through ``candidate_function(name)``."""

    candidate: str
    judge: str = ""


@dataclass(frozen=True)
class Limits:
    timeout: float
    memory_mb: int
    max_output_bytes: int
    max_file_bytes: int


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one run. ``status``: passed, failed, timeout, output_limit or error."""

    status: str
    detail: str
    isolation: str
    duration: float
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def can_switch_uid() -> bool:
    """Root of the initial user namespace: any uid can be taken (inside a user namespace only mapped ones)."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def _own_uids(level: str) -> tuple[int, int]:
    if level == "userns" or not can_switch_uid():
        return -1, -1
    judge = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0]
    return judge, judge + 1 if judge + 1 < UID_RANGE[1] else judge - 1


def run_job(job: Job, level: str, limits: Limits) -> SandboxResult:
    """Run ``job`` at isolation ``level``; never raises for anything the job does."""
    start = time.monotonic()
    judge_uid, candidate_uid = _own_uids(level)
    workdir = _rlimits_workdir(candidate_uid) if level == "rlimits" else None
    try:
        settings = {"level": level, "memory_mb": limits.memory_mb, "cpu_seconds": int(limits.timeout) + 2,
                    "file_bytes": limits.max_file_bytes, "judge_uid": judge_uid, "candidate_uid": candidate_uid,
                    "workdir": str(workdir) if workdir else WORK}
        return _execute(job, settings, level, limits, start)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _rlimits_workdir(uid: int) -> Path:
    """A host folder for the candidate (the rlimits level has no /work of its own); folders of evaluators that
    died (SIGKILL leaves them) are removed first."""
    remove_stale_workdirs(Path(tempfile.gettempdir()))
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
    if uid >= 0:
        os.chown(workdir, uid, uid)
    return workdir


def remove_stale_workdirs(folder: Path) -> list[Path]:
    """Remove ``mft-sandbox-<pid>-*`` folders in ``folder`` whose evaluator process is gone; returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = re.fullmatch(re.escape(WORKDIR_PREFIX) + r"(\d+)-\w+", entry.name)
        if match and entry.is_dir(follow_symlinks=False) and not _alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _interpreter() -> str:
    # The base interpreter, not a virtual environment's: its site-packages must stay out of the sandbox.
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _environment(home: str) -> dict[str, str]:
    # Fixed, minimal: nothing inherited from the evaluator (tokens, keys, proxies).
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home, "TMPDIR": home}


def _execute(job: Job, settings: dict[str, Any], level: str, limits: Limits, start: float) -> SandboxResult:
    nonce = secrets.token_hex(16)
    result_r, result_w = os.pipe()
    settings["result_fd"] = result_w
    payload = (encode_frame(json.dumps(settings).encode()) + encode_frame(job.candidate.encode("utf-8"))
               + encode_frame(json.dumps({"source": job.judge, "nonce": nonce}).encode()))
    try:
        # The parent-death signal the harness sets fires when the thread that started it ends: this thread
        # waits for the harness below, so it outlives it.
        proc = subprocess.Popen(
            [_interpreter(), "-I", "-S", "-B", str(HARNESS), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(result_w,),
            env=_environment(settings["workdir"]), cwd="/", start_new_session=True,
        )
    except BaseException:
        os.close(result_r)
        raise
    finally:
        os.close(result_w)
    try:
        outcome, streams = _collect(proc, payload, start + limits.timeout, limits.max_output_bytes)
    finally:
        _stop(proc)
        verdict_bytes = _drain_nonblocking(result_r, 1 << 16)
        os.close(result_r)
    stdout, stderr = (b.decode("utf-8", "replace") for b in streams)
    status, detail = _verdict(outcome, verdict_bytes.decode("utf-8", "replace"), nonce, proc.returncode, stderr,
                              limits)
    return SandboxResult(status, detail, level, time.monotonic() - start, stdout, stderr, proc.returncode)


def _collect(proc: subprocess.Popen, payload: bytes, deadline: float, cap: int) -> tuple[str, list[bytes]]:
    """Write the job, read stdout/stderr (bounded) until the harness ends, the deadline passes or the cap is hit."""
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    pending = memoryview(payload)
    total = 0
    stdin = proc.stdin.fileno()
    os.set_blocking(stdin, False)
    with selectors.DefaultSelector() as sel:
        for fd in buffers:
            sel.register(fd, selectors.EVENT_READ)
        sel.register(stdin, selectors.EVENT_WRITE)
        while True:
            if proc.poll() is not None:
                outcome = "exited"
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome = "timeout"
                break
            for key, _ in sel.select(timeout=min(remaining, 0.05)):
                if key.fd == stdin:
                    try:
                        pending = pending[os.write(stdin, pending[:1 << 16]):]
                    except BlockingIOError:
                        continue
                    except OSError:  # it died before reading it all: the exit status tells
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                total += len(chunk)
                buffer = buffers[key.fd]
                buffer += chunk[: max(0, cap - len(buffer))]
            if total > cap:
                outcome = "output_limit"
                break
            if not sel.get_map():  # job written, both pipes closed: just wait for the exit
                try:
                    proc.wait(timeout=max(0.0, min(deadline - time.monotonic(), 0.05)))
                except subprocess.TimeoutExpired:
                    pass
    for fd, buffer in buffers.items():  # what is left after exit (bounded, never blocking)
        buffer += _drain_nonblocking(fd, max(0, cap - len(buffer)))
    return outcome, [bytes(b) for b in buffers.values()]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM: the harness kills its processes (at the namespace levels, PID 1 of the run, which takes every
    process of the namespace with it) and exits once they are gone. SIGKILL if it does not within the grace."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            logger.warning("sandbox: the harness ignored SIGTERM for %gs; killing it", STOP_GRACE)
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()


def _drain_nonblocking(fd: int, limit: int) -> bytes:
    os.set_blocking(fd, False)
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = os.read(fd, min(65536, limit - len(data)))
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _verdict(outcome: str, channel: str, nonce: str, returncode: int | None, stderr: str,
             limits: Limits) -> tuple[str, str]:
    if outcome == "timeout":
        return "timeout", f"timed out after {limits.timeout:g}s"
    if outcome == "output_limit":
        return "output_limit", f"output exceeded {limits.max_output_bytes} bytes"
    reasons = [line for line in stderr.splitlines() if line.startswith("sandbox setup failed")]
    for line in channel.splitlines():
        word, _, text = line.removeprefix(f"{nonce} ").partition(" ")
        if not line.startswith(f"{nonce} "):
            continue
        if word == "PASS":
            return "passed", "passed"
        if word == "FAIL":
            return "failed", text
        if word == "ERROR":
            return "error", f"sandbox error: {text}" + (f"; {reasons[-1]}" if reasons else "")
    if returncode == SETUP_FAILED:
        return "error", reasons[-1] if reasons else "sandbox setup failed"
    return "failed", f"no verdict: the tests did not finish ({_describe_exit(returncode)})"


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0 or returncode > 128:
        number = -returncode if returncode < 0 else returncode - 128
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exit status {returncode}"
