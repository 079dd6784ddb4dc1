"""What `thinkforge-doctor` may ask of a stage: its training examples as the loss sees them, the settings it samples
with, its gold answers and its packed documents. Each stage answers through its own probe (`Stage.probe()`), so
the doctor needs no knowledge of any stage's insides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from thinkforge.chat import ChatFormat
from thinkforge.config import TrainConfig
from thinkforge.data.packing import TokenSequence
from thinkforge.data.records import GOLD, load_split
from thinkforge.rewards.code import CodeTests
from thinkforge.rewards.grading import Gold
from thinkforge.rollout.settings import SamplingParams


class ProbedStage(Protocol):
    """What every probe reads of its stage (a `Stage`; the stages import this module, not the other way round)."""

    run: TrainConfig
    chat: ChatFormat


#: the stage a probe reads: each stage's probe sees its own stage's type
StageT = TypeVar("StageT", bound=ProbedStage)


@dataclass(frozen=True)
class TrainingExample:
    """One training sequence: its prompt's tokens (no loss there), the sequence with its targets, and the end token
    that must be a target for the model to learn to stop (None: no end to check)."""

    prompt_ids: list[int]
    sequence: TokenSequence
    end_id: int | None


#: the doctor's sampler check draws this many tokens at most, whatever the stage samples
PROBE_MAX_NEW_TOKENS = 64


class StageProbe(Generic[StageT]):
    """The answers of a stage that trains on fixed data and samples nothing; stages override what differs."""

    #: whether each rank samples its own training data (a rank split then changes what is trained on)
    samples_per_rank = False

    def __init__(self, stage: StageT) -> None:
        self.stage = stage
        self.chat = stage.chat
        self.tokenizer = self.chat.tokenizer

    def examples(self, count: int) -> list[TrainingExample]:
        """The first `count` training sequences, built as the stage builds them."""
        return []

    def sampling(self) -> SamplingParams | None:
        """The settings the stage samples its training data with (None: it samples none), capped for a quick check."""
        return None

    def gold_rows(self, limit: int) -> list[tuple[str, Gold]]:
        """(prompt, gold) of the first training rows, for the stages whose rows have them."""
        run = self.stage.run
        if not run.stage.trains_on_answers():
            return []
        rows = load_split(run.data, "train", required=("prompt", GOLD)).rows[:limit]
        return [(row["prompt"], row[GOLD]) for row in rows]

    def packed_documents(self, count: int) -> list[TokenSequence]:
        """The first `count` documents a packed stage puts side by side in a row; [] when it does not pack."""
        return []

    def reply_example(self, prompt: str, reply: str) -> TrainingExample:
        """A prompt and a reply rendered as one chat exchange, the reply's tokens the targets."""
        prompt_ids = self.chat.encode(self.chat.prompt(prompt))
        ids = self.chat.encode(self.chat.exchange(prompt, reply))
        mask = [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids))
        return TrainingExample(prompt_ids, TokenSequence.causal(ids, mask), self.chat.turn_end_id)


def capped(sampling: SamplingParams) -> SamplingParams:
    """Two samples of at most PROBE_MAX_NEW_TOKENS tokens with the stage's temperature and top_p."""
    return SamplingParams(2, sampling.temperature, sampling.top_p, min(PROBE_MAX_NEW_TOKENS, sampling.max_new_tokens))


def formatted_answer(gold: Gold) -> str:
    """A reply in the format the strict grader reads, standing in for a stage's own sampled replies (a coding row:
    a fenced function, whose length is what matters here)."""
    if isinstance(gold, CodeTests):
        return "<think>\nworked\n</think>\n```python\ndef solution(n):\n    return n\n```"
    return f"<think>\nworked\n</think>\nThe answer is \\boxed{{{gold}}}."
