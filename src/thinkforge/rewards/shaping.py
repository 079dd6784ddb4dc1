"""Reward functions of one sample, and the weighted registry that composes them from config."""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from thinkforge.rewards.code import CodeTests, last_python_block
from thinkforge.rewards.grading import Gold, grade_many
from thinkforge.rewards.math import THINK_END


@dataclass(frozen=True)
class Sample:
    completion: str
    gold: Gold
    num_tokens: int
    truncated: bool
    # Whether the completion is verified correct (its final answer matches the gold one, or its code passes every
    # test): checked for a whole batch at once, in parallel.
    correct: bool
    # The completion budget it was sampled with (stage.sampling.max_new_tokens at this step): length rewards scale
    # to it, so a preset works at 96 tokens as at 32K and follows a context-lengthening schedule.
    max_tokens: int
    # The share of a coding row's tests the completion's code passed (on a math row, its 1/0 grade).
    tests_passed: float = 0.0

    @property
    def is_code(self) -> bool:
        return isinstance(self.gold, CodeTests)


def well_formed(completion: str, *, code: bool = False) -> bool:
    """One `<think>` block that opens the completion and closes once, then the answer after it: a boxed one, or
    for a coding row a fenced code block."""
    if not (
        completion.lstrip().startswith("<think>")
        and completion.count("<think>") == 1
        and completion.count(THINK_END) == 1
    ):
        return False
    final = completion.split(THINK_END, 1)[1]
    return last_python_block(final) is not None if code else "\\boxed{" in final


def accuracy_reward(sample: Sample) -> float:
    """DeepScaleR: 1 if the final boxed answer after `</think>` matches the gold answer, else 0 (a coding row: 1 if
    its code passes every test)."""
    return float(sample.correct)


def format_reward(sample: Sample) -> float:
    """R1-Zero: `<think>…</think>` then an answer."""
    return float(well_formed(sample.completion, code=sample.is_code))


def code_reward(sample: Sample, *, fraction: bool = True) -> float:
    """R1's reward for code run against test cases: the share of a coding row's tests its code passes (`fraction`),
    or 1/0 for all of them; 0 on a math row."""
    if not sample.is_code:
        return 0.0
    return sample.tests_passed if fraction else float(sample.correct)


def cosine_length_reward(sample: Sample, *, positive_fraction: float, negative_fraction: float) -> float:
    """Phi-4-reasoning-plus: correct 1.0 → 0.5 as it grows past `positive_fraction` of the budget; wrong −1 (short)
    → −0.5 (long) by `negative_fraction` of it. The paper's 25600 and 3702 of 31744 tokens: 0.806 and 0.117."""
    if sample.truncated:
        return -0.5
    if not well_formed(sample.completion, code=sample.is_code):
        return -1.0
    length, budget = sample.num_tokens, sample.max_tokens
    if sample.correct:
        positive = positive_fraction * budget
        rho = min(1.0, max(length - positive, 0) / max(budget - positive, 1e-9))
        return 0.5 + 0.25 * (1 + math.cos(math.pi * rho))
    rho = min(1.0, length / max(negative_fraction * budget, 1e-9))
    return -0.5 - 0.25 * (1 + math.cos(math.pi * rho))


# The Unicode scripts a language's words are written in (the first word of each letter's Unicode name). The check
# is by script: English and French are both Latin, Chinese and Japanese kanji both CJK.
LANGUAGE_SCRIPTS = {
    "en": ("LATIN",),
    "zh": ("CJK",),
    "ja": ("HIRAGANA", "KATAKANA", "CJK"),
    "ko": ("HANGUL",),
    "ru": ("CYRILLIC",),
    "ar": ("ARABIC",),
    "hi": ("DEVANAGARI",),
    "el": ("GREEK",),
}
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters: numbers, symbols and LaTeX punctuation are not words
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def _word_scripts(text: str) -> list[str]:
    """The script of each word of `text`; a CJK, kana or Hangul character counts as a word of its own, as those
    scripts write no spaces between words."""
    scripts = []
    for word in _WORD.findall(text):
        if _CJK_RUN.search(word):
            scripts += [unicodedata.name(character, "UNKNOWN").split()[0] for character in word]
        else:
            scripts.append(unicodedata.name(word[0], "UNKNOWN").split()[0])
    return scripts


def language_consistency_reward(sample: Sample, *, language: str = "en") -> float:
    """DeepSeek-R1: the share of the chain of thought's words written in the target language's script (the text
    before `</think>`, or the whole completion without one). A chain of thought with no words (arithmetic alone)
    mixes no languages: 1."""
    if language not in LANGUAGE_SCRIPTS:
        raise TypeError(f"language must be one of {', '.join(LANGUAGE_SCRIPTS)}; got {language!r}")
    thinking = sample.completion.split(THINK_END, 1)[0]
    scripts = _word_scripts(thinking.replace("<think>", " "))
    if not scripts:
        return 1.0
    return sum(script in LANGUAGE_SCRIPTS[language] for script in scripts) / len(scripts)


def repetition_reward(sample: Sample, *, ngram: int = 5, frequent_count: int = 5) -> float:
    """Phi-4: −max(#frequent n-grams / #n-grams, max frequency / (#words / n)); frequent = seen > 5 times."""
    words = sample.completion.split()
    if len(words) < ngram:
        return 0.0
    counts = Counter(tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1))
    total = sum(counts.values())
    frequent = sum(count for count in counts.values() if count > frequent_count)
    return -max(frequent / total, max(counts.values()) / (len(words) / ngram))


def overlong_reward(sample: Sample, *, cache_fraction: float) -> float:
    """DAPO soft overlong penalty: 0 until the last `cache_fraction` of the budget, then linear to −1, −1 beyond.
    DAPO's 4096-token cache of 20480: 0.2."""
    cache = cache_fraction * sample.max_tokens
    limit = sample.max_tokens - cache
    if sample.num_tokens <= limit:
        return 0.0
    if sample.num_tokens <= sample.max_tokens:
        return (limit - sample.num_tokens) / cache
    return -1.0


REWARD_FUNCTIONS: dict[str, Callable[..., float]] = {
    "math_accuracy": accuracy_reward,
    "code": code_reward,
    "format": format_reward,
    "cosine_length": cosine_length_reward,
    "repetition": repetition_reward,
    "overlong": overlong_reward,
    "language_consistency": language_consistency_reward,
}


class RewardModel:
    """Weighted sum of registered reward functions, e.g. {math_accuracy: {weight: 1}, format: {weight: 0.1}}.

    `lenient`: answers also count when stated without a box ("The answer is: 25", "#### 25"), for instruct models
    that never box; hedges and guesses still score 0 (`extract_answer(..., guess=False)`)."""

    #: the reward when `stage.reward` is null: the verified answer alone
    DEFAULT: Mapping[str, Mapping[str, Any]] = {"math_accuracy": {"weight": 1.0}}

    def __init__(self, spec: Mapping[str, Mapping[str, Any]] | None, *, lenient: bool = False) -> None:
        self.lenient = lenient
        spec = self.DEFAULT if spec is None else spec
        if not spec:
            raise ValueError("stage.reward: needs at least one reward function")
        self.functions: dict[str, tuple[float, Callable[[Sample], float]]] = {}
        for name, options in spec.items():
            if name not in REWARD_FUNCTIONS:
                raise ValueError(f"stage.reward.{name}: unknown reward; known: {', '.join(REWARD_FUNCTIONS)}")
            options = dict(options or {})
            weight = float(options.pop("weight", 1.0))
            try:
                function = partial(REWARD_FUNCTIONS[name], **options)
                function(Sample("<think>\nx\n</think>\n\\boxed{1}", "1", 10, False, True, 96))
            except TypeError as error:
                raise ValueError(f"stage.reward.{name}: {error}") from None
            self.functions[name] = (weight, function)

    def __call__(self, sample: Sample) -> tuple[float, dict[str, float]]:
        parts = {name: function(sample) for name, (_, function) in self.functions.items()}
        return sum(self.functions[name][0] * value for name, value in parts.items()), parts

    def score(
        self,
        completions: Sequence[str],
        golds: Sequence[Gold],
        lengths: Sequence[int],
        truncated: Sequence[bool],
        max_tokens: int,
    ) -> list[tuple[float, dict[str, float]]]:
        """Rewards of a batch; every answer check of the batch runs at once in the verifier's worker pool, every
        code check in parallel in the sandbox.

        Each sample's parts also carry `accuracy` (1/0, whatever the reward mix) and `answered` (whether the grader
        found an answer, or code, to grade at all), which are logged, never summed.
        """
        grades = grade_many(completions, golds, lenient=self.lenient, guess=False)
        samples = [
            Sample(text, gold, length, cut, grade.correct, max_tokens, tests_passed=grade.score)
            for text, gold, length, cut, grade in zip(completions, golds, lengths, truncated, grades)
        ]
        scored = [self(sample) for sample in samples]
        return [
            (total, {**parts, "accuracy": float(grade.correct), "answered": float(grade.answered)})
            for (total, parts), grade in zip(scored, grades)
        ]
