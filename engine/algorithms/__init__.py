"""One object per alignment method. Each has `step(batch) -> dict[str, float]` that runs the
forward and backward of one packed micro-batch inside the caller's own loop (the caller owns
the optimizer), and `loss(batch)` for callers that want the loss tensor itself.
"""

from .base import Algorithm
from .dpo import DPO
from .kto import KTO, kto_sequences
from .reference_free import ORPO, SimPO
from .reward_model import RewardModel, TextRewardModel, load_reward_model
from .sft import SFT

__all__ = ["Algorithm", "SFT", "RewardModel", "TextRewardModel", "load_reward_model", "DPO", "KTO", "kto_sequences", "ORPO", "SimPO"]
