"""The momentum model's EMA (Eq. 1)."""

import pytest
import torch

from megatron_mgrpo.algorithm import ema_step, ema_update_


def test_ema_step_by_hand():
    # 0.9 * 2 + 0.1 * 12 = 3
    out = ema_step(torch.tensor([2.0]), torch.tensor([12.0]), 0.9)
    assert out.item() == pytest.approx(3.0)
    assert out.dtype == torch.float32


def test_k_steps_match_the_closed_form():
    # e_K = m^K e_0 + (1 - m) * sum_{j=1..K} m^(K-j) p_j, computed in float64
    m, steps = 0.9, 25
    gen = torch.Generator().manual_seed(0)
    e0 = torch.randn(5, 3, generator=gen)
    ps = [torch.randn(5, 3, generator=gen) for _ in range(steps)]
    ema = [e0.clone()]
    for p in ps:
        ema_update_(ema, [p], m)
    closed = m ** steps * e0.double() + (1 - m) * sum(
        m ** (steps - j) * p.double() for j, p in enumerate(ps, start=1))
    torch.testing.assert_close(ema[0].double(), closed, atol=1e-6, rtol=0)


def test_constant_target_converges_geometrically():
    # e_K = p + (e_0 - p) m^K: 0 -> 1 with m = 0.5 after 3 steps: 1 - 0.125
    ema = [torch.zeros(2)]
    for _ in range(3):
        ema_update_(ema, [torch.ones(2)], 0.5)
    assert ema[0].tolist() == [0.875, 0.875]


def test_in_place_over_a_list_with_bf16_params():
    ema = [torch.full((4,), 1.0), torch.full((2, 2), -1.0)]
    params = [torch.full((4,), 3.0, dtype=torch.bfloat16),
              torch.full((2, 2), 1.0, dtype=torch.bfloat16)]
    before = [e.data_ptr() for e in ema]
    expected = [ema_step(e, p, 0.75) for e, p in zip(ema, params)]
    ema_update_(ema, params, 0.75)
    assert [e.data_ptr() for e in ema] == before                # updated in place
    assert all(e.dtype == torch.float32 for e in ema)
    for e, x in zip(ema, expected):
        torch.testing.assert_close(e, x)
    assert ema[0].tolist() == [1.5] * 4                          # 0.75 * 1 + 0.25 * 3


def test_momentum_zero_copies_the_policy():
    ema = [torch.zeros(3)]
    ema_update_(ema, [torch.tensor([1.0, 2.0, 3.0])], 0.0)
    assert ema[0].tolist() == [1.0, 2.0, 3.0]


def test_params_with_grad_are_fine_and_untouched():
    p = torch.ones(3, requires_grad=True)
    ema = [torch.zeros(3)]
    ema_update_(ema, [p], 0.5)
    assert not ema[0].requires_grad
    assert p.grad is None


@pytest.mark.parametrize("m", [1.0, -0.1, 1.5])
def test_momentum_out_of_range(m):
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(1)], [torch.zeros(1)], m)
    with pytest.raises(ValueError):
        ema_step(torch.zeros(1), torch.zeros(1), m)


def test_ema_must_be_fp32():
    with pytest.raises(TypeError):
        ema_update_([torch.zeros(2, dtype=torch.bfloat16)], [torch.zeros(2)], 0.99)


def test_mismatched_lists():
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)], 0.9)
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.9)
    ema_update_([], [], 0.9)                                     # nothing to do


def test_bf16_ema_stalls_which_is_why_it_is_fp32():
    # The momentum model starts at 1.0, the policy sits at 1.5, m = 0.99.
    # bf16 (8 significant bits): 1.0 * 0.99 rounds to 0.98828125; + 0.01 * 1.5 = 1.00328 rounds
    # back to 1.0 (the spacing above 1 is 2^-7 = 0.0078). It never moves.
    m, steps = 0.99, 100
    policy = torch.full((4,), 1.5, dtype=torch.bfloat16)
    ema_bf16 = torch.ones(4, dtype=torch.bfloat16)
    for _ in range(steps):
        ema_bf16.mul_(m).add_(policy, alpha=1 - m)
    assert ema_bf16.tolist() == [1.0] * 4
    # fp32 follows the closed form 1.5 - 0.5 * 0.99^100 = 1.3170
    ema = [torch.ones(4)]
    for _ in range(steps):
        ema_update_(ema, [policy], m)
    assert ema[0].tolist() == pytest.approx([1.5 - 0.5 * m ** steps] * 4, abs=1e-5)
