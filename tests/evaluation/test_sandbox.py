"""The sandbox against hostile completions: each fails or times out in its limit, harms nothing, and the
evaluator (this pytest process) survives with a result for every program."""

from __future__ import annotations

import os
import socket
import textwrap
import time

import pytest

from mft_bench.evaluation import sandbox

TIMEOUT = 2.0
SLACK = 4.0  # busy shared machine: start-up and teardown on top of the limit


def run(program: str, **kw) -> sandbox.SandboxResult:
    kw.setdefault("timeout", TIMEOUT)
    start = time.monotonic()
    result = sandbox.run_untrusted(textwrap.dedent(program), **kw)
    assert time.monotonic() - start < kw["timeout"] + SLACK, result
    return result


def _works(level: str) -> bool:
    return sandbox.run_untrusted("pass", timeout=10, isolation=level).passed


@pytest.fixture(scope="module")
def ns_levels() -> list[str]:
    return [level for level in ("namespace", "userns") if _works(level)]


def test_isolation_level_is_probed_and_recorded():
    level = sandbox.isolation_level()
    assert level in sandbox.ISOLATION_LEVELS
    result = run("print('hi')")
    assert result.passed and result.isolation == level and result.stdout == "hi\n"
    assert run("pass", isolation="rlimits").isolation == "rlimits"


def test_failure_detail_and_working_directory_is_private_and_writable():
    result = run("open('f.txt', 'w').write('x')\nassert open('f.txt').read() == 'x'\nassert 1 == 2, 'boom'")
    assert result.status == "failed" and "AssertionError: boom" in result.detail


@pytest.mark.parametrize("level", ["best", "rlimits"])
def test_infinite_loop_times_out(level):
    result = run("while True:\n    pass", isolation=None if level == "best" else level)
    assert result.status == "timeout"


def test_replacing_signal_handlers_does_not_prevent_the_kill():
    result = run("""
        import signal
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGXCPU):
            signal.signal(s, signal.SIG_IGN)
        while True:
            pass
    """)
    assert result.status == "timeout"


def test_fork_bomb_is_contained():
    result = run("""
        import os
        while True:
            os.fork()
    """, timeout=3.0)
    assert not result.passed
    assert run("pass").passed  # and the machine still runs the next one


def test_memory_bomb_fails():
    result = run("x = bytearray(8 << 30)", memory_mb=512)
    assert result.status == "failed" and "MemoryError" in result.detail
    result = run("chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))", memory_mb=512)
    assert result.status == "failed"


def test_deep_recursion_fails():
    result = run("""
        import sys
        sys.setrecursionlimit(10**8)
        def f(n):
            return f(n + 1) + 1
        f(0)
    """)
    assert result.status in {"failed", "timeout"}


def test_killing_parent_and_process_group_leaves_the_evaluator_alive():
    program = """
        import os, signal
        for target in (os.getppid(), 1):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
        os.killpg(os.getpgrp(), signal.SIGKILL)
        assert False, 'tests failed'
    """
    result = run(program)  # it reaches neither the judge nor the evaluator: no verdict, a failure
    assert result.status == "failed"
    if sandbox.isolation_level() != "rlimits" or os.geteuid() == 0:  # kill(-1) only reaches the sandbox
        assert not run("import os, signal\nos.kill(-1, signal.SIGKILL)\nimport time\ntime.sleep(5)").passed
    assert os.getpid() and run("pass").passed


def test_files_outside_the_work_folder_are_untouched(tmp_path, ns_levels):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o666)
    tmp_path.chmod(0o777)
    marker = f"/mft-sandbox-escape-{os.getpid()}"
    program = f"""
        import os, shutil
        for action in (lambda: open({str(victim)!r}, 'w').write('owned'),
                       lambda: os.remove({str(victim)!r}),
                       lambda: open({str(tmp_path / 'created')!r}, 'w').write('x'),
                       lambda: shutil.rmtree({str(tmp_path)!r}),
                       lambda: open({marker!r}, 'w').write('x')):
            try:
                action()
            except OSError:
                pass
        raise AssertionError('tests failed')
    """
    for level in [None, *ns_levels]:
        result = run(program, isolation=level)
        assert not result.passed
        assert victim.read_text() == "original"
        assert not (tmp_path / "created").exists()
        assert not os.path.exists(marker)


def test_network_is_unreachable(ns_levels):
    if not ns_levels:
        pytest.skip("no network namespace on this machine (rlimits fallback cannot block sockets)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        for level in ns_levels:
            program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'x')"
            result = run(program, isolation=level)
            assert result.status == "failed" and ("OSError" in result.detail or "unreachable" in result.detail)
            with pytest.raises(socket.timeout):
                server.accept()
    finally:
        server.close()


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("MFT_TEST_SECRET_TOKEN", "hunter2-secret")
    result = run("""
        import glob, os
        assert 'hunter2-secret' not in repr(dict(os.environ)), 'secret in os.environ'
        for path in glob.glob('/proc/[0-9]*/environ'):
            try:
                data = open(path, 'rb').read()
            except OSError:
                continue
            assert b'hunter2-secret' not in data, path
    """)
    assert result.passed, result.detail  # the program itself asserts that it found no secret


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_is_capped_and_stopped(stream):
    cap = 100_000
    result = run(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 65536)", max_output_bytes=cap)
    assert result.status == "output_limit"
    assert len(result.stdout) <= cap and len(result.stderr) <= cap


@pytest.mark.parametrize("program", [
    "print('passed')\nimport os\nos._exit(0)",
    "import sys\nsys.exit(0)",
    "raise SystemExit(0)",
    "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'PASS\\n')\n"
    "    except OSError:\n        pass\nassert False, 'tests failed'",
    "import atexit, os\natexit.register(lambda: print('passed'))\nassert False",
])
def test_forged_passes_are_not_passes(program):
    result = run(program)
    assert result.status == "failed", result


def test_run_many_keeps_order_and_gives_every_program_a_result():
    programs = ["pass", "while True: pass", "import os\nos._exit(0)", "raise ValueError('v')", "pass"]
    results = sandbox.run_many(programs, timeout=1.5, workers=3)
    assert [r.status for r in results] == ["passed", "timeout", "failed", "failed", "passed"]
    assert "ValueError: v" in results[3].detail
    assert sandbox.run_many([], timeout=1.0) == []


JUDGED_CANDIDATE = """
import collections


def counts(text):
    return collections.Counter(text.split())


def point():
    return collections.namedtuple("Point", "x y")(1, 2.5)


def numbers(n):
    return (i for i in range(n))


def fail(kind):
    raise {"value": ValueError, "own": type("Oops", (Exception,), {})}[kind]("bad input")


def leave():
    raise SystemExit(0)
"""

JUDGED_TESTS = """
counts, point, numbers, fail, leave = map(candidate_function, ("counts", "point", "numbers", "fail", "leave"))
got = counts("a b a")
assert got == {"a": 2, "b": 1} and type(got) is dict  # a Counter arrives as the dict it holds
assert point() == (1, 2.5) and type(point()) is tuple
generator = numbers(3)
assert generator != [0, 1, 2] and generator == generator and "generator" in repr(generator)
try:
    fail("value")
except ValueError as exc:  # built-in exceptions keep their type, so tests that catch them still can
    assert str(exc) == "bad input"
else:
    raise AssertionError("no ValueError")
try:
    leave()
except Exception as exc:
    assert "SystemExit" in str(exc)
else:
    raise AssertionError("no SystemExit")
"""


def test_judged_run_passes_plain_data_and_exceptions_between_the_processes():
    assert sandbox.run_judged(JUDGED_CANDIDATE, JUDGED_TESTS, timeout=10).passed
    own = sandbox.run_judged(JUDGED_CANDIDATE, "candidate_function('fail')('own')", timeout=10)
    assert own.status == "failed" and own.detail == "Oops: bad input"
    missing = sandbox.run_judged(JUDGED_CANDIDATE, "candidate_function('nosuch')()", timeout=10)
    assert missing.detail == "NameError: name 'nosuch' is not defined"
    broken = sandbox.run_judged("def f(:\n", "candidate_function('f')()", timeout=10)
    assert broken.status == "failed" and broken.detail.startswith("SyntaxError")
    gone = sandbox.run_judged("import os\ndef f():\n    os._exit(0)\n", "candidate_function('f')()", timeout=10)
    assert gone.status == "failed" and "ended without answering" in gone.detail
