"""Run untrusted, model-written Python in a separate, confined process and get a verdict that cannot be faked
by exiting early or by printing.

Threat model: a completion may loop, fork, allocate, recurse, flood its output, exit early, replace signal
handlers, kill its parent or its process group, touch files, open sockets or look for secrets. None of that may
hang or kill the evaluator, change anything outside the run's own temporary folder, or turn into a pass.

How one run works (:func:`run_untrusted`):

* A fresh temporary folder holds the program, a small harness and ``work/`` (the working directory, the only
  writable place inside the sandbox). It is removed afterwards.
* The harness runs under ``python -I`` with a fixed minimal environment (no inherited variables, so no secrets),
  in a new session (its own process group, so a ``killpg`` from inside cannot reach the evaluator).
* Isolation level, probed once per process (:func:`isolation_level`), best first:

  - ``"namespace"`` (root, ``unshare`` available): new mount, network, PID, IPC and UTS namespaces; every mount
    remounted read-only except ``work/``; an empty network namespace; its own PID namespace whose init is the
    harness (when it ends, every process it forked ends too); and an unused uid of its own, so RLIMIT_NPROC
    applies (it is not enforced for root) and the code cannot signal the evaluator or write root-owned files.
  - ``"userns"`` (non-root, unprivileged user namespaces allowed): the same namespaces inside a user namespace,
    without the uid change.
  - ``"rlimits"``: resource limits and a process group only (plus the own uid when running as root, and a sweep
    that kills every process of that uid afterwards). No network or filesystem confinement beyond permissions.

  Every level sets RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE and RLIMIT_CORE=0; the evaluator
  enforces the wall-time limit by SIGKILL to the whole group (signal handlers cannot stop SIGKILL).
* Output is read through pipes with a byte cap; going over the cap ends the run (``"output_limit"``), so a flood
  neither fills the evaluator's memory nor runs to the timeout.
* Verdict channel: the evaluator sends a random per-run nonce on stdin and passes a dedicated pipe. The harness
  reads the nonce, points stdin at /dev/null, executes the program, and only if the program returned normally
  writes ``"<nonce> PASS"`` to the pipe and ``os._exit(0)``s (so threads and atexit hooks cannot add anything).
  Exit status 0, ``sys.exit`` (a ``SystemExit`` is a failure: the tests did not finish), ``os._exit`` or anything
  printed never count. A completion written specifically against this harness could still dig the nonce out of
  the interpreter (it runs in the same process as the harness); that inflates only its own score and is
  confined like everything else.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("namespace", "userns", "rlimits")
ENV_ISOLATION = "MFT_BENCH_SANDBOX_ISOLATION"  # force a level (e.g. "rlimits") instead of probing

DEFAULT_MAX_PROCESSES = 32
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
DEFAULT_MAX_FILE_BYTES = 64 << 20
_SETUP_FAILED = 97  # harness exit status when it could not build the sandbox (the probe treats it as "no")
_UID_RANGE = (1_500_000_000, 1_600_000_000)  # uids nobody uses: each run gets its own

# Executed as a script by the sandboxed interpreter. Standard library only; it must not import mft_bench (the
# package may live where the sandbox uid cannot read). argv: program workdir result_fd uid namespace
# memory_mb cpu_s nproc fsize_bytes site_dirs.
_HARNESS = r'''
import os, re, resource, sys

SETUP_FAILED = @SETUP_FAILED@


def _mount_table():
    unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            yield unescape(fields[4]), fields[5].split(",")


def _libc():
    import ctypes  # imported before the uid drop (main), after which the stdlib may be unreadable
    return ctypes, ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype=None, flags=0, data=None):
    ctypes, libc = _libc()
    enc = lambda s: s.encode() if isinstance(s, str) else s
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = (
    1024, 2048, 4096, 16384, 1 << 18, 1 << 21, 1 << 24)


# Emptied inside the sandbox (a fresh tmpfs over each) so the code cannot read other users' temporary files.
HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/home", "/root", "/run")


def _first_private_ancestor(path):
    """The highest directory on the way to path that others cannot enter (e.g. /root), or None."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if os.path.isdir(current) and not os.stat(current).st_mode & 0o001:
            return current
    return None


def _hide(needed):
    """Mount an empty tmpfs over the HIDDEN folders and over private folders on the way to the interpreter's
    files (e.g. /root/.pyenv), then bind back just the needed paths: the sandbox uid can import the standard
    library and reach its work folder, and sees nothing else in there."""
    candidates = {d for d in HIDDEN if os.path.isdir(d) and not os.path.islink(d)}
    candidates |= {p for p in map(_first_private_ancestor, needed) if p is not None}
    tops = sorted(c for c in candidates if not any(c.startswith(o + "/") for o in candidates))
    for top in tops:
        inside = sorted(p for p in needed if p == top or p.startswith(top + "/"))
        kept = [p for i, p in enumerate(inside) if not any(p.startswith(q + "/") for q in inside[:i])]
        held = [(p, os.open(p, os.O_PATH)) for p in kept]  # reachable after the tmpfs covers them
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
        for path, fd in held:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
            os.close(fd)


def _read_only_root(workdir):
    """Inside the new mount namespace: keep workdir writable (own bind mount), every other mount read-only."""
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
            "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    _mount(workdir, workdir, None, MS_BIND | MS_REC)
    needed = {os.path.realpath(p) for p in sys.path if p and os.path.exists(p)} | {workdir}
    _hide(needed)
    for target, options in list(_mount_table()):
        if target == workdir or target == "/proc" or target.startswith("/proc/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= keep.get(option, 0)  # locked flags must be kept or the remount is refused
        _mount("none", target, None, flags)


def _limits(memory_mb, cpu_s, nproc, fsize):
    for name, value in (("RLIMIT_AS", memory_mb << 20), ("RLIMIT_CPU", cpu_s), ("RLIMIT_NPROC", nproc),
                        ("RLIMIT_FSIZE", fsize), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def _drop_privileges(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    _libc()[1].prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binaries to climb back


def _preload():
    # Only matters when the interpreter lives where the sandbox uid cannot read (e.g. under /root).
    for name in ("array", "atexit", "bisect", "cmath", "collections", "copy", "datetime", "decimal",
                 "fractions", "functools", "glob", "hashlib", "heapq", "itertools", "json", "math", "numbers",
                 "operator", "random", "re", "shutil", "signal", "socket", "statistics", "string", "struct",
                 "tempfile", "textwrap", "threading", "time", "typing", "unicodedata"):
        try:
            __import__(name)
        except ImportError:
            pass


def main():
    program, workdir, result_fd, uid, namespace, memory_mb, cpu_s, nproc, fsize, site_dirs = sys.argv[1:11]
    sys.path.extend(d for d in site_dirs.split(os.pathsep) if d)
    write, fd, exit_now = os.write, int(result_fd), os._exit  # held before the program can replace them
    nonce = sys.stdin.readline().strip()
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        with open(program, encoding="utf-8") as f:
            source = f.read()
        if namespace == "1" or int(uid) >= 0:
            _libc()
        if namespace == "1":
            _read_only_root(workdir)
        elif int(uid) >= 0:  # no mount namespace to fix permissions in: load what solutions commonly use
            _preload()
        _limits(int(memory_mb), int(cpu_s), int(nproc), int(fsize))
        if int(uid) >= 0:
            _drop_privileges(int(uid))
        os.chdir(workdir)
    except BaseException as exc:
        sys.stderr.write("sandbox setup failed: %r\n" % (exc,))
        sys.stderr.flush()
        exit_now(SETUP_FAILED)
    try:
        exec(compile(source, "<completion>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as exc:  # SystemExit included: the tests did not run to the end
        message = ("%s: %s" % (type(exc).__name__, exc)).replace("\n", " ")[:1000]
        try:
            write(fd, ("%s FAIL %s\n" % (nonce, message)).encode("utf-8", "replace"))
        finally:
            exit_now(1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    write(fd, ("%s PASS\n" % nonce).encode())
    exit_now(0)


main()
'''.replace("@SETUP_FAILED@", str(_SETUP_FAILED))


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


@dataclass(frozen=True)
class _Limits:
    timeout: float
    memory_mb: int
    max_processes: int
    max_output_bytes: int
    max_file_bytes: int


def run_untrusted(
    program: str,
    *,
    timeout: float,
    memory_mb: int = 1024,
    max_processes: int = DEFAULT_MAX_PROCESSES,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    isolation: str | None = None,
) -> SandboxResult:
    """Execute ``program`` (Python source) confined; passed only if it ran to its end without an exception.

    ``isolation`` forces a level (see :data:`ISOLATION_LEVELS`); by default the best level that works here.
    Never raises for anything the program does; a failure of the sandbox itself is status ``"error"``.
    """
    level = isolation or isolation_level()
    if level not in ISOLATION_LEVELS:
        raise ValueError(f"isolation must be one of {ISOLATION_LEVELS}, got {level!r}")
    limits = _Limits(timeout, memory_mb, max_processes, max_output_bytes, max_file_bytes)
    start = time.monotonic()
    try:
        return _run(program, level, limits)
    except Exception as exc:  # the evaluator must keep going: report, never raise
        logger.exception("sandbox run failed")
        return SandboxResult("error", f"sandbox error: {exc!r}", level, time.monotonic() - start)


def run_many(
    programs: Sequence[str], *, timeout: float, workers: int | None = None, **limits: Any
) -> list[SandboxResult]:
    """Run many programs with a small thread pool (each thread waits on its own subprocess); results in order."""
    if not programs:
        return []
    # Each worker mostly waits on its subprocess (start-up, namespaces), so use a few more than the cores.
    workers = workers or max(2, min(8, 2 * (os.cpu_count() or 1)))
    isolation_level()  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda p: run_untrusted(p, timeout=timeout, **limits), programs))


# Run under each candidate level: it must also show that the confinement really holds.
_PROBE = """
import os, socket
names = [name for _, name in socket.if_nameindex()]
if names != ["lo"]:
    raise SystemExit("network namespace not empty: %r" % names)
try:
    open("/.mft-sandbox-probe", "w").close()
except OSError:
    pass
else:
    os.remove("/.mft-sandbox-probe")
    raise SystemExit("root filesystem is writable")
"""


@functools.lru_cache(maxsize=None)
def isolation_level() -> str:
    """The strongest isolation that works on this machine (probed once per process)."""
    forced = os.environ.get(ENV_ISOLATION)
    if forced:
        if forced not in ISOLATION_LEVELS:
            raise ValueError(f"{ENV_ISOLATION} must be one of {ISOLATION_LEVELS}, got {forced!r}")
        return forced
    probe = _Limits(timeout=20.0, memory_mb=1024, max_processes=DEFAULT_MAX_PROCESSES,
                    max_output_bytes=1 << 16, max_file_bytes=1 << 20)
    for level in ISOLATION_LEVELS[:-1]:
        if level == "namespace" and os.geteuid() != 0:
            continue
        if shutil.which("unshare") is None:
            break
        result = _run(_PROBE, level, probe)
        if result.passed:
            logger.info("sandbox isolation: %s", level)
            return level
        logger.info("sandbox isolation %s unavailable: %s %s", level, result.detail, result.stderr[-300:])
    logger.warning("sandbox: no namespaces available; falling back to resource limits and a process group")
    return "rlimits"


def _command(level: str, harness: Path) -> list[str]:
    # -S: skip site's .pth processing (slow: editable installs, import hooks); the harness adds the
    # site-packages folders itself so installed packages stay importable.
    python = [sys.executable, "-I", "-S", str(harness)]
    if level == "rlimits":
        return python
    unshare = [shutil.which("unshare") or "unshare"]
    if level == "userns":
        unshare += ["--user", "--map-root-user"]
    return unshare + ["--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child=SIGKILL",
                      "--mount-proc", *python]


@functools.lru_cache(maxsize=None)
def _site_dirs() -> tuple[str, ...]:
    import site

    return tuple(d for d in site.getsitepackages() if os.path.isdir(d))


def _environment(workdir: Path) -> dict[str, str]:
    # Fixed, minimal: nothing inherited from the evaluator (tokens, keys, proxies).
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": str(workdir), "TMPDIR": str(workdir)}


def _run(program: str, level: str, limits: _Limits) -> SandboxResult:
    start = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="mft-sandbox-"))
    try:
        os.chmod(base, 0o755)
        workdir = base / "work"
        workdir.mkdir()
        (base / "program.py").write_text(program, encoding="utf-8")
        harness = base / "harness.py"
        harness.write_text(_HARNESS, encoding="utf-8")
        uid = -1
        nproc = limits.max_processes
        if os.geteuid() == 0 and level != "userns":
            uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0]
            os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
        else:  # RLIMIT_NPROC counts every process of our uid: leave room for the ones already running
            nproc += len(_pids_of(os.getuid()))
        args = [str(base / "program.py"), str(workdir), "", str(uid), "0" if level == "rlimits" else "1",
                str(limits.memory_mb), str(int(limits.timeout) + 2), str(nproc), str(limits.max_file_bytes),
                os.pathsep.join(_site_dirs())]
        return _execute(_command(level, harness), args, workdir, level, limits, uid, start)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _execute(command: list[str], args: list[str], workdir: Path, level: str, limits: _Limits, uid: int,
             start: float) -> SandboxResult:
    nonce = secrets.token_hex(16)
    result_r, result_w = os.pipe()
    args[2] = str(result_w)
    try:
        proc = subprocess.Popen(
            command + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(result_w,), env=_environment(workdir), cwd=workdir, start_new_session=True,
        )
    except BaseException:
        os.close(result_r)
        raise
    finally:
        os.close(result_w)
    try:
        try:
            proc.stdin.write((nonce + "\n").encode())
            proc.stdin.close()
        except OSError:  # it died before reading: the collection below reports it
            pass
        outcome, streams = _collect(proc, result_r, start + limits.timeout, limits.max_output_bytes)
    finally:
        _kill_all(proc, uid if level == "rlimits" else -1)  # a PID namespace dies with its init
        verdict_bytes = _drain_nonblocking(result_r, 1 << 16)
        os.close(result_r)
    returncode = proc.returncode
    stdout, stderr = (b.decode("utf-8", "replace") for b in streams)
    duration = time.monotonic() - start
    status, detail = _verdict(outcome, verdict_bytes.decode("utf-8", "replace"), nonce, returncode, limits)
    return SandboxResult(status, detail, level, duration, stdout, stderr, returncode)


def _collect(proc: subprocess.Popen, result_r: int, deadline: float, cap: int) -> tuple[str, list[bytes]]:
    """Read stdout/stderr (bounded) until the process ends, the deadline passes or the output cap is hit."""
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    total = 0
    with selectors.DefaultSelector() as sel:
        for fd in buffers:
            sel.register(fd, selectors.EVENT_READ)
        while True:
            if proc.poll() is not None:
                outcome = "exited"
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome = "timeout"
                break
            for key, _ in sel.select(timeout=min(remaining, 0.05)):
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
            if not sel.get_map():  # both pipes closed: just wait for the exit
                try:
                    proc.wait(timeout=max(0.0, min(deadline - time.monotonic(), 0.05)))
                except subprocess.TimeoutExpired:
                    pass
    for fd, buffer in buffers.items():  # what is left after exit (bounded, never blocking)
        buffer += _drain_nonblocking(fd, max(0, cap - len(buffer)))
    return outcome, [bytes(b) for b in buffers.values()]


def _drain_nonblocking(fd: int, limit: int) -> bytes:
    os.set_blocking(fd, False)
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = os.read(fd, min(65536, limit - len(data)))
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _kill_all(proc: subprocess.Popen, uid: int) -> None:
    """SIGKILL the run's process group (in namespace mode that ends the whole PID namespace), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    if uid >= 0:  # processes that left the group (setsid) still carry the run's own uid: sweep them
        _kill_uid(uid)


def _kill_uid(uid: int) -> None:
    if not any(_pids_of(uid)):
        return
    # kill(-1) from a process of that uid reaches exactly the processes of that uid (and never itself).
    kill = shutil.which("kill", path="/usr/bin:/bin")
    if kill is None:
        logger.warning("sandbox: no kill binary; processes of uid %d that left their group survive", uid)
        return
    subprocess.run([kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env={}, cwd="/",
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _verdict(outcome: str, channel: str, nonce: str, returncode: int | None, limits: _Limits) -> tuple[str, str]:
    lines = channel.splitlines()
    failures = [line[len(nonce) + 6:] for line in lines if line.startswith(f"{nonce} FAIL ")]
    if outcome == "timeout":
        return "timeout", f"timed out after {limits.timeout:g}s"
    if outcome == "output_limit":
        return "output_limit", f"output exceeded {limits.max_output_bytes} bytes"
    if failures:
        return "failed", failures[0]
    if f"{nonce} PASS" in lines:
        return "passed", "passed"
    if returncode == _SETUP_FAILED:
        return "error", "sandbox setup failed"
    return "failed", f"no verdict: the program ended early ({_describe_exit(returncode)})"


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
