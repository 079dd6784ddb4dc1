"""Multi-turn rollouts in which the model runs Python while it reasons: token in, token out.

The engine samples a turn until the model ends its reply or writes a call (`ToolFormat.call_end`); the sandbox
runs the call; the template's own text for the tool turn, with the output, is encoded and appended; the engine
goes on from the prompt's and the rollout's own token ids. Nothing is rendered again from text, so the trainer
scores exactly the tokens the engine sampled, plus the ones the environment inserted, which it marks
(`Rollout.inserted`) and leaves out of the loss, the advantage and the KL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from thinkforge.chat import ChatFormat, ToolFormat
from thinkforge.progress import GenerationProgress
from thinkforge.rollout.base import EnginePrompt, Generate, Rollout, ToolCall, prompt_token_ids
from thinkforge.rollout.settings import SamplingParams, ToolsConfig
from thinkforge.sandbox import SandboxLimits, ToolRun, run_python

#: what a call that could not run gets back, by why
NOT_RUN = {
    "malformed": "error: not a call this tool understands (a ```python block, or the tool's JSON with its code)",
    "nested": "error: a call was opened inside another; nothing was run",
    "step_budget": "error: this step's tool time is spent; nothing was run",
}


@dataclass
class _Sample:
    """One rollout as it grows turn by turn."""

    prompt_index: int
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    inserted: list[bool] = field(default_factory=list)
    turns: list[tuple[str, str]] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    model_turns: int = 0
    #: the last turn ended at a call, which has not run yet
    calling: bool = False
    ended: bool = False
    finished: bool = False
    stopped_by: str | None = None
    #: the optimizer step whose weights sampled its first turn (a server may move on to newer ones between turns)
    policy_version: int = 0

    def rollout(self) -> Rollout:
        text = "".join(text for role, text in self.turns if role == "assistant")
        return Rollout(
            self.prompt_index,
            text,
            tuple(self.tokens),
            self.finished,
            self.stopped_by,
            tuple(self.logprobs),
            inserted=tuple(self.inserted),
            turns=tuple(self.turns),
            calls=tuple(self.calls),
            policy_version=self.policy_version,
        )


class ToolRollouts:
    """A `Generate` that runs the model's tool calls between its turns. `generate` samples token prompts (an
    engine's, or a stage's); `synced_any` tells whether any rank still has a turn to sample (under FSDP every rank
    must join every generation call: a rank with nothing left samples a throwaway token)."""

    def __init__(
        self,
        generate: Generate,
        chat: ChatFormat,
        settings: ToolsConfig,
        *,
        synced_any: Callable[[bool], bool] = bool,
    ) -> None:
        self.generate, self.chat, self.settings, self.synced_any = generate, chat, settings, synced_any
        self.format = ToolFormat.for_chat(chat, settings.syntax)
        self.limits = SandboxLimits(wall_s=settings.wall_s, cpu_s=settings.cpu_s, memory_bytes=settings.memory_mb << 20)
        self.start_step()

    def start_step(self) -> None:
        """A new training step: its tool-time budget is whole again."""
        self.budget_left = self.settings.step_budget_s
        #: seconds spent running tools since the step started (wall clock, calls in parallel counted once)
        self.tool_seconds = 0.0

    def __call__(
        self,
        prompts: Sequence[EnginePrompt],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        stops = (*sampling.stop_strings, self.format.call_end)
        first = self.generate(prompts, replace(sampling, stop_strings=stops), seed=seed, progress=progress)
        prompt_ids = prompt_token_ids(self.chat.tokenizer, prompts)
        groups = [[_Sample(index, prompt_ids[index]) for _ in group] for index, group in enumerate(first)]
        samples = [sample for group in groups for sample in group]
        for sample, rollout in zip(samples, (rollout for group in first for rollout in group)):
            self._add_turn(sample, rollout, sampling.max_new_tokens)
        turn = 1
        while True:
            self._run_calls([sample for sample in samples if sample.calling], sampling.max_new_tokens)
            active = [sample for sample in samples if not sample.ended]
            if not self.synced_any(bool(active)):
                break
            room = [sampling.max_new_tokens - len(sample.tokens) for sample in active]
            continued: list[EnginePrompt] = [sample.prompt_ids + sample.tokens for sample in active]
            step = replace(sampling, num_samples=1, max_new_tokens=max(room, default=1), stop_strings=stops)
            # a rank with nothing left still joins the call (FSDP's collectives): one token of its first prompt
            outputs = self.generate(continued or [prompt_ids[0]], step, seed=seed + 7919 * turn)
            for sample, left, (rollout,) in zip(active, room, outputs):
                self._add_turn(sample, rollout, left)
            turn += 1
        return [[sample.rollout() for sample in group] for group in groups]

    def _add_turn(self, sample: _Sample, rollout: Rollout, room: int) -> None:
        """Appends a sampled turn, cut to the `room` left in the token budget, and decides what comes next."""
        tokens, logprobs = list(rollout.token_ids[:room]), list(rollout.logprobs[:room])
        cut = len(tokens) < len(rollout.token_ids)
        sample.tokens += tokens
        sample.logprobs += logprobs + [0.0] * (len(tokens) - len(logprobs))
        sample.inserted += [False] * len(tokens)
        sample.model_turns += 1
        if sample.model_turns == 1:
            sample.policy_version = rollout.policy_version
        ended_by_end_token = rollout.finished and not cut
        text_tokens = tokens[:-1] if ended_by_end_token else tokens
        text = str(self.chat.tokenizer.decode(text_tokens, skip_special_tokens=False))
        sample.turns.append(("assistant", text))
        if not cut and rollout.stopped_by == self.format.call_end:
            if sample.model_turns < self.settings.max_turns:
                sample.calling = True
                return
            sample.calls.append(ToolCall(ok=False, not_run="max_turns"))
        elif self.format.opens_call(text):
            sample.calls.append(ToolCall(ok=False, not_run="unclosed"))
        sample.ended, sample.finished = True, ended_by_end_token
        sample.stopped_by = None if cut else rollout.stopped_by

    def _run_calls(self, samples: list[_Sample], budget: int) -> None:
        """Runs each sample's pending call (in parallel) and appends the template's tool turn with its result."""
        if not samples:
            return
        parsed = [self.format.parse(sample.turns[-1][1]) for sample in samples]
        runnable = [code for code, _ in parsed if code is not None]
        spent = self.budget_left is not None and self.budget_left <= 0
        runs: list[ToolRun] = []
        if runnable and not spent:
            started = time.perf_counter()
            workers = self.settings.workers or os.cpu_count() or 1
            with ThreadPoolExecutor(max_workers=min(workers, len(runnable))) as pool:
                runs = list(
                    pool.map(lambda code: run_python(code, self.limits, self.settings.max_output_chars), runnable)
                )
            elapsed = time.perf_counter() - started
            self.tool_seconds += elapsed
            if self.budget_left is not None:
                self.budget_left -= elapsed
        results = iter(runs)
        for sample, (code, problem) in zip(samples, parsed):
            if code is None:
                output, call = NOT_RUN[problem or "malformed"], ToolCall(ok=False, not_run=problem)
            elif spent:
                output, call = NOT_RUN["step_budget"], ToolCall(ok=False, not_run="step_budget")
            else:
                ran = next(results)
                output, call = ran.output, ToolCall(ok=ran.ok, seconds=ran.seconds, timed_out=ran.timed_out)
            sample.calls.append(call)
            sample.calling = False
            inserted = self.chat.encode(self.format.result(output))
            room = budget - len(sample.tokens)
            sample.tokens += inserted[:room]
            sample.logprobs += [0.0] * len(inserted[:room])
            sample.inserted += [True] * len(inserted[:room])
            sample.turns.append(("tool", output))
            if len(inserted) >= room:
                # the budget ends inside the tool turn (or right after it): nothing is left to sample
                sample.ended, sample.finished = True, False


def tool_call_reward(rollout: Rollout, settings: ToolsConfig) -> float:
    """The shaping term of a sample's calls: `failed_call_reward` per call that ran and failed (or could not run
    as written), `over_budget_call_reward` per call past its turns or its step's time."""
    over = sum(call.not_run in ("max_turns", "step_budget") for call in rollout.calls)
    failed = sum(not call.ok for call in rollout.calls) - over
    return failed * settings.failed_call_reward + over * settings.over_budget_call_reward


def tool_stats(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """This rank's sums of what the tool calls did, for the step's metrics (summed over ranks, then divided)."""
    calls = [call for rollout in rollouts for call in rollout.calls]
    return {
        "calls": float(len(calls)),
        "clean_call": float(sum(call.ok for call in calls)),
        "turns": float(sum(sum(role == "assistant" for role, _ in rollout.turns) for rollout in rollouts)),
        "timed_out": float(sum(call.timed_out for call in calls)),
        **{
            f"not_run/{why}": float(sum(call.not_run == why for call in calls))
            for why in ("malformed", "nested", "unclosed", "max_turns", "step_budget")
        },
    }
