"""Stopping on SIGTERM and SIGINT (preemption by SLURM, Kubernetes or a cloud; Ctrl-C): every rank finishes the
optimizer step it is in, they save a checkpoint together, and the run exits with :data:`PREEMPTED_EXIT_CODE`.

    stop = StopOnSignal(save=cfg.save_on_preemption, grace_s=cfg.preemption_grace_s, rank=rank)
    stop.install()                 # main thread, before setup: from now on a signal never kills mid-write
    stop.join_group(timeout_s)     # collective: a small gloo group of its own, on the CPU
    stop.start_training()
    for ...:                       # one optimizer step
        if stop.agreed():          # collective: all ranks learn at the same step whether any rank got a signal
            ...save, then raise RunStopped(...)
    stop.uninstall()

What a signal does, by when it comes:

* before training starts (loading data, the model): the run ends at once, exit code 75, nothing to save;
* while training, with ``save_on_preemption: true`` (the default): the step in progress finishes, then the ranks
  agree, checkpoint that step together and exit with 75 (``EX_TEMPFAIL``: run the same command again, with
  ``resume: auto``, to continue). Evaluations due at that step are left for the resumed run, which runs them
  first, so it trains and logs exactly what the uninterrupted run would have;
* with ``save_on_preemption: false``: the run ends at once with 128 + the signal's number (143 SIGTERM, 130
  SIGINT), keeping the last checkpoint;
* a second SIGTERM / SIGINT, at least :data:`REPEAT_AFTER_S` after the first, ends the process at once with 128 +
  its number: checkpoints are written to a temporary directory and renamed, so the last complete one stays whole.
  (One signal often arrives twice within milliseconds: from the terminal or the scheduler and again from torchrun.)
* ``preemption_grace_s`` after the first signal, a run still finishing its step or saving ends the same way, with a
  message (set it below the scheduler's kill delay: SLURM's KillWait, Kubernetes' terminationGracePeriodSeconds).

Agreement costs one all-reduce of one number per optimizer step on the side group (gloo over TCP, on the CPU: no
device sync is added; ``bench/stop_signal_cost.py`` measures it). SIGINT never prints a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from mft_components.distributed import exit_at_once, is_distributed

__all__ = ["PREEMPTED_EXIT_CODE", "REPEAT_AFTER_S", "DEFAULT_GRACE_S", "EXIT_STATUS_ENV", "RunStopped", "StopOnSignal",
           "report_exit_status"]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal in good order; run again to continue
REPEAT_AFTER_S = 2.0
DEFAULT_GRACE_S = 120.0  # the recipes' preemption_grace_s
# `mft run --nproc-per-node N` names a file here: rank 0 writes its exit status into it, which mft returns
# (torchrun itself ends with status 1 and a traceback once it got a signal, whatever its workers did).
EXIT_STATUS_ENV = "MFT_EXIT_STATUS_FILE"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """The run stopped on a signal after saving (or with nothing to save); ``exit_code`` is what the process
    returns."""

    def __init__(self, message: str, exit_code: int = PREEMPTED_EXIT_CODE):
        super().__init__(message)
        self.exit_code = exit_code


class StopOnSignal:
    """SIGTERM / SIGINT handling of a training run (see the module docstring).

    Args:
        save: ``save_on_preemption``: finish the step and save (True), or end at once (False).
        grace_s: ``preemption_grace_s``: after the first signal, end the process after this long (None: never).
        rank: this process's rank (rank 0 prints).
    """

    def __init__(self, save: bool = True, grace_s: float | None = None, rank: int = 0):
        self.save, self.grace_s, self.rank = save, grace_s, rank
        self.signum: int | None = None
        self._first_at = 0.0
        self._training = False
        self._group = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------------------------------ handlers

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on (main thread only; elsewhere this does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Put the previous handlers back and stop the grace timer."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self._first_at >= REPEAT_AFTER_S:
                self._end_now(signum, f"a second {name}: ending now; the last complete checkpoint is intact")
            return  # the same signal delivered twice (terminal or scheduler, and torchrun)
        self.signum, self._first_at = signum, time.monotonic()
        if not self._training:
            self._say(f"{name} before training started: stopping (nothing to save yet)")
            if self.rank == 0:
                report_exit_status(PREEMPTED_EXIT_CODE)
            raise SystemExit(PREEMPTED_EXIT_CODE)
        if not self.save:
            self._end_now(signum, f"{name}: stopping at once (save_on_preemption: false); the last checkpoint is "
                                  "kept", exit_now=False)
        self._say(f"{name}: finishing this optimizer step, then saving a checkpoint and stopping (a second {name} "
                  f"ends at once)")
        if self.grace_s is not None:
            self._timer = threading.Timer(self.grace_s, self._end_now, (signum, (
                f"the step and the checkpoint did not finish within preemption_grace_s={self.grace_s:g} after "
                f"{name}: ending now; the last complete checkpoint is intact")))
            self._timer.daemon = True
            self._timer.start()

    def _end_now(self, signum: int, message: str, exit_now: bool = True) -> None:
        """End with 128 + signum: at once (``os._exit``: other threads may be writing a checkpoint, whose temporary
        directory the next run removes), or by ``SystemExit`` from the main thread."""
        self._say(message, every_rank=True)
        code = 128 + signum
        if self.rank == 0:
            report_exit_status(code)
        if not exit_now:
            raise SystemExit(code)
        exit_at_once(code)

    def _say(self, message: str, every_rank: bool = False) -> None:
        if self.rank == 0 or every_rank:
            print(f"[mft] rank {self.rank}: {message}" if every_rank else f"[mft] {message}", file=sys.stderr,
                  flush=True)

    # ------------------------------------------------------------------------------------------ agreement

    def join_group(self, timeout_s: float | None = None) -> None:
        """Collective under a process group: the gloo side group that :meth:`agreed` reduces over, so the flag
        stays on the CPU whatever the training backend (no device sync per step)."""
        if is_distributed():
            timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
            self._group = dist.new_group(backend="gloo", timeout=timeout)

    def start_training(self) -> None:
        """From now on a signal stops the run after the step in progress (before: at once)."""
        self._training = True

    def agreed(self) -> int | None:
        """Whether any rank got a signal: the largest signal number seen by any rank, or None. Collective (one
        all-reduce of one number on the side group); call it once per optimizer step on every rank."""
        if self._group is None:
            return self.signum
        flag = torch.tensor([float(self.signum or 0)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item()) or None


def report_exit_status(code: int) -> None:
    """Write ``code`` into the file ``$MFT_EXIT_STATUS_FILE`` names (set by ``mft run --nproc-per-node``), if any."""
    path = os.environ.get(EXIT_STATUS_ENV)
    if path:
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"{code}\n")
        except OSError:
            pass
