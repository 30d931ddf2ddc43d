"""What crosses the sandbox's pipes: length-prefixed frames, plain built-in data, the candidate's server loop
and the judge's handle on it. Standard library only (imported by ``harness.py`` inside the sandbox)."""

from __future__ import annotations

import builtins
import functools
import io
import os
import pickle
import struct
import sys
from collections.abc import Callable

TYPE_CHECKING = False  # typing is not imported at run time (see harness.py)
if TYPE_CHECKING:
    from typing import Any

MAX_FRAME = 1 << 30


def encode_frame(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def write_frame(fd: int, data: bytes) -> None:
    view = memoryview(encode_frame(data))
    while view:
        view = view[os.write(fd, view):]


def read_exact(fd: int, size: int) -> bytes:
    """Exactly ``size`` bytes, read unbuffered: what follows stays in the pipe, not in this process's memory."""
    data = bytearray()
    while len(data) < size:
        chunk = os.read(fd, min(size - len(data), 1 << 20))
        if not chunk:
            raise EOFError("the pipe was closed")
        data += chunk
    return bytes(data)


def read_frame(fd: int, limit: int = MAX_FRAME) -> bytes:
    (size,) = struct.unpack(">Q", read_exact(fd, 8))
    if size > limit:
        raise ValueError(f"a message of {size} bytes is over the limit of {limit}")
    return read_exact(fd, size)


class Unrepresentable:
    """Stands for a value that is not plain data (a generator, an object of the candidate's own class): equal
    only to itself, like an object that does not define ``__eq__``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name} object>"


PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray)
PLAIN_COLLECTIONS = (list, tuple, set, frozenset)
RESTORABLE = ("complex", "bytearray", "set", "frozenset")  # builtins a pickle may need to name


def to_plain(value: Any) -> Any:
    """``value`` as built-in data only: subclasses become their built-in base (a Counter a dict, a namedtuple a
    tuple), anything else an :class:`Unrepresentable`."""
    if type(value) in PLAIN_SCALARS:
        return value
    for base in PLAIN_SCALARS[2:]:
        if isinstance(value, base):
            return base(value)
    for base in PLAIN_COLLECTIONS:
        if isinstance(value, base):
            return base(to_plain(item) for item in value)
    if isinstance(value, dict):
        return {to_plain(key): to_plain(item) for key, item in value.items()}
    kind = type(value)
    return Unrepresentable(f"{kind.__module__}.{kind.__qualname__}")


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> str | None:
        return obj.name if type(obj) is Unrepresentable else None


class _PlainUnpickler(pickle.Unpickler):
    """Builds built-in data only: no class of anyone's can be named, so no ``__eq__`` of the sender's runs."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in RESTORABLE:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")

    def persistent_load(self, pid: Any) -> Unrepresentable:
        return Unrepresentable(str(pid)[:200])


def dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=4).dump(value)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    return _PlainUnpickler(io.BytesIO(data)).load()


def message(exc: BaseException) -> str:
    """The exception's message on one line, bounded (its ``__str__`` may be the candidate's: guarded)."""
    try:
        text = str(exc)
    except BaseException:
        text = ""
    return " ".join(text.split())[:1000]


def describe(exc: BaseException) -> str:
    """``"Name: message"`` (a CandidateError carries the candidate's exception name in its message)."""
    return message(exc) if isinstance(exc, CandidateError) else f"{type(exc).__name__}: {message(exc)}"


# -- the candidate's side -----------------------------------------------------------------------------------
def serve_candidate(source: str, requests: int, replies: int) -> None:
    """Execute the completion, answer its load, then call its functions by name until the judge hangs up."""
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    _answer(replies, lambda: exec(compile(source, "<completion>", "exec"), namespace))
    while True:
        try:
            name, args, kwargs = loads(read_frame(requests))
        except EOFError:
            os._exit(0)
        _answer(replies, functools.partial(_call, namespace, name, args, kwargs))


def _call(namespace: dict[str, Any], name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
    if name not in namespace:
        raise NameError(f"name {name!r} is not defined")
    return namespace[name](*args, **kwargs)


def _answer(replies: int, action: Callable[[], Any]) -> None:
    try:
        reply: tuple = ("value", to_plain(action()))
    except BaseException as exc:  # SystemExit included: the call did not return
        reply = ("raise", type(exc).__name__, message(exc))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        data = dumps(reply)
    except BaseException as exc:
        data = dumps(("raise", "TypeError", f"the return value cannot be sent back: {message(exc)}"))
    write_frame(replies, data)


# -- the judge's side ---------------------------------------------------------------------------------------
class CandidateError(Exception):
    """The candidate failed in a way the judge has no built-in exception for (its own exception class, an
    answer that is not plain data, its process gone)."""


class Candidate:
    """The judge's handle on the candidate process."""

    def __init__(self, requests: int, replies: int) -> None:
        self.requests, self.replies = requests, replies

    def wait_ready(self) -> None:
        if read_frame(self.replies, 16) != b"ready":
            raise ValueError("unexpected first message")

    def loaded(self) -> None:
        self._result()

    def function(self, name: str) -> Callable[..., Any]:
        """A stand-in for the candidate's function ``name``: arguments go over as plain data, so does the result."""
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                write_frame(self.requests, dumps((name, args, kwargs)))
            except OSError:
                raise CandidateError("the candidate's process ended") from None
            return self._result()

        call.__name__ = call.__qualname__ = name
        return call

    def _result(self) -> Any:
        try:
            frame = read_frame(self.replies)
        except EOFError:
            raise CandidateError("the candidate's process ended without answering") from None
        except ValueError as exc:
            raise CandidateError(f"the candidate's answer is too large ({exc})") from None
        try:
            reply = loads(frame)
        except MemoryError:
            raise
        except Exception as exc:
            raise CandidateError(f"the candidate answered with something that is not plain data ({exc})") from None
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "value":
            return reply[1]
        if type(reply) is tuple and len(reply) == 3 and reply[0] == "raise" and all(type(x) is str for x in reply):
            raise _exception(reply[1], reply[2])
        raise CandidateError("the candidate answered with a malformed message")


def _exception(name: str, message: str) -> Exception:
    """The built-in exception the candidate raised (so tests that catch one still can), else a CandidateError."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    return CandidateError(f"{name}: {message}")


def run_judge(source: str, nonce: str, candidate: Candidate, result_fd: int) -> None:
    """Wait for the candidate, run the tests against it, write the one verdict line."""
    def verdict(text: str) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os.write(result_fd, f"{nonce} {text}\n".encode("utf-8", "replace"))

    try:
        candidate.wait_ready()
    except BaseException as exc:
        verdict(f"ERROR the candidate's sandbox could not be set up ({describe(exc)})")
        return
    try:
        candidate.loaded()
        if source:
            exec(compile(source, "<tests>", "exec"), {"__name__": "__main__", "candidate_function": candidate.function})
    except BaseException as exc:  # SystemExit included: the tests did not run to their end
        verdict("FAIL " + describe(exc))
    else:
        verdict("PASS")
