"""Trajectory entropy and the IQR entropy filter (Eq. 2)."""

import math

import pytest
import torch

from megatron_mgrpo.algorithm import iqr_entropy_filter, trajectory_entropy


def test_trajectory_entropy_masked_mean():
    h = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [1.0, 1.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    # row 0: (1 + 2) / 2; row 1: no tokens -> 0; row 2: 6 / 3
    assert trajectory_entropy(h, mask).tolist() == [1.5, 0.0, 2.0]


def test_trajectory_entropy_ignores_garbage_in_padding():
    h = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    mask = torch.tensor([[True, False], [False, True]])
    assert trajectory_entropy(h, mask).tolist() == [1.0, 2.0]


def test_trajectory_entropy_shape_mismatch():
    with pytest.raises(ValueError):
        trajectory_entropy(torch.zeros(2, 3), torch.ones(2, 2))


def test_iqr_drops_exactly_the_known_outlier():
    # sorted: 0.1 0.9 1.0 1.1 1.2 1.3 1.4 2.0 (n = 8, linear interpolation, numpy's default)
    # Q1: 0.25 * 7 = 1.75 -> 0.9 + 0.75 * (1.0 - 0.9) = 0.975
    # Q3: 0.75 * 7 = 5.25 -> 1.3 + 0.25 * (1.4 - 1.3) = 1.325
    # IQR = 0.35, fence = 0.975 - 0.75 * 0.35 = 0.7125 -> only 0.1 is below
    h = torch.tensor([1.2, 0.1, 2.0, 1.0, 0.9, 1.4, 1.1, 1.3])
    f = iqr_entropy_filter(h, k=0.75)
    assert f.q1 == pytest.approx(0.975)
    assert f.q3 == pytest.approx(1.325)
    assert f.iqr == pytest.approx(0.35)
    assert f.fence == pytest.approx(0.7125)
    assert f.keep.tolist() == [True, False, True, True, True, True, True, True]
    assert f.num_dropped == f.num_dropped_by_iqr == 1
    assert f.num_dropped_by_floor == 0
    assert f.num_valid == 8


@pytest.mark.parametrize("k, fence, dropped", [
    # sorted: 0.1 0.72 1.0 1.1 1.2 1.3 1.4 2.0
    # Q1 = 0.72 + 0.75 * 0.28 = 0.93, Q3 = 1.325, IQR = 0.395
    (0.75, 0.93 - 0.75 * 0.395, [0.1]),          # 0.63375: 0.72 just survives
    (0.0, 0.93, [0.1, 0.72]),                    # fence = Q1
    (1.5, 0.93 - 1.5 * 0.395, [0.1]),            # 0.3375
    (3.0, 0.93 - 3.0 * 0.395, []),               # -0.255
])
def test_iqr_k_moves_the_fence(k, fence, dropped):
    values = [1.0, 0.72, 2.0, 0.1, 1.2, 1.3, 1.1, 1.4]
    f = iqr_entropy_filter(torch.tensor(values), k=k)
    assert f.fence == pytest.approx(fence)
    assert sorted(v for v, kept in zip(values, f.keep.tolist()) if not kept) == dropped


def test_iqr_spread_batch_drops_nothing():
    # 1..8: Q1 = 1 + 1.75 = 2.75, Q3 = 6.25, IQR = 3.5, fence = 2.75 - 2.625 = 0.125 < 1
    f = iqr_entropy_filter(torch.arange(1.0, 9.0))
    assert f.fence == pytest.approx(0.125)
    assert f.keep.all()
    assert f.num_dropped == 0


def test_iqr_equal_entropies_drop_nothing():
    # IQR = 0, fence = Q1 = every value; the comparison is strict
    f = iqr_entropy_filter(torch.full((6,), 0.3))
    assert f.iqr == 0.0
    assert f.keep.all()


def test_iqr_statistics_use_valid_rows_only():
    # valid: 0.1 1.0 1.1 1.2 1.3 (n = 5): Q1 = x[1] = 1.0, Q3 = x[3] = 1.2, fence = 1.0 - 0.15
    # (had the invalid 5.0 been counted, Q1 would be 1.0 + 0.25 * 0.1 = 1.025)
    h = torch.tensor([0.1, 5.0, 1.0, 1.1, 1.2, 1.3])
    valid = torch.tensor([True, False, True, True, True, True])
    f = iqr_entropy_filter(h, valid=valid)
    assert f.q1 == pytest.approx(1.0)
    assert f.q3 == pytest.approx(1.2)
    assert f.fence == pytest.approx(0.85)
    assert f.keep.tolist() == [False, False, True, True, True, True]
    assert f.num_valid == 5
    assert f.num_dropped == 1            # the invalid row is not counted as dropped


def test_entropy_floor_catches_a_collapsed_batch():
    # Q1 = 0.01 + 0.75 * 0.01 = 0.0175, Q3 = 0.0325, IQR = 0.015, fence = 0.00625: IQR keeps all
    h = torch.tensor([0.01, 0.02, 0.03, 0.04])
    f = iqr_entropy_filter(h, entropy_floor=0.025)
    assert f.fence == pytest.approx(0.00625)
    assert f.num_dropped_by_iqr == 0
    assert f.dropped_by_floor.tolist() == [True, True, False, False]
    assert f.num_dropped_by_floor == 2
    assert f.keep.tolist() == [False, False, True, True]
    assert f.num_dropped == 2


def test_floor_and_fence_overlap_counted_once():
    h = torch.tensor([1.2, 0.1, 2.0, 1.0, 0.9, 1.4, 1.1, 1.3])   # fence 0.7125, drops 0.1
    f = iqr_entropy_filter(h, entropy_floor=0.95)                 # floor drops 0.1 and 0.9
    assert f.num_dropped_by_iqr == 1
    assert f.num_dropped_by_floor == 2
    assert f.num_dropped == 2


def test_fewer_than_two_valid():
    one = iqr_entropy_filter(torch.tensor([0.5, 0.0]), valid=torch.tensor([True, False]))
    assert one.keep.tolist() == [True, False]
    none = iqr_entropy_filter(torch.tensor([0.5, 0.0]), valid=torch.tensor([False, False]))
    assert none.keep.tolist() == [False, False]
    assert math.isnan(none.q1) and math.isnan(none.fence)
    assert none.num_dropped == 0


def test_negative_k_rejected():
    with pytest.raises(ValueError):
        iqr_entropy_filter(torch.ones(4), k=-0.1)


def test_filter_does_not_touch_gradients():
    h = torch.tensor([0.1, 1.0, 1.1, 1.2], requires_grad=True)
    f = iqr_entropy_filter(h)
    assert not f.keep.requires_grad
