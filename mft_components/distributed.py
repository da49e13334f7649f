"""The process group: joining it, a heartbeat per rank, reductions, timeouts that name the rank that stopped.

Hangs: the process group gets a timeout (the recipes' ``distributed_timeout_s``), so a collective that a rank never
joins fails on the ranks waiting in it instead of blocking forever. To say WHICH rank is missing, every rank's
heartbeat thread bumps a counter in the rendezvous store (its own connection) each second; :func:`collective_timeout_message` looks for
the counters that stopped (a stopped, frozen or killed process) when a collective times out.

Sharding a model over the group (FSDP2, activation checkpointing, compile, gathering a state dict) is
``models/parallelize.py``.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import torch
import torch.distributed as dist

from mft_components.device import to_device  # noqa: F401  (its home before device.py; old imports still find it)


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


HEARTBEAT_S = 1.0  # seconds between two heartbeats of a rank
_heartbeat: "_Heartbeat | None" = None


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) or run as a single process.

    Args:
        timeout_s: how long a collective may wait for the other ranks before it fails (None: torch's default,
            30 minutes for gloo, 10 for nccl). Applies to the group made here, not to one that already exists.

    Returns:
        (rank, world_size, device): device is cuda:LOCAL_RANK when CUDA is available, else cpu.
    """
    global _heartbeat
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not is_distributed():
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=timeout)
        _heartbeat = _Heartbeat.connect(get_rank(), get_world_size())
    return get_rank(), get_world_size(), device


def destroy_distributed() -> None:
    """Tear the process group down (no-op when none)."""
    global _heartbeat
    if is_distributed():
        dist.barrier()
        if _heartbeat is not None:
            _heartbeat.stop()
            _heartbeat = None
        dist.destroy_process_group()


def end_worker(exit_code: int = 0) -> None:
    """Under torchrun, end this worker with ``exit_code`` now that its work is done and its process group destroyed,
    without the interpreter's finalization: torch's gloo backend can abort there ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#179291), which torchrun reports as a failed run after a finished
    one. Output is flushed first. Outside torchrun (a process that started no group) it does nothing."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "WORLD_SIZE" not in os.environ:
        return
    logging.shutdown()
    exit_at_once(exit_code)


def exit_at_once(exit_code: int) -> None:
    """Flush stdout and stderr, then end the process with ``exit_code`` (``os._exit``: no finalization, other
    threads stop where they are)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(exit_code)


class _Heartbeat(threading.Thread):
    """Adds 1 to this rank's counter in the store every ``HEARTBEAT_S`` (a daemon: it never keeps a process
    alive); a process that is stopped or frozen stops counting, one that waits in a collective does not."""

    def __init__(self, store, rank: int, world_size: int):
        super().__init__(name="mft-heartbeat", daemon=True)
        self.store, self.rank, self.world_size = store, rank, world_size
        self._stopped = threading.Event()

    @classmethod
    def connect(cls, rank: int, world_size: int) -> "_Heartbeat | None":
        """Start beating through a connection of its own to the rendezvous store (torchrun's MASTER_ADDR and
        MASTER_PORT), so that it never waits behind the process group's use of the store; None without one."""
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=60))
        except (KeyError, ValueError, RuntimeError):
            return None
        beat = cls(dist.PrefixStore("mft_heartbeat", store), rank, world_size)
        beat.start()
        return beat

    def run(self) -> None:
        while True:
            try:
                self.store.add(str(self.rank), 1)
            except Exception:  # the store is gone: the run is ending
                return
            if self._stopped.wait(HEARTBEAT_S):
                return

    def stop(self) -> None:
        self._stopped.set()

    def silent_ranks(self, window_s: float) -> list[int] | None:
        """Other ranks whose counter did not move during ``window_s``; None when the store cannot be read."""
        try:
            before = [self.store.add(str(r), 0) for r in range(self.world_size)]
            time.sleep(window_s)
            after = [self.store.add(str(r), 0) for r in range(self.world_size)]
        except Exception:
            return None
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]


def is_collective_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a collective that timed out (gloo: "Timed out waiting ...", nccl: "... timeout")."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and is_distributed() and ("timed out" in text or "timeout" in text)


def collective_timeout_message(error: BaseException, timeout_s: float | None) -> str:
    """What to tell a person when a collective timed out on this rank: which ranks stopped answering.

    Watches the other ranks' heartbeats for a few seconds (a frozen rank's counter stands still).
    """
    rank = get_rank()
    limit = f"distributed_timeout_s={timeout_s:g}" if timeout_s else "the process group's timeout"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    head = f"rank {rank}: a collective did not complete within {limit} ({first_line})"
    silent = _heartbeat.silent_ranks(4 * HEARTBEAT_S) if _heartbeat is not None else None
    if silent:
        who = ", ".join(f"rank {r}" for r in silent)
        return (f"{head}.\n{who} stopped answering (its process is stopped, frozen or gone): the run ends. Restart "
                f"it (resume: auto continues from the last checkpoint); raise distributed_timeout_s if that rank "
                f"was only slow (e.g. writing a large checkpoint)")
    if silent is None:
        return f"{head}; the other ranks could not be asked which one is stuck: the run ends"
    return (f"{head}.\nEvery rank still answers, so they wait in different collectives: a rank is busy for longer "
            f"than the timeout (raise distributed_timeout_s) or a recipe change made ranks run different collectives")


def run_in_step(fn, poll_s: float = 1.0):
    """``fn()`` on this rank, while the ranks meet in a one-number all-reduce every ``poll_s`` seconds until every
    rank's ``fn`` is done; returns its result (single process: just ``fn()``).

    For work between two collectives whose length differs between ranks without bound (code evaluation runs each
    rank's share of the programs, and one that hangs costs its whole timeout): a rank done early would otherwise
    wait for the others inside the next collective, and the process group's timeout (``distributed_timeout_s``,
    meant for a rank that stopped) would end the run. A rank that does stop stops joining the all-reduces, so that
    still ends the run after the timeout. ``fn`` runs in a thread; it should not call collectives itself.
    """
    if not is_distributed():
        return fn()
    world = get_world_size()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mft-in-step") as pool:
        future = pool.submit(fn)
        while True:
            wait([future], timeout=poll_s)
            if future.done() and future.exception() is not None:
                return future.result()  # raises here; the others stop at the timeout (torchrun ends them sooner)
            done = all_reduce_sum(torch.tensor([1.0 if future.done() else 0.0]))
            if int(done.item()) == world:
                return future.result()


def decided_by_rank0(fn, errors: tuple[type[BaseException], ...] = ()):
    """``fn()`` on rank 0 (in step: the others meet it in a one-number all-reduce each second, as in
    :func:`run_in_step`), and its result on every rank; one of ``errors`` raised there is raised again, with its
    message, on every rank (single process: just ``fn()``).

    For a decision that reads files once for all ranks (which checkpoint to resume, whether another run holds
    output_dir), however long the reading takes.
    """
    if not is_distributed():
        return fn()
    answer: list = [None]

    def decide() -> None:
        try:
            answer[0] = ("value", fn())
        except errors as e:
            answer[0] = ("error", type(e), str(e))

    run_in_step(decide if get_rank() == 0 else lambda: None)
    dist.broadcast_object_list(answer, src=0)
    if answer[0][0] == "error":
        raise answer[0][1](answer[0][2])
    return answer[0][1]


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `t` over ranks in place (no-op single-process) and return it; a CPU tensor under NCCL, which reduces
    CUDA tensors only, goes through the GPU."""
    if not is_distributed():
        return t
    if dist.get_backend(group) == "nccl" and t.device.type != "cuda":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM, group=group)
        t.copy_(on_gpu.to(t.device))
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


# Sharding a model moved to mft_components.models.parallelize (this module is below the models). A recipe copied
# before that imports these names from here: the legacy shims put them back (mft_components/legacy/moved_names.py)
# when the recipe imports an old module name first, as the copied LoRA recipe does; otherwise say where they went.
_MOVED_TO_PARALLELIZE = frozenset({
    "ACTIVATION_CHECKPOINTING", "COMPILE_SCOPES", "activation_checkpointing_mode", "apply_activation_checkpointing",
    "compile_layers", "gather_state_dict", "make_param_like", "reshard", "resolve_compile", "shard_model",
})


def __getattr__(name: str):
    if name in _MOVED_TO_PARALLELIZE:
        raise ImportError(f"mft_components.distributed.{name} moved to mft_components.models.parallelize.{name}: "
                          f"import it from there")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
