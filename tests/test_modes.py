"""Modes (M-GRPO and baselines) and TTRL's training subset."""

import re

import pytest
import torch

from megatron_mgrpo.algorithm import MODES, plan_for_mode, select_training_subset


def test_mgrpo_plan():
    plan = plan_for_mode("mgrpo", num_policy=8, num_momentum=4, iqr_filter=True)
    assert plan.use_momentum_model and plan.use_vote and plan.use_iqr_filter
    assert plan.group_size == 12
    assert plan.num_train == 8 and not plan.train_subset
    assert not plan.train_on_momentum_rollouts
    assert plan_for_mode("mgrpo", 8, 4, train_on_momentum_rollouts=True).train_on_momentum_rollouts


def test_srt_plan():
    plan = plan_for_mode("srt", num_policy=8)
    assert not plan.use_momentum_model and plan.use_vote and not plan.use_iqr_filter
    assert plan.group_size == 8 and plan.num_train == 8


def test_ttrl_plan():
    plan = plan_for_mode("ttrl", num_policy=64, num_train=32)
    assert plan.use_vote and not plan.use_momentum_model
    assert plan.group_size == 64
    assert plan.num_train == 32 and plan.train_subset
    assert plan_for_mode("ttrl", num_policy=4).num_train == 4        # default: all M


def test_rlvr_plan():
    plan = plan_for_mode("rlvr", num_policy=4)
    assert not plan.use_vote and not plan.use_momentum_model


def test_plan_is_frozen():
    plan = plan_for_mode("srt", 4)
    with pytest.raises(Exception):
        plan.num_policy = 5


def test_unknown_mode_names_accepted_ones():
    with pytest.raises(ValueError, match=re.escape("mgrpo | srt | ttrl | rlvr")):
        plan_for_mode("grpo", 4)
    assert MODES == ("mgrpo", "srt", "ttrl", "rlvr")


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="mgrpo", num_policy=4, num_momentum=0), "use mode srt"),
    (dict(mode="srt", num_policy=4, num_momentum=2), "must be 0"),
    (dict(mode="ttrl", num_policy=4, num_momentum=2), "must be 0"),
    (dict(mode="rlvr", num_policy=4, num_momentum=1), "must be 0"),
    (dict(mode="srt", num_policy=1), ">= 2"),
    (dict(mode="rlvr", num_policy=1), ">= 2"),
    (dict(mode="mgrpo", num_policy=0, num_momentum=4), ">= 1"),
    (dict(mode="mgrpo", num_policy=4, num_momentum=-1), ">= 0"),
    (dict(mode="ttrl", num_policy=4, num_train=0), r"\[1, num_policy=4\]"),
    (dict(mode="ttrl", num_policy=4, num_train=5), r"\[1, num_policy=4\]"),
    (dict(mode="srt", num_policy=4, num_train=2), "ttrl only"),
    (dict(mode="srt", num_policy=4, train_on_momentum_rollouts=True), "mgrpo only"),
])
def test_invalid_plans(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_for_mode(**kwargs)


def test_mgrpo_one_policy_one_momentum_is_a_group_of_two():
    assert plan_for_mode("mgrpo", 1, 1).group_size == 2


def test_select_training_subset_is_deterministic_sorted_distinct():
    a = select_training_subset(64, 32, torch.Generator().manual_seed(7))
    b = select_training_subset(64, 32, torch.Generator().manual_seed(7))
    c = select_training_subset(64, 32, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (32,)
    assert a.unique().numel() == 32
    assert torch.equal(a, a.sort().values)
    assert 0 <= a.min() and a.max() < 64


def test_select_training_subset_all_and_errors():
    assert select_training_subset(5, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        select_training_subset(5, 0)
    with pytest.raises(ValueError):
        select_training_subset(5, 6)
