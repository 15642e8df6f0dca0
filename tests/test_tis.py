"""Truncated importance weights (decoupled PPO + TIS): weights, loss and gradient by hand; the
loss is today's where behaviour equals proximal and bit for bit today's without `tis_cap`."""

import math

import pytest
import torch

from megatron_mgrpo.algorithm import clipped_surrogate_loss, truncated_importance_weights
from megatron_mgrpo.config import ConfigError, load_config
from megatron_mgrpo.config.schema import AlgorithmConfig
from megatron_mgrpo.update import make_loss_fn
from tests.distributed import run_workers

LN = math.log
NAN = float("nan")
SMOKE = "examples/tiny/smoke.yaml"


def case():
    """tests/test_loss.py's 2 x 3 batch (clip 0.2, 5 masked tokens, A = [+1, -2], PPO ratios
    [[1, 1.5, 0.5], [0.5, 1.5, pad]]), plus behaviour log-probs chosen so that the raw
    weights pi_prox / pi_behaviour are [[1, 0.5, 3], [1.8, 1.5, pad]]:

    cap 2: weights [[1, 0.5, 2], [1.8, 1.5, 0]], one of 5 tokens truncated (3 -> 2);
        mean = (1 + 0.5 + 2 + 1.8 + 1.5) / 5 = 6.8 / 5 = 1.36, max = 2.
    plain per-token terms l_t (test_loss.py): [[-1, -1.2, -0.5], [1.6, 3.0]]
    weighted: -1 * 1 - 1.2 * 0.5 - 0.5 * 2 + 1.6 * 1.8 + 3.0 * 1.5
            = -1 - 0.6 - 1 + 2.88 + 4.5 = 4.78;  loss = 4.78 / 5 = 0.956
    gradients: the plain ones [[-0.2, 0, -0.1], [0, 0.6, 0]] times w:
            [[-0.2, 0, -0.2], [0, 0.9, 0]]
    """
    prox = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]])
    log_ratio = torch.tensor([[0.0, LN(1.5), LN(0.5)], [LN(0.5), LN(1.5), 0.0]])
    logprobs = prox + log_ratio
    logprobs[1, 2] = NAN                       # padding may hold anything
    logprobs.requires_grad_(True)
    log_w = torch.tensor([[0.0, LN(0.5), LN(3.0)], [LN(1.8), LN(1.5), 0.0]])
    behaviour = prox - log_w
    behaviour[1, 2] = NAN
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logprobs, prox, behaviour, advantages, mask


def test_weights_and_their_summaries_by_hand():
    _, prox, behaviour, _, mask = case()
    w = truncated_importance_weights(prox, behaviour, mask, cap=2.0)
    torch.testing.assert_close(w.weights, torch.tensor([[1.0, 0.5, 2.0], [1.8, 1.5, 0.0]]))
    assert w.truncated.tolist() == [[False, False, True], [False, False, False]]
    assert w.mean.item() == pytest.approx(1.36, abs=1e-6)
    assert w.max.item() == 2.0
    assert w.truncated_frac.item() == pytest.approx(1 / 5)
    # A cap above every raw weight truncates nothing: the max is the raw 3.
    w = truncated_importance_weights(prox, behaviour, mask, cap=10.0)
    assert w.max.item() == pytest.approx(3.0) and w.truncated_frac.item() == 0.0
    with pytest.raises(ValueError, match="cap >= 1"):
        truncated_importance_weights(prox, behaviour, mask, cap=0.5)


def test_loss_and_gradient_by_hand():
    logprobs, prox, behaviour, adv, mask = case()
    loss, stats = clipped_surrogate_loss(logprobs, prox, adv, mask, clip_low=0.2, clip_high=0.2,
                                         behaviour_logprobs=behaviour, tis_cap=2.0)
    assert loss.item() == pytest.approx(0.956, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.2, 0.0, -0.2], [0.0, 0.9, 0.0]]))
    assert stats.pg_loss.item() == pytest.approx(0.956, abs=1e-6)
    assert stats.tis_weight_mean.item() == pytest.approx(1.36, abs=1e-6)
    assert stats.tis_weight_max.item() == 2.0
    assert stats.tis_truncated_frac.item() == pytest.approx(1 / 5)
    assert stats.clip_frac.item() == pytest.approx(2 / 5)   # the clip is untouched


def random_batch(seed, b=4, t=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    logprobs = (old + 0.3 * torch.randn(b, t, generator=g)).requires_grad_(True)
    adv = torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    ref = old + 0.1 * torch.randn(b, t, generator=g)
    ent = torch.rand(b, t, generator=g).requires_grad_(True)
    return logprobs, old, adv, mask, ref, ent


def run(logprobs, old, adv, mask, ref, ent, **tis):
    loss, stats = clipped_surrogate_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                         ref_logprobs=ref, kl_coef=0.05, entropy=ent,
                                         entropy_coef=0.01, **tis)
    grads = torch.autograd.grad(loss, [logprobs, ent])
    return loss, grads, stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_behaviour_equal_to_proximal_is_todays_loss_exactly(seed):
    batch = random_batch(seed)
    old = batch[1]
    plain, plain_grads, _ = run(*batch)
    loss, grads, stats = run(*batch, behaviour_logprobs=old.clone(), tis_cap=2.0)
    assert torch.equal(loss, plain)                          # every weight is exactly 1
    for a, b in zip(grads, plain_grads):
        assert torch.equal(a, b)
    assert stats.tis_weight_mean.item() == 1.0 and stats.tis_weight_max.item() == 1.0
    assert stats.tis_truncated_frac.item() == 0.0


def todays_pg_loss(logprobs, old, adv, mask, clip_low, clip_high):
    """The surrogate as it was before `tis_cap` (same operations, same order)."""
    mask = mask.bool()
    zero = torch.zeros(())
    log_ratio = torch.where(mask, logprobs.float() - old.float(), zero)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    a = adv.float()[:, None]
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high))
    return torch.where(mask, pg, zero).sum() / mask.sum().clamp_min(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_tis_cap_the_loss_is_bitwise_todays(seed):
    logprobs, old, adv, mask, _, _ = random_batch(seed)
    loss, _ = clipped_surrogate_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    expected = todays_pg_loss(logprobs, old, adv, mask, 0.2, 0.28)
    assert torch.equal(loss, expected)
    grad, = torch.autograd.grad(loss, logprobs)
    expected_grad, = torch.autograd.grad(expected, logprobs)
    assert torch.equal(grad, expected_grad)


def test_cap_and_behaviour_go_together():
    logprobs, prox, behaviour, adv, mask = case()
    with pytest.raises(ValueError, match="go together"):
        clipped_surrogate_loss(logprobs, prox, adv, mask, behaviour_logprobs=behaviour)
    with pytest.raises(ValueError, match="go together"):
        clipped_surrogate_loss(logprobs, prox, adv, mask, tis_cap=2.0)


def test_config_field():
    assert AlgorithmConfig().tis_cap is None                 # off by default
    assert load_config(SMOKE, ["--algorithm.tis_cap", "2"]).algorithm.tis_cap == 2.0
    assert load_config(SMOKE, ["--algorithm.tis_cap", "1"]).algorithm.tis_cap == 1.0
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, ["--algorithm.tis_cap", "0.5"])
    assert str(info.value) == "algorithm.tis_cap: got 0.5; accepted: null or a number >= 1"


def test_the_microbatch_loss_carries_the_weights():
    """make_loss_fn reads `behaviour_logprobs` from the microbatch with `tis_cap`, and ignores
    it without (the loss sums: megatron divides by the global token count)."""
    logprobs, prox, behaviour, adv, mask = case()
    micro = {"loss_mask": mask.float(), "advantages": adv, "old_logprobs": prox,
             "behaviour_logprobs": behaviour}
    loss_sum, n, metrics = make_loss_fn(AlgorithmConfig(tis_cap=2.0))(logprobs, None, micro)
    assert loss_sum.item() == pytest.approx(4.78, abs=1e-5) and n.item() == 5
    assert metrics["pg_loss"].item() == pytest.approx(4.78, abs=1e-5)
    loss_sum, _, _ = make_loss_fn(AlgorithmConfig())(logprobs, None, micro)
    assert loss_sum.item() == pytest.approx(1.9, abs=1e-5)


def smoke_worker(run_dir, extra):
    from megatron_mgrpo.smoke import run_smoke

    cfg = load_config(SMOKE, ["--training.steps", "2", "--training.run_dir", run_dir,
                              "--algorithm.train_on_momentum_rollouts", "true", *extra])
    return run_smoke(cfg, log=lambda *_: None)


def test_a_step_with_tis_logs_finite_weights(tmp_path):
    """The smoke batch's behaviour log-probs are the step-0 policy's: at step 0 every weight is
    1 up to the forward's numerics; at step 1 the policy has moved (the weights are stale)."""
    runs = run_workers(smoke_worker, 1, str(tmp_path), ["--algorithm.tis_cap", "2"])[0]
    for m in runs:
        for k in ("tis_weight_mean", "tis_weight_max", "tis_truncated_frac", "loss"):
            assert math.isfinite(m[k]), (k, m[k])
        assert 0 < m["tis_weight_mean"] <= m["tis_weight_max"] <= 2.0
        assert 0 <= m["tis_truncated_frac"] <= 1
    assert runs[0]["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert runs[0]["tis_truncated_frac"] == 0.0
    assert runs[1]["tis_weight_mean"] != runs[0]["tis_weight_mean"]
