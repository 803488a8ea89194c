"""alignfuse.engine: the thin engine on top of alignfuse.kernels.

Packing, the packed model forward, rollouts (vLLM / HF), one algorithm object per method
(SFT, RewardModel, DPO, KTO, PPO, GRPO) with `step(batch)` for the caller's own loop, and
a ready loop behind the `alignfuse` command.
"""

from .packing import PackedBatch, pack, padding_efficiency, plan_micro_batches  # noqa: E402,F401
from .data import (DataError, DataFormatError, DataWarning, KTORecord,  # noqa: E402,F401
                   PreferenceRecord, RankedRecord, ScoredRecord, SFTRecord, TokenizedDataset,
                   load_dpo, load_kto, load_ranked, load_scored, load_sft, tokenize_records)
from .rollout import HFRollout, Rollout, Sample, SamplingConfig, VLLMRollout  # noqa: E402,F401
from .algorithms.grpo import GRPO, RolloutBatch  # noqa: E402,F401
from .algorithms.ppo import PPO  # noqa: E402,F401
from .forward import (ModelCheckError, disable_dropout,  # noqa: E402,F401
                      final_hidden_states, precompute_reference_logps, runs_padded,
                      token_logprobs, verify_packed_model)
from .algorithms import (DPO, KTO, ORPO, SFT, RewardModel, SimPO,  # noqa: E402,F401
                         TextRewardModel, load_reward_model)
from .loop import TrainConfig, make_config, train  # noqa: E402,F401
from .precision import MasterWeights  # noqa: E402,F401
from .tasks import addition_preferences, arithmetic_problems, arithmetic_reward  # noqa: E402,F401
from .lora import BaseReference  # noqa: E402,F401
