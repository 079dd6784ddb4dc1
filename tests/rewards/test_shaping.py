"""DeepSeek-R1's language-consistency reward: the share of the chain of thought's words in the target script."""

from __future__ import annotations

import pytest
from conftest import compose_config

from thinkforge.config import validate
from thinkforge.errors import ConfigError
from thinkforge.rewards.shaping import RewardModel, Sample, language_consistency_reward


def sample(completion: str) -> Sample:
    return Sample(completion, "7", 20, False, True, 96)


def test_mixed_script_thinking_scores_its_share_of_target_words():
    english = sample("<think>\nFirst add 3 and 4 to get 7.\n</think>\n\\boxed{7}")
    # 4 Latin words (numbers are not words) and 5 Chinese characters, each a word of its own
    mixed = sample("<think>\nFirst add 3 and 4 先加三和四 get 7.\n</think>\nThe answer is \\boxed{7}")
    assert language_consistency_reward(english) == 1.0
    assert language_consistency_reward(mixed) == pytest.approx(4 / 9)
    assert language_consistency_reward(mixed, language="zh") == pytest.approx(5 / 9)
    assert language_consistency_reward(sample("<think>\nСначала сложим three\n</think>"), language="ru") == 2 / 3
    # only the chain of thought counts: an English answer after a Chinese one does not help
    assert language_consistency_reward(sample("<think>\n先加三和四\n</think>\nSo the answer is 7")) == 0.0
    assert language_consistency_reward(sample("<think>\n3 + 4 = 7\n</think>\n\\boxed{7}")) == 1.0, "no words"


def test_the_r1_reward_preset_composes_with_a_weighted_language_term():
    cfg = validate(compose_config("stage=grpo", "reward@stage.reward=r1"))
    reward = RewardModel(cfg.stage.reward)
    total, parts = reward(sample("<think>\nadd 3 and 4 先加\n</think>\n\\boxed{7}"))
    assert parts["language_consistency"] == pytest.approx(2 / 4)  # add, and; 先, 加
    assert total == pytest.approx(1.0 + 0.5 + 0.1 * 2 / 4)
    with pytest.raises(ConfigError, match="language"):
        validate(
            compose_config("stage=grpo", "reward@stage.reward=r1", "stage.reward.language_consistency.language=xx")
        )
