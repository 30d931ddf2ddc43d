"""The sandbox's far side: everything that runs after the evaluator's ``Popen``.

Started by :mod:`mft_bench.evaluation.sandbox` as ``python -I -S -B harness.py EVALUATOR_PID``; stdin carries
three frames (8-byte length, then the bytes): the settings (JSON), the candidate's source, and the judge (JSON:
the tests and the verdict nonce). Standard library only, since the sandboxed processes must not see the
installed packages (mft_bench included).

Processes at the namespace levels::

    supervisor       host PID namespace; killed when the evaluator dies (parent-death signal, checked against
     |               the race at start); on SIGTERM (the evaluator's timeout) it kills init and waits for it
     └ init          PID 1 of new PID, network, IPC and UTS namespaces and of its own mount namespace, where it
        |            builds a new root (system libraries and the standard library read-only, site-packages
        |            hidden, an empty size-limited /work, nothing else of the host) and pivots into it; killed
        |            when the supervisor dies; when it exits, the kernel kills every process of the namespace
        ├ candidate  the completion, forked before the tests were read (they are nowhere in its memory): its own
        |            uid (or a nested user namespace), one process (seccomp refuses fork/clone), memory limit
        └ judge      the tests: its own uid, not dumpable, the only holder of the verdict pipe; it calls the
                     candidate's functions over pipes and gets plain data back, never an object of the
                     candidate's, so the comparisons and the verdict happen where the completion cannot reach

At the rlimits level the supervisor plays init, without namespaces or a new root.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import select
import signal
import sys
import types

TYPE_CHECKING = False  # typing is not imported at run time: every sandboxed run pays for each import
if TYPE_CHECKING:
    from typing import Any

if __package__:
    from mft_bench.evaluation.sandbox import protocol
else:  # run as a script (python -I -S): the package is not importable, its protocol.py lies next to this file
    protocol = types.ModuleType("protocol")
    _path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protocol.py")
    with open(_path, encoding="utf-8") as _file:
        exec(compile(_file.read(), _path, "exec"), protocol.__dict__)

SETUP_FAILED = 97  # exit status when the sandbox itself could not be built
WORK = "/work"  # the candidate's working folder inside the new root

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = (
    1024, 2048, 4096, 16384, 1 << 18, 1 << 21, 1 << 24)
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217}
# machine -> (audit arch, system calls that create a process); clone3 (435 everywhere) is answered ENOSYS so
# the C library falls back to clone, which is refused.
NEW_PROCESS_CALLS = {
    "x86_64": (0xC000003E, (56, 57, 58)),
    "aarch64": (0xC00000B7, (220,)),
    "riscv64": (0xC00000F3, (220,)),
    "ppc64le": (0xC0000015, (2, 120, 189)),
    "s390x": (0x80000016, (2, 120, 190)),
}
SYS_CLONE3 = 435
X32_SYSCALL_BIT = 0x40000000

SYSTEM_LIBRARIES = ("/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
ROOT_MOUNTPOINTS = ("/tmp", "/mnt", "/var/tmp")  # any existing folder: the new root is mounted over it
PACKAGE_FOLDERS = ("site-packages", "dist-packages")  # in a bound folder or in its python3* subfolders
# Imported before the uid drop at the rlimits level, where the interpreter may live where the sandbox uid
# cannot read (e.g. under /root).
PRELOAD = ("abc", "array", "atexit", "bisect", "cmath", "collections", "contextlib", "copy", "dataclasses",
           "datetime", "decimal", "enum", "fractions", "functools", "glob", "hashlib", "heapq", "itertools", "json",
           "math", "numbers", "operator", "random", "re", "shutil", "signal", "socket", "statistics", "string",
           "struct", "tempfile", "textwrap", "threading", "time", "typing", "unicodedata")


# -- system calls ---------------------------------------------------------------------------------------------
def _libc_call(name: str, *args: Any) -> int:
    result = getattr(ctypes.CDLL(None, use_errno=True), name)(*args)
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _prctl(option: int, value: int = 0) -> None:
    _libc_call("prctl", option, *(ctypes.c_ulong(v) for v in (value, 0, 0, 0)))


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _libc_call("mount", _bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data))


def _unshare(flags: int) -> None:
    _libc_call("unshare", flags)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def forbid_new_processes() -> None:
    """A seccomp filter that refuses fork, vfork and clone (threads too): the process stays alone, so its memory
    limit is the whole tree's and killing it leaves nothing behind. Needs no_new_privs first."""
    machine = os.uname().machine
    if machine not in NEW_PROCESS_CALLS:
        raise OSError(errno.ENOSYS, f"no seccomp table for {machine}")
    arch, calls = NEW_PROCESS_CALLS[machine]
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, refuse = 0x7FFF0000, 0x00050000  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno
    # (code, jump-if-true label, jump-if-false label, k); labels resolve to the return instructions below
    program: list[tuple[int, Any, Any, int]] = [(load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, refuse | errno.EPERM),
                                                (load, 0, 0, 0)]
    if machine == "x86_64":  # the x32 ABI: none of it
        program.append((jge, "eperm", 0, X32_SYSCALL_BIT))
    program.append((jeq, "enosys", 0, SYS_CLONE3))
    program += [(jeq, "eagain", 0, nr) for nr in calls]
    program.append((ret, 0, 0, allow))
    returns = {"eagain": errno.EAGAIN, "enosys": errno.ENOSYS, "eperm": errno.EPERM}
    labels = {name: len(program) + i for i, name in enumerate(returns)}
    program += [(ret, 0, 0, refuse | value) for value in returns.values()]
    filters = (_SockFilter * len(program))(*[
        _SockFilter(code, labels[jt] - i - 1 if isinstance(jt, str) else jt, jf, k)
        for i, (code, jt, jf, k) in enumerate(program)
    ])
    _libc_call("prctl", PR_SET_SECCOMP, ctypes.c_ulong(2), ctypes.byref(_SockFprog(len(program), filters)),
               ctypes.c_ulong(0), ctypes.c_ulong(0))


def _limits(settings: dict[str, Any], *, one_process: bool) -> None:
    values = [("RLIMIT_AS", settings["memory_mb"] << 20), ("RLIMIT_CPU", settings["cpu_seconds"]),
              ("RLIMIT_FSIZE", settings["file_bytes"]), ("RLIMIT_CORE", 0)]
    if one_process:
        values.append(("RLIMIT_NPROC", 1))
    for name, value in values:
        resource.setrlimit(getattr(resource, name), (value, value))


def _become(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _close_fds_except(keep: set[int]) -> None:
    previous = -1
    for fd in sorted(keep) + [1 << 20]:
        os.closerange(previous + 1, fd)
        previous = fd


def _stdin_from_devnull() -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    if null != 0:
        os.dup2(null, 0)
        os.close(null)


def _preload() -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass


def _setup_failed(what: str, exc: BaseException) -> int:
    os.write(2, f"sandbox setup failed ({what}): {protocol.describe(exc)}\n".encode("utf-8", "replace"))
    return SETUP_FAILED


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent dies; exit now if it died before the signal was armed."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(SETUP_FAILED)


# -- the two sandboxed processes ---------------------------------------------------------------------------
def _candidate(settings: dict[str, Any], source: str, requests: int, replies: int, parent: int) -> None:
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _close_fds_except({1, 2, requests, replies})
        _stdin_from_devnull()
        os.chdir(settings["workdir"])
        uid, level = settings["candidate_uid"], settings["level"]
        _limits(settings, one_process=uid >= 0)
        if uid >= 0:
            _become(uid)
        elif level == "userns":  # no capability over the mounts built for it
            _unshare(CLONE_NEWUSER)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        forbid_new_processes()
        _die_with_parent(parent)  # after the uid change, which clears it
        protocol.write_frame(replies, b"ready")
    except BaseException as exc:
        os._exit(_setup_failed("candidate", exc))
    protocol.serve_candidate(source, requests, replies)
    os._exit(0)


def _judge(settings: dict[str, Any], judge: dict[str, Any], requests: int, replies: int, parent: int) -> None:
    result_fd = settings["result_fd"]
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _close_fds_except({1, 2, requests, replies, result_fd})
        _stdin_from_devnull()
        os.chdir("/")
        uid = settings["judge_uid"]
        _limits(settings, one_process=uid >= 0)
        if uid >= 0:
            _become(uid)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _prctl(PR_SET_DUMPABLE, 0)  # the candidate, even under the same uid, cannot read or trace it
        _die_with_parent(parent)
    except BaseException as exc:
        os._exit(_setup_failed("judge", exc))
    protocol.run_judge(judge["source"], judge["nonce"], protocol.Candidate(requests, replies), result_fd)
    os._exit(0)


def _start_pair(settings: dict[str, Any], source: str, children: list[int]) -> int:
    """Fork the candidate, only then read the judge's frame, fork the judge; returns the judge's pid."""
    me = os.getpid()
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    candidate = os.fork()
    if candidate == 0:
        _candidate(settings, source, requests_r, replies_w, me)
    children.append(candidate)
    os.close(requests_r)
    os.close(replies_w)
    judge_settings = json.loads(protocol.read_frame(0))
    os.close(0)
    judge = os.fork()
    if judge == 0:
        _judge(settings, judge_settings, requests_w, replies_r, me)
    children.append(judge)
    for fd in (requests_w, replies_r, settings["result_fd"]):
        os.close(fd)
    return judge


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


# -- the new root -------------------------------------------------------------------------------------------
def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _mounts() -> list[tuple[int, int, str, list[str]]]:
    """(id, parent id, mount point, options) of every mount of this mount namespace."""
    with open("/proc/self/mountinfo") as f:
        return [(int(p[0]), int(p[1]), _unescape(p[4]), p[5].split(",")) for p in (line.split() for line in f)]


def _remount_read_only_under(root: str, writable: str) -> None:
    """Every mount of the tree on ``root`` read-only, except ``writable``; locked flags are kept (or the
    kernel refuses the remount inside a user namespace)."""
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
            "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
    table = _mounts()
    on_root = {mount_id: parent for mount_id, parent, target, _ in table if target == root}
    tree = {mount_id for mount_id in on_root if mount_id not in on_root.values()}  # the top one: ours
    grown = True
    while grown:
        before = len(tree)
        tree |= {mount_id for mount_id, parent, _, _ in table if parent in tree}
        grown = len(tree) > before
    for mount_id, _, target, options in table:
        if mount_id in tree and target != writable:
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            for option in options:
                flags |= keep.get(option, 0)
            _mount(None, target, None, flags)


def _top_folders(paths: list[str]) -> list[str]:
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path == k or path.startswith(k + "/") for k in kept):
            kept.append(path)
    return kept


def _package_folders(folder: str) -> list[str]:
    """site-packages / dist-packages in ``folder`` and in its python3* subfolders."""
    try:
        versions = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("python3")]
    except OSError:
        return []
    return [os.path.join(base, name) for base in [folder, *versions] for name in PACKAGE_FOLDERS
            if os.path.isdir(os.path.join(base, name))]


def build_root(settings: dict[str, Any]) -> None:
    """In a fresh mount namespace: a new root with just the system libraries and the standard library
    (read-only, package folders emptied), /dev's harmless devices and an empty /work; then pivot into it and
    detach the host's tree, so nothing else of the host is reachable, not even by a chroot escape."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    links = [p for p in SYSTEM_LIBRARIES if os.path.islink(p)]
    folders = _top_folders([p for p in SYSTEM_LIBRARIES if os.path.isdir(p) and not os.path.islink(p)]
                           + [os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)])
    if any(f == WORK or f.startswith(WORK + "/") or f == "/dev" or f.startswith("/dev/") for f in folders):
        raise OSError(errno.EEXIST, f"the standard library lies under {WORK} or /dev, which the sandbox builds itself")
    hidden = sorted({os.path.realpath(p) for folder in folders for p in _package_folders(folder)})
    # held open: a source may lie under the folder the new root covers
    held = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC)) for path in folders]
    devices = [(name, os.open("/dev/" + name, os.O_PATH | os.O_CLOEXEC)) for name in DEVICES
               if os.path.exists("/dev/" + name)]
    root = next(os.path.realpath(p) for p in ROOT_MOUNTPOINTS if os.path.isdir(p))
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m,nr_inodes=4096")
    for path in links:
        os.symlink(os.readlink(path), root + path)
    for path, fd in held:
        os.makedirs(root + path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", root + path, None, MS_BIND | MS_REC)
        os.close(fd)
    for path in hidden:
        _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "mode=555,size=4k")
    os.mkdir(root + "/dev", 0o755)
    _mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=16k")
    for name, fd in devices:
        open(f"{root}/dev/{name}", "w").close()
        _mount(f"/proc/self/fd/{fd}", f"{root}/dev/{name}", None, MS_BIND)
        os.close(fd)
    os.mkdir(root + WORK, 0o700)
    owner = settings["candidate_uid"]
    options = f"mode=700,size={max(settings['file_bytes'], 4096)},nr_inodes=4096"  # size=0 would be unlimited
    _mount("tmpfs", root + WORK, "tmpfs", MS_NOSUID | MS_NODEV,
           options + (f",uid={owner},gid={owner}" if owner >= 0 else ""))
    _remount_read_only_under(root, root + WORK)
    machine = os.uname().machine
    if machine not in SYS_PIVOT_ROOT:
        raise OSError(errno.ENOSYS, f"no pivot_root system call number for {machine}")
    os.chdir(root)
    _libc_call("syscall", ctypes.c_long(SYS_PIVOT_ROOT[machine]), b".", b".")
    _libc_call("umount2", b".", MNT_DETACH)
    os.chdir("/")


# -- supervisor and init ------------------------------------------------------------------------------------
def _map_root(uid: int, gid: int) -> None:
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _init(settings: dict[str, Any], source: str, supervisor_alive: int) -> int:
    """PID 1 of the run's namespaces: build the root, start the pair, return when the judge is done."""
    children: list[int] = []
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([supervisor_alive], [], [], 0)[0]:  # EOF: the supervisor died before the line above
            return SETUP_FAILED
        os.close(supervisor_alive)
        _unshare(CLONE_NEWNS)
        build_root(settings)
        judge = _start_pair(settings, source, children)
    except BaseException as exc:
        return _setup_failed("init", exc)
    while True:  # PID 1 reaps everything; its exit ends every process of the namespace
        pid, status = os.wait()
        if pid == judge:
            return _exit_code(status)


def _supervise(settings: dict[str, Any], source: str, children: list[int]) -> int:
    if settings["level"] == "rlimits":
        _prctl(PR_SET_DUMPABLE, 0)
        if settings["candidate_uid"] >= 0:  # the sandbox uids may not read the interpreter's folder (e.g. /root)
            _preload()
        try:
            judge = _start_pair(settings, source, children)
        except BaseException as exc:
            return _setup_failed("supervisor", exc)
        status = _reap(judge, children)
        candidate = children[0]
        _kill_all([candidate])
        _reap(candidate, children)
        return status
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    try:
        if settings["level"] == "userns":
            uid, gid = os.getuid(), os.getgid()
            _unshare(flags | CLONE_NEWUSER)
            _map_root(uid, gid)
        else:
            _unshare(flags)
        _prctl(PR_SET_DUMPABLE, 0)  # after writing the maps, which a non-dumpable process may not
    except BaseException as exc:
        return _setup_failed("namespaces", exc)
    alive_r, alive_w = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(alive_w)
        os._exit(_init(settings, source, alive_r))
    children.append(init)
    os.close(alive_r)
    return _reap(init, children)  # returns once the kernel has ended every process of the namespace


def _reap(pid: int, children: list[int]) -> int:
    """Wait for ``pid``; it leaves the list the SIGTERM handler kills while still a zombie, so the handler
    never signals a reused pid."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    children.remove(pid)
    _, status = os.waitpid(pid, 0)
    return _exit_code(status)


def _kill_all(children: list[int]) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> None:
    evaluator = int(sys.argv[1])
    _die_with_parent(evaluator)
    children: list[int] = []

    def stop(signum: int, frame: Any) -> None:  # the evaluator's timeout: end the run, then return normally
        if not children:
            os._exit(SETUP_FAILED)
        _kill_all(children)

    signal.signal(signal.SIGTERM, stop)
    try:
        settings = json.loads(protocol.read_frame(0))
        source = protocol.read_frame(0).decode("utf-8")
    except BaseException as exc:
        os._exit(_setup_failed("reading the job", exc))
    os._exit(_supervise(settings, source, children))


if __name__ == "__main__":
    main()
