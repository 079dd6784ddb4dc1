"""Fault injection for tests: a callback that SIGKILLs its own process, as a node failure would."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """Every rank kills itself after the same step. The barrier first, so that no rank is left waiting in a
    collective for a peer that is already dead (it would hang until the process-group timeout)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.strategy.barrier("fault")
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonWeightsAfterStep(Callback):
    """Writes a NaN into one weight after a step, as a diverging update would: the next step's loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            next(pl_module.policy.parameters()).data.view(-1)[0] = float("nan")
