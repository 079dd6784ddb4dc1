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


class SigtermDuringRollout(Callback):
    """Sends SIGTERM to its own process from inside step `step`'s rollout, after `after_tokens` decode steps, as
    a scheduler's preemption would arrive at any moment: the stop must come within that generation."""

    def __init__(self, step: int, after_tokens: int = 2) -> None:
        self.step, self.after_tokens = step, after_tokens

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        request, decoded = pl_module.stop_request, [0]
        check = request.check

        def decode_step_then_signal(**kwargs) -> None:
            decoded[0] += 1
            if decoded[0] == self.after_tokens:
                os.kill(os.getpid(), signal.SIGTERM)
            check(**kwargs)

        request.check = decode_step_then_signal


class SigtermDuringHeldOut(Callback):
    """Sends SIGTERM once the starting held-out evaluation has sampled for a while (a run preempted before its
    first step)."""

    def on_train_start(self, trainer, pl_module) -> None:
        request, decoded = pl_module.stop_request, [0]
        check = request.check

        def decode_step_then_signal(**kwargs) -> None:
            decoded[0] += 1
            if decoded[0] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            check(**kwargs)

        request.check = decode_step_then_signal
