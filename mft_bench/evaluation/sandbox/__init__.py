"""Run untrusted, model-written Python so that its verdict cannot be faked and nothing of it outlives the run.

Threat model: a completion may loop, fork, allocate, flood its output, exit early, replace signal handlers, kill
what it can, ``setsid`` away, read files, open sockets, look for the answer key, or try to pass without solving:
read a pass token from the interpreter (``sys._getframe``), skip asserts with ``sys.settrace``, or return an
object whose ``__eq__`` always says True. None of that may hang or kill the evaluator, outlive the run, change
or read anything of the host, or turn into a pass.

A run (:func:`run_judged`) executes a :class:`Job`: the candidate's source in one process, the tests in another
(the *judge*). The judge calls the candidate's functions over pipes; arguments and results cross as plain
built-in data (a restricted unpickler refuses any class), so every comparison runs on the judge's own objects,
in a process the candidate cannot read, trace or signal, and only the judge holds the pipe the verdict comes
back on (with a per-run nonce). The candidate is forked before the tests are read, so they are not in its memory.
:func:`run_untrusted` is the one-program case (no tests: passed means it ran to its end without an exception).

Isolation levels (``harness.py`` has the process tree), best first:

* ``"namespace"`` (root): new PID, mount, network, IPC and UTS namespaces; a new root holding only the system
  libraries and the standard library (read-only, site-packages emptied: no answer keys, no checkout, no data,
  no host /tmp) and an empty size-limited ``/work``; the candidate and the judge each under an unused uid of
  their own. PID 1 of the namespace dies with the harness, which dies with the evaluator (parent-death
  signals), and its death ends every process of the namespace.
* ``"userns"`` (unprivileged user namespaces): the same inside a user namespace; the candidate in a nested one
  (no power over its mounts) instead of its own uid.
* ``"rlimits"``: no namespaces: resource limits and own uids (as root) only; the host's files and network stay
  reachable. Used only when allowed (:func:`require_isolation` with ``"rlimits"``).

Every level: the candidate is one process (a seccomp filter refuses fork and clone), so RLIMIT_AS bounds the
whole tree's memory and killing it leaves nothing; RLIMIT_CPU and RLIMIT_FSIZE; no inherited environment;
stdout/stderr capped (``"output_limit"``); the wall-time limit is enforced from outside.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.evaluation.sandbox.launch import Job, Limits, SandboxResult, can_switch_uid, run_job

__all__ = ["ENV_ISOLATION", "ISOLATION_LEVELS", "SANDBOX_SETTINGS", "Job", "SandboxResult", "isolation_level",
           "require_isolation", "run_judged", "run_many", "run_untrusted"]

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("namespace", "userns", "rlimits")
SANDBOX_SETTINGS = ("namespace", "rlimits")  # a recipe's evaluation.sandbox: the weakest level it accepts
ENV_ISOLATION = "MFT_BENCH_SANDBOX_ISOLATION"  # force a level (e.g. "rlimits") instead of probing

DEFAULT_MEMORY_MB = 1024
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
DEFAULT_MAX_FILE_BYTES = 64 << 20


def run_judged(
    candidate: str,
    judge: str,
    *,
    timeout: float,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    isolation: str | None = None,
) -> SandboxResult:
    """Execute ``candidate`` confined and run the tests ``judge`` against it; passed only if the tests ran to
    their end. ``judge`` reaches the candidate's functions as ``candidate_function("name")``.

    ``isolation`` forces a level (see :data:`ISOLATION_LEVELS`); by default the best level that works here.
    Never raises for anything the code does; a failure of the sandbox itself is status ``"error"``.
    """
    level = isolation or isolation_level()
    if level not in ISOLATION_LEVELS:
        raise ValueError(f"isolation must be one of {ISOLATION_LEVELS}, got {level!r}")
    limits = Limits(timeout, memory_mb, max_output_bytes, max_file_bytes)
    try:
        return run_job(Job(candidate, judge), level, limits)
    except Exception as exc:  # the evaluator must keep going: report, never raise
        logger.exception("sandbox run failed")
        return SandboxResult("error", f"sandbox error: {exc!r}", level, 0.0)


def run_untrusted(program: str, *, timeout: float, **limits: Any) -> SandboxResult:
    """Execute ``program`` confined; passed only if it ran to its end without an exception. (That outcome is
    the program's to decide: benchmarks use :func:`run_judged`.)"""
    return run_judged(program, "", timeout=timeout, **limits)


def run_many(jobs: Sequence[Job | str], *, timeout: float, workers: int | None = None, **limits: Any
             ) -> list[SandboxResult]:
    """Run many jobs (a string: one untrusted program) with a small thread pool; results in order."""
    if not jobs:
        return []
    # Each worker mostly waits on its subprocess (start-up, namespaces), so use a few more than the cores.
    workers = workers or max(2, min(8, 2 * (os.cpu_count() or 1)))
    if limits.get("isolation") is None:
        isolation_level()  # probe once before the threads start

    def one(job: Job | str) -> SandboxResult:
        job = Job(job) if isinstance(job, str) else job
        return run_judged(job.candidate, job.judge, timeout=timeout, **limits)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, jobs))


def isolation_level() -> str:
    """The strongest isolation that works on this machine (probed once per process)."""
    return _probe()[0]


def require_isolation(setting: str) -> str:
    """The level code benchmarks run at, given a recipe's ``evaluation.sandbox`` (the weakest level it accepts).

    ``"namespace"`` (the default) refuses to fall back: :class:`MftBenchError` naming why namespaces cannot be
    set up here. ``"rlimits"`` accepts whatever works, resource limits only at worst.
    """
    if setting not in SANDBOX_SETTINGS:
        raise MftBenchError(f"evaluation.sandbox must be one of {', '.join(SANDBOX_SETTINGS)}, got {setting!r}")
    level, reason = _probe()
    if setting == "namespace" and level == "rlimits":
        raise MftBenchError(
            f"the code sandbox cannot isolate untrusted code on this machine ({reason}); run as root or allow "
            "unprivileged user namespaces, or accept resource limits only with `evaluation.sandbox: rlimits` "
            "in the recipe"
        )
    return level


# Run at each namespace level before it is used: it must show that the confinement really holds.
_PROBE = """
import os, socket
names = [name for _, name in socket.if_nameindex()]
assert names == ["lo"], "network namespace not empty: %r" % names
for path in {hidden!r}:
    assert not os.path.exists(path), path + " is visible inside"
try:
    open("/probe", "w").close()
except OSError:
    pass
else:
    raise AssertionError("the root folder is writable")
try:
    pid = os.fork()
except OSError:
    pass
else:
    if pid == 0:
        os._exit(0)
    raise AssertionError("a second process could be started")
"""


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[str, str]:
    """(level, why the namespace levels are unavailable); cached for the process."""
    forced = os.environ.get(ENV_ISOLATION)
    if forced:
        if forced not in ISOLATION_LEVELS:
            raise MftBenchError(f"{ENV_ISOLATION} must be one of {', '.join(ISOLATION_LEVELS)}, got {forced!r}")
        return forced, f"{ENV_ISOLATION}={forced} forces it"
    import site

    hidden = [os.path.dirname(os.path.abspath(__file__)), *site.getsitepackages()]
    probe = Job(_PROBE.format(hidden=hidden))
    limits = Limits(timeout=30.0, memory_mb=DEFAULT_MEMORY_MB, max_output_bytes=1 << 16, max_file_bytes=1 << 20)
    reasons = []
    for level in ISOLATION_LEVELS[:-1]:
        if level == "namespace" and not can_switch_uid():
            reasons.append("namespace: needs root on the host")
            continue
        try:
            result = run_job(probe, level, limits)
        except Exception as exc:  # e.g. no interpreter to start: this level does not work here
            result = SandboxResult("error", f"cannot start the harness: {exc!r}", level, 0.0)
        if result.passed:
            logger.info("sandbox isolation: %s", level)
            return level, ""
        reasons.append(f"{level}: {' '.join(result.detail.split())}")
        logger.info("sandbox isolation %s unavailable: %s %s", level, result.detail, result.stderr[-300:])
    reason = "; ".join(reasons)
    logger.warning("sandbox: no namespace isolation here (%s)", reason)
    return "rlimits", reason
