"""The processes of one run: who does what when a recipe runs on N processes (one per GPU, or N gloo CPU processes).

``mft-bench run RECIPE --nproc N`` starts N copies of the same command (``launch``); ``torchrun --nproc_per_node N``
and ``accelerate launch --num_processes N`` start the same N processes with the same environment variables, so
all three behave alike. Every process walks the same plan: training stages run on all of them together (the
Trainer's data parallelism or FSDP), the data stage, mask baselines, saves, manifests and the report run once on the
main process while the others wait, and evaluation stages are dealt out to the processes, each on its own device,
never duplicated. An error on the process doing the work is passed to the others, so all stop with the same
exit code and only the main process prints it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Waiting for another process's evaluation or data stage can take hours: the waiting group is gloo (CPU) with a
# timeout far beyond any stage. Collectives of training (gradients, FSDP gathers) keep the default group's.
WAIT_TIMEOUT = timedelta(days=7)
TRAIN_TIMEOUT = timedelta(hours=1)


class ElsewhereError(Exception):
    """The process that did a shared step failed; this process stops too (its message was printed there)."""

    def __init__(self, message: str, bad_input: bool) -> None:
        super().__init__(message)
        self.bad_input = bad_input


def environment_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class RunProcesses:
    """This process's place among the run's processes, and the few collectives the pipeline needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _wait_group: Any = None

    @classmethod
    def from_environment(cls) -> RunProcesses:
        """From the launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK); joins the process group when there are
        several processes. One process: no group, every helper below runs its work directly."""
        world = environment_world_size()
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise MftBenchError(f"process {rank} has local rank {local_rank} but torch sees "
                                    f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU")
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=TRAIN_TIMEOUT)
        return cls(rank=rank, world_size=world, local_rank=local_rank,
                   _wait_group=dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self):
        """The device this process evaluates and trains on: its own GPU, else the CPU."""
        import torch

        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._wait_group)

    def on_main(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Run ``work`` on the main process only; the others wait, and raise if it failed there."""
        if self.world_size <= 1:
            return work(*args, **kwargs)
        outcome: tuple[str, Any] | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = ("ok", work(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - passed on, then re-raised here
                error, outcome = exc, _failure(exc)
        outcome = self._broadcast(outcome)
        if error is not None:
            raise error
        _raise_if_failed([outcome])
        return outcome[1]

    def share(self, items: Sequence[T], work: Callable[[T], None]) -> None:
        """Deal ``items`` out round-robin (item i on process i mod N), run ``work`` on each, wait for all; raise
        if any process failed (the first failure, in item order)."""
        if self.world_size <= 1:
            for item in items:
                work(item)
            return
        import torch.distributed as dist

        mine: tuple[str, Any] = ("ok", None)
        error: BaseException | None = None
        for item in items[self.rank::self.world_size]:
            try:
                work(item)
            except BaseException as exc:  # noqa: BLE001 - passed on, then re-raised here
                error, mine = exc, _failure(exc)
                break
        outcomes: list[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, mine, group=self._wait_group)
        if error is not None:
            raise error
        _raise_if_failed(outcomes)

    def _broadcast(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._wait_group)
        return box[0]


def _failure(exc: BaseException) -> tuple[str, str]:
    kind = "bad_input" if isinstance(exc, MftBenchError) or getattr(exc, "bad_input", False) else "failed"
    return kind, f"{type(exc).__name__}: {exc}" if kind == "failed" else str(exc)


def _raise_if_failed(outcomes: Sequence[tuple[str, Any]]) -> None:
    for kind, message in outcomes:
        if kind != "ok":
            raise ElsewhereError(message, bad_input=kind == "bad_input")


# ----------------------------------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_process_count(nproc: int) -> None:
    """Refuse a process count this machine cannot give each process a device for, before anything starts."""
    if nproc < 1:
        raise MftBenchError(f"--nproc must be at least 1, got {nproc}")
    if environment_world_size() > 1:
        raise MftBenchError("--nproc inside a launched run (WORLD_SIZE is set): use either --nproc or the launcher")
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise MftBenchError(f"--nproc {nproc} but torch sees {torch.cuda.device_count()} GPU(s): one process per GPU")


def launch(argv: Sequence[str], nproc: int, *, grace_s: float = 30.0) -> int:
    """Run ``mft-bench <argv>`` as ``nproc`` processes on this machine (the environment torchrun gives its workers)
    and return the run's exit code: the main process's, or the first failure's. When one process fails the others
    are stopped (they would wait for it forever otherwise)."""
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        env.setdefault("OMP_NUM_THREADS", str(threads))  # N processes share the cores instead of each taking all
        procs.append(subprocess.Popen([sys.executable, "-m", "mft_bench.cli", *argv], env=env))
    codes: list[int | None] = [None] * nproc
    try:
        while any(code is None for code in codes):
            for rank, proc in enumerate(procs):
                if codes[rank] is None:
                    codes[rank] = proc.poll()
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                _stop(procs, grace_s)
                codes = [proc.returncode for proc in procs]
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs, grace_s)
        raise
    if not any(codes):
        return 0
    if codes[0] and codes[0] > 0:
        return codes[0]
    return next((code for code in codes if code and code > 0), 1)  # the stopped ones have negative codes


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
