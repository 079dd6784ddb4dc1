"""Progress of long work that is not a training step: held-out scoring, the starting evaluation, rejection and pair
sampling, `thinkforge-eval`. Samples done, new tokens/s and the time left, as a bar on a terminal; elsewhere (a
log file, `nohup`, a SLURM job's output) as a log line every `every_s` seconds, so that no phase sits silent."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


def on_terminal() -> bool:
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    """A short human duration: 42 s, 7 min, 2.3 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class GenerationProgress:
    """`step` is called within a batch as decoding goes (tokens and rows so far), `end_batch` when it is done."""

    def __init__(self, total: int, description: str = "sampling", *, every_s: float = 30.0) -> None:
        self.total, self.description, self.every_s = total, description, every_s
        self.done, self.tokens, self.started = 0, 0, time.perf_counter()
        self.last_report = self.started
        self.reported = False
        self.bar: Any = None
        if on_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, unit="sample", dynamic_ncols=True)

    def step(self, new_tokens: int, finished: int) -> None:
        """Within the current batch: `new_tokens` generated so far, `finished` rows ended so far."""
        now = time.perf_counter()
        rate = (self.tokens + new_tokens) / max(now - self.started, 1e-9)
        if self.bar is not None:
            self.bar.n = self.done + finished
            self.bar.set_postfix_str(f"{rate:,.0f} new tokens/s", refresh=False)
            self.bar.refresh()
        elif now - self.last_report >= self.every_s:
            self.last_report = now
            self.report(self.done + finished, rate, now)

    def report(self, done: int, rate: float, now: float) -> None:
        self.reported = True
        elapsed = now - self.started
        if done >= self.total:
            when = f"done in {duration(elapsed)}"
        else:
            left = duration(elapsed / done * (self.total - done)) if done else "unknown"
            when = f"{duration(elapsed)} elapsed, about {left} left"
        log.info("%s: %d/%d samples, %s new tokens/s, %s", self.description, done, self.total, f"{rate:,.0f}", when)

    def end_batch(self, rows: int, new_tokens: int) -> None:
        self.done, self.tokens = self.done + rows, self.tokens + new_tokens
        self.step(0, 0)

    def close(self) -> None:
        """On a terminal the bar stays at its last count; in a log, a phase long enough to have reported its
        progress ends with a line saying it finished (a short one stays silent)."""
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.close()
            self.bar = None
        elif self.reported:
            now = time.perf_counter()
            self.report(self.done, self.tokens / max(now - self.started, 1e-9), now)
