"""GRPO group advantages, with and without the filter's keep mask."""

import math

import pytest
import torch

from megatron_mgrpo.algorithm import group_advantages

EPS = 1e-6
S3 = math.sqrt(1 / 3)      # unbiased std of {1, 0, 0, 1} and of {1, 1, 0}


def check(advantages, expected):
    torch.testing.assert_close(advantages, torch.tensor(expected), atol=1e-6, rtol=0)


def test_hand_computed_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                      [1.0, 1.0, 1.0, 1.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [1.0, 0.0, 0.0, 0.0]])
    a = group_advantages(r, eps=EPS)
    # row 0: mean 0.5, unbiased var (4 * 0.25) / 3 = 1/3 -> +-0.5 / sqrt(1/3) = +-0.866
    hi = 0.5 / (S3 + EPS)
    check(a[0], [hi, -hi, -hi, hi])
    # rows 1, 2: zero variance (all agree / no signal) -> exactly 0, no NaN
    assert a[1].tolist() == [0.0] * 4
    assert a[2].tolist() == [0.0] * 4
    # row 3: mean 0.25, var (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5 -> 1.5, -0.5
    # (a population std, sqrt(0.1875) = 0.433, would give 1.732)
    check(a[3], [0.75 / (0.5 + EPS)] + [-0.25 / (0.5 + EPS)] * 3)
    assert a.dtype == torch.float32


def test_without_std_normalisation():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    check(group_advantages(r, normalize_std=False), [[0.75, -0.25, -0.25, -0.25]])


def test_constant_group_is_exactly_zero_despite_rounding():
    # mean of three 0.1s is not exactly 0.1 in floating point; the result must still be 0
    r = torch.tensor([[0.1, 0.1, 0.1]])
    assert group_advantages(r).tolist() == [[0.0, 0.0, 0.0]]


def test_keep_mask_filter_before_normalisation():
    r = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    keep = torch.tensor([[True, True, True, False]])
    # stats over kept {1, 1, 0}: mean 2/3, var ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3
    a = group_advantages(r, keep, eps=EPS, filter_before_normalization=True)
    check(a, [[(1 / 3) / (S3 + EPS), (1 / 3) / (S3 + EPS),
                                  -(2 / 3) / (S3 + EPS), 0.0]])
    assert a[0, 3].item() == 0.0


def test_keep_mask_filter_after_normalisation():
    r = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    keep = torch.tensor([[True, True, True, False]])
    # stats over all {1, 1, 0, 0}: mean 0.5, var 1/3; the dropped one still gets exactly 0
    a = group_advantages(r, keep, eps=EPS, filter_before_normalization=False)
    check(a, [[0.5 / (S3 + EPS), 0.5 / (S3 + EPS), -0.5 / (S3 + EPS), 0.0]])
    assert a[0, 3].item() == 0.0


def test_one_kept_member():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    keep = torch.tensor([[True, False, False, False]])
    # before: a single kept reward has no std -> 0
    assert group_advantages(r, keep).tolist() == [[0.0] * 4]
    # after: the full group's baseline (mean 0.25, std 0.5) still defines it
    a = group_advantages(r, keep, eps=EPS, filter_before_normalization=False)
    check(a, [[0.75 / (0.5 + EPS), 0.0, 0.0, 0.0]])


def test_kept_members_agree_but_group_does_not():
    r = torch.tensor([[1.0, 1.0, 0.0]])
    keep = torch.tensor([[True, True, False]])
    assert group_advantages(r, keep).tolist() == [[0.0, 0.0, 0.0]]        # kept {1, 1}: constant
    a = group_advantages(r, keep, eps=EPS, filter_before_normalization=False)
    check(a, [[(1 / 3) / (S3 + EPS), (1 / 3) / (S3 + EPS), 0.0]])


def test_momentum_columns_vote_but_get_no_gradient():
    # G = M + N = 2 + 2; only the policy's two columns are trained
    r = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    keep = torch.tensor([[True, True, False, False]])
    a = group_advantages(r, keep, eps=EPS)
    # stats over {1, 0}: mean 0.5, unbiased std sqrt(0.5)
    s = math.sqrt(0.5)
    check(a, [[0.5 / (s + EPS), -0.5 / (s + EPS), 0.0, 0.0]])


def test_nothing_kept_is_zero_not_nan():
    r = torch.tensor([[1.0, 0.0]])
    for before in (True, False):
        a = group_advantages(r, torch.zeros(1, 2, dtype=torch.bool),
                             filter_before_normalization=before)
        assert a.tolist() == [[0.0, 0.0]]


def test_group_of_one():
    assert group_advantages(torch.tensor([[1.0], [0.0]])).tolist() == [[0.0], [0.0]]


def test_shape_errors():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
