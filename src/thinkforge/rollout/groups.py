"""GRPO's rollouts: each prompt's group of sampled completions, scored by the reward model, with DAPO's dynamic
sampling (zero-variance groups replaced by fresh prompts) and the step's rollout statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from thinkforge.collectives import Collectives
from thinkforge.data.loader import StepBatches
from thinkforge.rewards.grading import Gold
from thinkforge.rewards.math import shared_verifier_pool
from thinkforge.rewards.shaping import RewardModel
from thinkforge.rollout.base import Generate, Rollout
from thinkforge.rollout.settings import SamplingParams
from thinkforge.rollout.tools import tool_stats


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    token_ids: tuple[int, ...]
    gold: Gold


@dataclass
class Group:
    """One prompt's sampled completions and their rewards (`parts`: each reward function's value per sample)."""

    prompt: Prompt
    rollouts: list[Rollout]
    rewards: torch.Tensor
    parts: list[dict[str, float]]

    @property
    def has_signal(self) -> bool:
        return bool(self.rewards.std() > 0)


def no_signal_cause(accuracy: float, answered: float, truncated: float, max_tokens: int) -> tuple[str, str]:
    """What a step without reward spread saw, and its likely cause with the knob to change, from its rollouts'
    accuracy, share with a gradable answer and share truncated."""
    if accuracy >= 1:
        return "every completion was right", (
            "the prompts are too easy for this model: keep those it sometimes fails (thinkforge-data pass-rate)"
        )
    what = "every completion was wrong" if accuracy <= 0 else "every group's completions scored alike"
    if truncated >= 0.5:
        return what, (
            f"completions are cut off at stage.sampling.max_new_tokens={max_tokens} tokens: raise it, "
            "or ask for a shorter answer"
        )
    if answered < 0.5:
        return what, (
            "the model does not write its answer as the reward reads it (\\boxed{}, or a fenced code block, after "
            "</think>): set "
            "stage.answer_extraction=lenient, or a system prompt that asks for that format (prompt=phi4_reasoning)"
        )
    return what, "the prompts are too hard for this model: keep those it sometimes solves (thinkforge-data pass-rate)"


class GroupSampler:
    """`refills`: dynamic sampling's stream of extra prompts (None: no dynamic sampling), `max_refills` rounds of
    them at most per step."""

    def __init__(
        self,
        generate: Generate,
        reward_model: RewardModel,
        group_size: int,
        refills: StepBatches[list[Prompt]] | None,
        max_refills: int,
        tool_reward: Callable[[Rollout], float] | None = None,
    ) -> None:
        """`tool_reward`: a multi-turn sample's shaping term for its tool calls, added to its reward."""
        self.generate, self.reward_model, self.group_size = generate, reward_model, group_size
        self.refills, self.max_refills, self.tool_reward = refills, max_refills, tool_reward

    def score(self, prompts: Sequence[Prompt], sampling: SamplingParams, seed: int) -> list[Group]:
        rollouts = self.generate([p.text for p in prompts], sampling, seed=seed)
        flat = [(prompt, rollout) for prompt, group in zip(prompts, rollouts) for rollout in group]
        scored = self.reward_model.score(
            [r.text for _, r in flat],
            [p.gold for p, _ in flat],
            [len(r.token_ids) for _, r in flat],
            [not r.finished for _, r in flat],
            sampling.max_new_tokens,
        )
        if self.tool_reward is not None:
            shaping = [self.tool_reward(rollout) for _, rollout in flat]
            scored = [(total + extra, {**parts, "tool_calls": extra}) for (total, parts), extra in zip(scored, shaping)]
        groups = []
        for index, (prompt, group) in enumerate(zip(prompts, rollouts)):
            block = scored[index * self.group_size : (index + 1) * self.group_size]
            rewards = torch.tensor([total for total, _ in block])
            groups.append(Group(prompt, group, rewards, [parts for _, parts in block]))
        return groups

    def sample(
        self, prompts: Sequence[Prompt], sampling: SamplingParams, *, seed: int, position: int, collectives: Collectives
    ) -> tuple[list[Group], dict[str, float]]:
        """Sampled, scored groups for the step at data `position`; with dynamic sampling, zero-variance groups are
        replaced by fresh prompts.

        Every rank takes part in the same number of generation rounds (FSDP needs it): the loop runs while any
        rank is still short. A rank still short after `max_refills` keeps some zero-variance groups, which carry
        no gradient (their advantages are 0). The headline reward and accuracy are the first, unfiltered round's:
        the kept groups' reward sits near the middle whatever the policy does (`reward/kept_mean`).
        """
        first_round = self.score(prompts, sampling, seed)
        if self.refills is None:
            return first_round, rollout_stats(first_round, 0, collectives)
        keep = [g for g in first_round if g.has_signal]
        spare = [g for g in first_round if not g.has_signal]
        used = {prompt.index for prompt in prompts}
        for refill in range(self.max_refills):
            if collectives.sum(max(0, len(prompts) - len(keep))).item() == 0:
                break
            micro_batches = self.refills.rank_micro_batches(position * self.max_refills + refill)
            extra = [self.refills.items[index] for index in micro_batches[0]]
            # a prompt already in this step is still generated (every rank must join each round) but not kept twice
            more = [g for g in self.score(extra, sampling, seed + 7 * (refill + 1)) if g.prompt.index not in used]
            used |= {g.prompt.index for g in more}
            keep += [g for g in more if g.has_signal]
            spare += [g for g in more if not g.has_signal]
        final = (keep + spare)[: len(prompts)]
        stats = rollout_stats(first_round, sum(not g.has_signal for g in first_round), collectives)
        kept = torch.cat([g.rewards for g in final])
        kept_sum, kept_count = collectives.sum([kept.sum().item(), float(kept.numel())]).tolist()
        stats["reward/kept_mean"] = kept_sum / kept_count
        return final, stats


def rollout_stats(groups: list[Group], dropped: int, collectives: Collectives) -> dict[str, float]:
    """Reward, per-reward parts, length and truncation over every rank's groups."""
    rewards = torch.cat([g.rewards for g in groups])
    rollouts = [r for g in groups for r in g.rollouts]
    lengths = torch.tensor([float(len(r.token_ids)) for r in rollouts])
    parts = {name: sum(p[name] for g in groups for p in g.parts) / len(rollouts) for name in groups[0].parts[0]}
    local = {
        "reward_sum": rewards.sum().item(),
        "reward_sq_sum": (rewards**2).sum().item(),
        "samples": float(len(rollouts)),
        "length_sum": lengths.sum().item(),
        "truncated": float(sum(not r.finished for r in rollouts)),
        "zero_variance": float(sum(not g.has_signal for g in groups)),
        "groups": float(len(groups)),
        "dropped": float(dropped),
        **{f"part/{k}": v * len(rollouts) for k, v in parts.items()},
    }
    multi_turn = any(r.turns for r in rollouts)
    if multi_turn:
        local.update({f"tools/{k}": v for k, v in tool_stats(rollouts).items()})
    totals = collectives.sums(local)
    longest = collectives.extremes({"completion/max_length": lengths.max().item()})["completion/max_length"]
    n = totals["samples"]
    mean = totals["reward_sum"] / n
    return {
        "reward/mean": mean,
        "reward/std": max(0.0, totals["reward_sq_sum"] / n - mean**2) ** 0.5,
        **{f"reward/{k.removeprefix('part/')}": v / n for k, v in totals.items() if k.startswith("part/")},
        "completion/mean_length": totals["length_sum"] / n,
        "completion/max_length": float(longest),
        "completion/truncation_rate": totals["truncated"] / n,
        "groups/zero_variance_fraction": totals["zero_variance"] / totals["groups"],
        "groups/dropped_fraction": totals["dropped"] / totals["groups"],
        "reward/verifier_timeouts": float(shared_verifier_pool().timeouts),
        "reward/verifier_timeout_rate": shared_verifier_pool().timeout_rate,
        **(tool_metrics(totals) if multi_turn else {}),
    }


def tool_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Per sample: calls and model turns; per call: the share that ran cleanly, timed out, or could not run (and
    why), over every rank's samples."""
    samples, calls = totals["samples"], totals["tools/calls"]
    counted = [name for name in totals if name.startswith("tools/") and name not in ("tools/calls", "tools/turns")]
    # a step without calls has no per-call shares (0 of 0); its clean share is 0, as no call ran cleanly
    return {
        "tools/calls_per_sample": calls / samples,
        "tools/turns_per_sample": totals["tools/turns"] / samples,
        **{f"{name}_rate": totals[name] / calls if calls else 0.0 for name in counted},
    }
