"""The M-GRPO method as pure tensor functions: vote, rewards, entropy filter, advantages, loss,
momentum (EMA) update, the modes that switch them, and the per-step collapse diagnostics. No
process groups, no I/O.

The names below load their module on first use (PEP 562), so that reading the mode rules
(`algorithm.modes`, which the config's validation does) does not import torch and every other
module here: a refused config costs no torch import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Name -> the module of this package that defines it.
_WHERE = {
    "group_advantages": "advantages",
    "all_identical": "diagnostics", "entropy_quartiles": "diagnostics",
    "policy_momentum_agreement": "diagnostics", "vote_diagnostics": "diagnostics",
    "vote_margin": "diagnostics",
    "check_momentum": "ema", "ema_step": "ema", "ema_update_": "ema",
    "IQRFilterResult": "entropy_filter", "iqr_entropy_filter": "entropy_filter",
    "trajectory_entropy": "entropy_filter",
    "ImportanceWeights": "loss", "LossStats": "loss", "clipped_surrogate_loss": "loss",
    "kl_low_var": "loss", "truncated_importance_weights": "loss",
    "MODES": "modes", "ModePlan": "modes", "plan_for_mode": "modes",
    "select_training_subset": "modes",
    "binary_rewards": "rewards", "group_binary_rewards": "rewards",
    "VoteResult": "vote", "exact_match": "vote", "majority_vote": "vote",
    "pseudo_labels": "vote",
}

__all__ = sorted(_WHERE, key=str.lower)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from megatron_mgrpo.algorithm.advantages import group_advantages  # noqa: F401
    from megatron_mgrpo.algorithm.diagnostics import (  # noqa: F401
        all_identical,
        entropy_quartiles,
        policy_momentum_agreement,
        vote_diagnostics,
        vote_margin,
    )
    from megatron_mgrpo.algorithm.ema import check_momentum, ema_step, ema_update_  # noqa: F401
    from megatron_mgrpo.algorithm.entropy_filter import (  # noqa: F401
        IQRFilterResult,
        iqr_entropy_filter,
        trajectory_entropy,
    )
    from megatron_mgrpo.algorithm.loss import (  # noqa: F401
        ImportanceWeights,
        LossStats,
        clipped_surrogate_loss,
        kl_low_var,
        truncated_importance_weights,
    )
    from megatron_mgrpo.algorithm.modes import (  # noqa: F401
        MODES,
        ModePlan,
        plan_for_mode,
        select_training_subset,
    )
    from megatron_mgrpo.algorithm.rewards import binary_rewards, group_binary_rewards  # noqa
    from megatron_mgrpo.algorithm.vote import (  # noqa: F401
        VoteResult,
        exact_match,
        majority_vote,
        pseudo_labels,
    )
