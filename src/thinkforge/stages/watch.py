"""Signals in a GRPO run's own numbers that a user should see while it runs, not find in curves.png afterwards."""

from __future__ import annotations

import statistics
from typing import Any

#: knobs that slow or stop an entropy collapse, named in the warning
COLLAPSE_KNOBS = (
    "a lower optim.lr, or one that decays (optim.min_lr_ratio)",
    "a KL term to the start (stage.beta, e.g. 0.01)",
    "clip-higher (stage.epsilon_high above stage.epsilon_low)",
    "training only the top-entropy tokens (stage.top_entropy_quantile=0.2)",
)


class EntropyCollapseWatch:
    """Entropy collapse: the policy's token entropy falls below `entropy_share` of where it started while its score
    falls from its best; the policy has settled on fewer answers and is losing right ones (a pattern RL users
    report often, e.g. verl#5953). Two scores can show the fall:

    - the training reward, as means over `window` steps. A step's reward is the mean of a few dozen samples, so its
      best window mean sits well above its level by chance: the fall must be `reward_drop` of the best and three
      standard errors of a difference of two window means, the noise estimated from the run's own steps;
    - the held-out points (greedy, the same prompts each time): a fall of `heldout_drop` below the best point.

    Warns once per run; its state travels in checkpoints, so a resumed run neither repeats the warning nor forgets
    the start."""

    def __init__(
        self, entropy_share: float = 0.5, reward_drop: float = 0.1, heldout_drop: float = 0.02, window: int = 10
    ) -> None:
        self.entropy_share, self.reward_drop, self.heldout_drop = entropy_share, reward_drop, heldout_drop
        self.window = window
        self.start_entropy: float | None = None
        self.peak_reward, self.peak_step = float("-inf"), 0
        self.entropies: list[float] = []
        self.rewards: list[float] = []
        self.best_heldout, self.best_heldout_step = float("-inf"), 0
        self.warned = False

    def collapsed(self) -> float | None:
        """The entropy's mean over the last window when it is below `entropy_share` of its start, else None."""
        if self.start_entropy is None:
            return None
        entropy = sum(self.entropies[-self.window :]) / self.window
        return entropy if entropy < self.entropy_share * self.start_entropy else None

    def update(self, step: int, entropy: float, reward: float) -> str | None:
        """This step's mean token entropy and mean reward; the warning, the first time the pattern shows."""
        self.entropies.append(entropy)
        self.rewards.append(reward)
        if len(self.rewards) < self.window:
            return None
        reward_now = sum(self.rewards[-self.window :]) / self.window
        if self.start_entropy is None:
            self.start_entropy = sum(self.entropies[: self.window]) / self.window
        if reward_now > self.peak_reward:
            self.peak_reward, self.peak_step = reward_now, step
        differences = [after - before for before, after in zip(self.rewards, self.rewards[1:])]
        noise = statistics.pstdev(differences) / 2**0.5  # per step, robust to the reward's own trend
        fall = self.peak_reward - reward_now
        significant = fall > max(self.reward_drop * self.peak_reward, 3 * noise * (2 / self.window) ** 0.5)
        entropy_now = self.collapsed()
        if self.warned or entropy_now is None or not significant:
            return None
        return self.warning(
            step,
            entropy_now,
            f"the reward fell from its best {self.peak_reward:.3g} (step {self.peak_step}) to {reward_now:.3g} "
            f"(means over {self.window} steps)",
        )

    def heldout_point(self, step: int, accuracy: float) -> str | None:
        """A held-out point's greedy pass@1; the warning, the first time the pattern shows."""
        if accuracy > self.best_heldout:
            self.best_heldout, self.best_heldout_step = accuracy, step
            return None
        entropy_now = self.collapsed()
        if self.warned or entropy_now is None or accuracy >= self.best_heldout - self.heldout_drop:
            return None
        return self.warning(
            step,
            entropy_now,
            f"held-out pass@1 fell from {self.best_heldout:.1%} (step {self.best_heldout_step}) to {accuracy:.1%}",
        )

    def warning(self, step: int, entropy: float, fall: str) -> str:
        self.warned = True
        start = self.start_entropy or entropy
        return (
            f"step {step}: the policy's entropy has fallen to {entropy:.3g} ({entropy / start:.0%} of its start, "
            f"{start:.3g}) and {fall}: the policy is collapsing onto fewer answers. What slows it: "
            f"{'; '.join(COLLAPSE_KNOBS)}. heldout.keep_best=accuracy keeps the weights from before the fall."
        )

    def state_dict(self) -> dict[str, Any]:
        """What it has seen (its settings come from its constructor)."""
        settings = ("entropy_share", "reward_drop", "heldout_drop", "window")
        return {name: value for name, value in vars(self).items() if name not in settings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
