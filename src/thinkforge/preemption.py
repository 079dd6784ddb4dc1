"""Stopping when asked, keeping what was computed.

Schedulers and tools stop a job with a signal: SLURM and Kubernetes send SIGTERM (SIGUSR1 first, where a job asks
for a warning), then SIGKILL some 30-90 s later; `timeout` and `kill` send SIGTERM, a terminal Ctrl-C SIGINT.
Lightning's own handler only notes SIGTERM and stops after the current step, which in RL can take minutes. Here the
signal is noted (`StopRequest`) and acted on at the next *stop point*: before each micro-batch of a step's first
optimisation pass, at each decode step of a generation (rollouts, held-out scoring) and before each loader batch.
Every stop point lies where the model still holds the last completed optimizer step, so `Preemption` saves
`checkpoints/last.ckpt` on the way out and the same command resumes as if nothing had happened.

Under FSDP every rank must stop at the same point: the ranks agree (one all-reduce) at micro-batch and loader-batch
stop points only, so a generation call runs to its end first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch.callbacks import Callback

from thinkforge.errors import Interrupted

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """The stop asked for from outside: set by the signal handler, raised as `Interrupted` at a stop point."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        #: the ranks agree before stopping (None: one process, stop at once)
        self.agree: Any = None
        self.child_pids: list[int] = []
        self.deferring = 0

    def ask(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise Interrupted(name, forced=True)  # a second Ctrl-C: stop now, whatever is lost
        self.signal_name = name
        log.warning("%s received: stopping at the next stop point, then saving checkpoints/last.ckpt", name)
        for pid in self.child_pids:  # the ranks this process launched stop with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Stop points inside do not stop: work whose result belongs in the next checkpoint (a held-out point
        between steps) finishes first, and the stop comes at the next stop point after it."""
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1

    def check(self, *, collective: bool = False) -> None:
        """A stop point: raise `Interrupted` if a stop was asked for. `collective`: every rank calls this point
        together, so under FSDP the ranks can agree; elsewhere only a single process stops."""
        if self.deferring:
            return
        if self.agree is None:
            asked = self.signal_name is not None
        elif collective:
            asked = bool(self.agree(self.signal_name is not None))
        else:
            return
        if asked:
            raise Interrupted(self.signal_name or "SIGTERM")


class Preemption(Callback):
    """Installs the stop handlers once Lightning's own are in place, gives the stage its `StopRequest`, and on an
    `Interrupted` saves the last completed optimizer step to `checkpoints/last.ckpt` (all ranks together)."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.request = StopRequest()
        self.previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.world_size > 1:
            self.request.agree = lambda asked: trainer.strategy.reduce_boolean_decision(asked, all=False)
        launcher = trainer.strategy.launcher
        self.request.child_pids = [process.pid for process in getattr(launcher, "procs", [])]
        pl_module.stop_request = self.request
        self._install()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._install()  # again: Lightning registers its own handlers after `on_fit_start`; these stay from here on

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.request.check(collective=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, Interrupted) and not exception.forced and 0 < trainer.global_step < trainer.max_steps:
            # Lightning counts a checkpoint saved inside a batch as one saved at the end of the previous batch,
            # whose logging step it then advances by one on restart: saved one lower, the resumed run logs the
            # batch it does again under its own step
            loop = trainer.fit_loop.epoch_loop
            loop._batches_that_stepped -= 1
            try:
                trainer.save_checkpoint(self.checkpoint)
            finally:
                loop._batches_that_stepped += 1
            if trainer.is_global_zero:
                log.warning(
                    "interrupted by %s: step %d saved to %s; the same command resumes from it",
                    exception.signal_name,
                    trainer.global_step,
                    self.checkpoint,
                )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """The process's own handlers again: a run in a longer-lived process (the doctor, a test) leaves none behind."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _install(self) -> None:
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            if current != self.request.ask:
                self.previous.setdefault(signum, current)
                signal.signal(signum, self.request.ask)


class TimedCheckpoint(Callback):
    """`checkpoints/last.ckpt` also every `minutes` of training, so a kill without warning (SIGKILL, a lost node)
    loses at most that much whatever `trainer.ckpt_every` is. Rank 0's clock decides, for all ranks."""

    def __init__(self, checkpoint: Path, minutes: float) -> None:
        self.checkpoint, self.seconds = checkpoint, minutes * 60
        self.last_save = time.monotonic()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        due = time.monotonic() - self.last_save >= self.seconds
        if trainer.world_size > 1:
            due = bool(trainer.strategy.broadcast(due, src=0))
        if due:
            trainer.save_checkpoint(self.checkpoint)
            self.last_save = time.monotonic()


def timed_checkpoint(checkpoint: Path, minutes: float | None) -> list[Callback]:
    """`TimedCheckpoint`, unless `trainer.ckpt_every_minutes` is null."""
    return [TimedCheckpoint(checkpoint, minutes)] if minutes else []
