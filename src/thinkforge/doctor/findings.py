"""What a check reports, and what it needs of the run before it can say anything."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

Status = Literal["pass", "warn", "fail", "skip"]


@dataclass
class Finding:
    check: str
    status: Status
    measured: str
    advice: str = ""


class Need(Enum):
    """What a check needs of the run; a check whose needs the run cannot meet is skipped with the need's reason."""

    TRAINING_RUN = "a few training steps of this stage"
    OWN_SAMPLES = "a stage that samples its own training data"
    GOLD_ANSWERS = "gold answers in the training rows"
    TWO_RANKS = "more than one data-parallel rank"
    PACKED_DOCUMENTS = "a stage that packs documents into rows"
    TOOLS = "a run whose model calls tools (tools=python)"


@dataclass(frozen=True)
class Check:
    """One check: its name in the report, what it needs, and how it runs (one finding, or several)."""

    name: str
    needs: frozenset[Need]
    run: Callable[[], Finding | tuple[Finding, ...]]
