"""Generation engines behind one small interface, so a stage never depends on how rollouts are produced."""

from thinkforge.rollout.base import Rollout, RolloutEngine, SamplingConfig
from thinkforge.rollout.hf import HFEngine

__all__ = ["Rollout", "RolloutEngine", "SamplingConfig", "HFEngine"]
