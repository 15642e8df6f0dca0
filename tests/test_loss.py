"""Clipped surrogate, low-variance KL and entropy bonus: values and gradients by hand."""

import math

import pytest
import torch

from megatron_mgrpo.algorithm import clipped_surrogate_loss, kl_low_var

LN = math.log
NAN = float("nan")


def case():
    """A 2 x 3 batch, clip 0.2 (ratio clipped to [0.8, 1.2]), 5 masked tokens.

    row 0, A = +1, ratios [1, 1.5, 0.5]:
        token 0: -min(1, 1) = -1                          grad d/dlogp = -A*r = -1
        token 1: -min(1.5, 1.2) = -1.2   (clipped high)   grad 0
        token 2: -min(0.5, 0.8) = -0.5                    grad -0.5
    row 1, A = -2, ratios [0.5, 1.5, padding]:
        token 0: -min(-1.0, -1.6) = 1.6  (clipped low)    grad 0
        token 1: -min(-3.0, -2.4) = 3.0                   grad -A*r = 3.0
    sum = -1 - 1.2 - 0.5 + 1.6 + 3.0 = 1.9; loss = 1.9 / 5 = 0.38
    token-mean gradients: [[-0.2, 0, -0.1], [0, 0.6, 0]]
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]])
    log_ratio = torch.tensor([[0.0, LN(1.5), LN(0.5)], [LN(0.5), LN(1.5), 0.0]])
    logprobs = (old + log_ratio)
    logprobs[1, 2] = NAN                       # padding may hold anything
    logprobs.requires_grad_(True)
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logprobs, old, advantages, mask


def test_pg_loss_value_and_gradient():
    logprobs, old, adv, mask = case()
    loss, stats = clipped_surrogate_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(0.38, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.2, 0.0, -0.1], [0.0, 0.6, 0.0]]))
    assert stats.pg_loss.item() == pytest.approx(0.38, abs=1e-6)
    assert stats.clip_frac.item() == pytest.approx(2 / 5)        # the two clipped tokens
    assert stats.ratio_mean.item() == pytest.approx((1 + 1.5 + 0.5 + 0.5 + 1.5) / 5)
    # approx_kl = mean(r - 1 - ln r): 0, 2 x (0.5 - ln 1.5), 2 x (-0.5 + ln 2)
    expected = (2 * (0.5 - LN(1.5)) + 2 * (-0.5 + LN(2))) / 5
    assert stats.approx_kl.item() == pytest.approx(expected, abs=1e-6)
    assert stats.num_tokens.item() == 5
    assert stats.kl.item() == 0.0 and stats.entropy.item() == 0.0


@pytest.mark.parametrize("clip_low, clip_high, loss, grad, clip_frac", [
    # high 0.6: row 0 token 1 (ratio 1.5 < 1.6) is unclipped: -1.5, grad -1.5 / 5 = -0.3;
    # low 0.2: row 1 token 0 (ratio 0.5 < 0.8, A < 0) stays clipped at 1.6, grad 0.
    # sum = -1 - 1.5 - 0.5 + 1.6 + 3.0 = 1.6 -> 0.32
    (0.2, 0.6, 0.32, [[-0.2, -0.3, -0.1], [0.0, 0.6, 0.0]], 0.2),
    # low 0.6: row 1 token 0 (ratio 0.5 > 0.4) is unclipped: -min(-1, -0.8) = 1.0,
    # grad -A * r / 5 = 0.2; high 0.2: row 0 token 1 stays clipped at -1.2, grad 0.
    # sum = -1 - 1.2 - 0.5 + 1.0 + 3.0 = 1.3 -> 0.26
    (0.6, 0.2, 0.26, [[-0.2, 0.0, -0.1], [0.2, 0.6, 0.0]], 0.2),
    # both 0.6: nothing clipped; sum = -1 - 1.5 - 0.5 + 1.0 + 3.0 = 1.0 -> 0.2
    (0.6, 0.6, 0.2, [[-0.2, -0.3, -0.1], [0.2, 0.6, 0.0]], 0.0),
])
def test_asymmetric_clip(clip_low, clip_high, loss, grad, clip_frac):
    logprobs, old, adv, mask = case()
    value, stats = clipped_surrogate_loss(logprobs, old, adv, mask, clip_low=clip_low,
                                          clip_high=clip_high)
    assert value.item() == pytest.approx(loss, abs=1e-6)
    value.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor(grad))
    assert stats.clip_frac.item() == pytest.approx(clip_frac)


def test_kl_term():
    # ref - logp per token: row 0 [0, ln 2, 0], row 1 [ln 0.5, 0, pad]
    # k3 = e^d - d - 1: ln 2 -> 1 - ln 2 = 0.306853, ln 0.5 -> ln 2 - 0.5 = 0.193147; sum 0.5
    # kl mean = 0.5 / 5 = 0.1; loss = 0.38 + 0.5 * 0.1 = 0.43
    # kl grad per token: kl_coef / 5 * (1 - e^d): ln 2 -> -0.1, ln 0.5 -> +0.05
    logprobs, old, adv, mask = case()
    d = torch.tensor([[0.0, LN(2), 0.0], [LN(0.5), 0.0, NAN]])
    ref = logprobs.detach() + d
    ref.requires_grad_(True)
    old.requires_grad_(True)
    loss, stats = clipped_surrogate_loss(logprobs, old, adv, mask, ref_logprobs=ref,
                                         kl_coef=0.5)
    assert loss.item() == pytest.approx(0.43, abs=1e-6)
    assert stats.kl.item() == pytest.approx(0.1, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logprobs.grad,
                               torch.tensor([[-0.2, -0.1, -0.1], [0.05, 0.6, 0.0]]))
    assert ref.grad is None and old.grad is None        # constants


def test_entropy_bonus():
    # mean entropy over 5 tokens = (1 + 2 + 3 + 4 + 5) / 5 = 3; loss = 0.38 - 0.1 * 3 = 0.08
    logprobs, old, adv, mask = case()
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]], requires_grad=True)
    loss, stats = clipped_surrogate_loss(logprobs, old, adv, mask, entropy=entropy,
                                         entropy_coef=0.1)
    assert loss.item() == pytest.approx(0.08, abs=1e-6)
    assert stats.entropy.item() == pytest.approx(3.0)
    loss.backward()
    torch.testing.assert_close(entropy.grad,
                               torch.tensor([[-0.02, -0.02, -0.02], [-0.02, -0.02, 0.0]]))


def test_advantages_per_token_match_per_trajectory():
    logprobs, old, adv, mask = case()
    a, _ = clipped_surrogate_loss(logprobs, old, adv, mask)
    b, _ = clipped_surrogate_loss(logprobs, old, adv[:, None].expand(2, 3), mask)
    assert a.item() == pytest.approx(b.item())


def test_global_num_tokens_makes_microbatches_sum_to_the_batch():
    logprobs, old, adv, mask = case()
    full, _ = clipped_surrogate_loss(logprobs, old, adv, mask)
    full.backward()
    full_grad = logprobs.grad.clone()
    logprobs.grad = None
    # two microbatches of one row each (3 and 2 tokens), both divided by the global 5
    parts = [clipped_surrogate_loss(logprobs[i:i + 1], old[i:i + 1], adv[i:i + 1],
                                    mask[i:i + 1], num_tokens=5.0)[0] for i in range(2)]
    total = parts[0] + parts[1]
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    total.backward()
    torch.testing.assert_close(logprobs.grad, full_grad)
    # metrics stay per-call means: row 0 alone has pg_loss (-1 - 1.2 - 0.5) / 3
    _, stats = clipped_surrogate_loss(logprobs[:1], old[:1], adv[:1], mask[:1], num_tokens=5.0)
    assert stats.pg_loss.item() == pytest.approx(-2.7 / 3, abs=1e-6)


def test_empty_mask_is_zero_not_nan():
    logprobs, old, adv, _ = case()
    loss, stats = clipped_surrogate_loss(logprobs, old, adv, torch.zeros(2, 3))
    assert loss.item() == 0.0
    assert stats.clip_frac.item() == 0.0


def test_bf16_inputs_are_computed_in_fp32():
    logprobs, old, adv, mask = case()
    loss, _ = clipped_surrogate_loss(logprobs.detach().bfloat16(), old.bfloat16(), adv, mask)
    assert loss.dtype == torch.float32


def test_argument_errors():
    logprobs, old, adv, mask = case()
    with pytest.raises(ValueError):
        clipped_surrogate_loss(logprobs, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError):
        clipped_surrogate_loss(logprobs, old, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError):
        clipped_surrogate_loss(logprobs, old, adv, mask, clip_low=1.0)
    with pytest.raises(ValueError):
        clipped_surrogate_loss(logprobs, old, adv, mask, num_tokens=0)


def test_kl_low_var_values_and_gradient():
    logp = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0 + LN(2), -1.0 + LN(0.5)])
    kl = kl_low_var(logp, ref)
    # e^d - d - 1 for d = 0, ln 2, ln 0.5
    torch.testing.assert_close(kl, torch.tensor([0.0, 1 - LN(2), LN(2) - 0.5]))
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -1.0, 0.5]))   # 1 - e^d


def test_kl_low_var_is_clamped():
    # d = +-50 is clamped to +-20 before exp: e^20 - 21 and e^-20 + 19, both then clamped to 10
    kl = kl_low_var(torch.tensor([0.0, 0.0]), torch.tensor([50.0, -50.0]))
    assert kl.tolist() == [10.0, 10.0]
    # d = -5 is inside both clamps: e^-5 + 4
    assert kl_low_var(torch.tensor([0.0]), torch.tensor([-5.0])).item() == pytest.approx(
        math.exp(-5) + 4)
