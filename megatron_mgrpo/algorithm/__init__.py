"""The M-GRPO method as pure tensor functions: vote, rewards, entropy filter, advantages, loss,
momentum (EMA) update, and the modes that switch them. No process groups, no I/O."""

from megatron_mgrpo.algorithm.advantages import group_advantages
from megatron_mgrpo.algorithm.ema import check_momentum, ema_step, ema_update_
from megatron_mgrpo.algorithm.entropy_filter import (
    IQRFilterResult,
    iqr_entropy_filter,
    trajectory_entropy,
)
from megatron_mgrpo.algorithm.loss import LossStats, clipped_surrogate_loss, kl_low_var
from megatron_mgrpo.algorithm.modes import MODES, ModePlan, plan_for_mode, select_training_subset
from megatron_mgrpo.algorithm.rewards import binary_rewards, group_binary_rewards
from megatron_mgrpo.algorithm.vote import VoteResult, exact_match, majority_vote, pseudo_labels

__all__ = [
    "MODES",
    "IQRFilterResult",
    "LossStats",
    "ModePlan",
    "VoteResult",
    "binary_rewards",
    "check_momentum",
    "clipped_surrogate_loss",
    "ema_step",
    "ema_update_",
    "exact_match",
    "group_advantages",
    "group_binary_rewards",
    "iqr_entropy_filter",
    "kl_low_var",
    "majority_vote",
    "plan_for_mode",
    "pseudo_labels",
    "select_training_subset",
    "trajectory_entropy",
]
