"""The policy objective (step 6): PPO clipped surrogate, low-variance KL, entropy bonus, and the
optional truncated importance weight for completions a stale or different policy sampled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ImportanceWeights", "LossStats", "clipped_surrogate_loss", "kl_low_var",
           "truncated_importance_weights"]

# verl clamps the log-ratio before exp and the KL after, keeping fp32 finite for wild samples.
_LOG_RATIO_CLAMP = 20.0
_KL_CLAMP = 10.0


def kl_low_var(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token 'k3' estimate of KL(pi || pi_ref) from samples of pi, elementwise:

        kl = exp(ref - logp) - (ref - logp) - 1  >= 0,   clamped to [-10, 10]

    (Schulman's low-variance unbiased estimator, verl's `low_var_kl`, used by GRPO). Its gradient
    in logp is 1 - exp(ref - logp). Gradient flows through `logprobs` only.
    """
    log_ratio = (ref_logprobs.detach() - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    kl = torch.exp(log_ratio) - log_ratio - 1
    return kl.clamp(-_KL_CLAMP, _KL_CLAMP)


@dataclass(frozen=True)
class ImportanceWeights:
    """Truncated importance weights of a batch's tokens and their masked summaries."""

    weights: torch.Tensor
    """[B, T] min(pi_prox / pi_behaviour, cap); 0 off the mask."""
    truncated: torch.Tensor
    """bool [B, T] tokens whose raw weight exceeded the cap (False off the mask)."""
    mean: torch.Tensor
    """Masked mean of the (truncated) weights (0 without tokens)."""
    max: torch.Tensor
    """Masked max of the (truncated) weights, at most the cap (0 without tokens)."""
    truncated_frac: torch.Tensor
    """Share of masked tokens that were truncated."""


@torch.no_grad()
def truncated_importance_weights(proximal_logprobs: torch.Tensor,
                                 behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> ImportanceWeights:
    """Per-token w_t = min(exp(prox_t - behaviour_t), cap), detached, in fp32 ([B, T] each).

    The correction of decoupled PPO (Hilton et al. 2021) with truncation (TIS, Yao et al. 2025;
    verl's `tis_imp_ratio_cap`): the PPO ratio is taken against the proximal policy (the
    log-probs recomputed before the update), and this weight moves the surrogate from the
    behaviour policy (whatever sampled: a stale policy, the momentum model, FP8 or another
    engine's kernels) to the proximal one. Truncating at `cap` bounds its variance at the price
    of some bias. The log-ratio is clamped to +-20 before exp, as for the PPO ratio.
    """
    if not cap >= 1:
        raise ValueError(f"need cap >= 1, got {cap}")
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=proximal_logprobs.device)
    log_w = torch.where(mask, proximal_logprobs.float() - behaviour_logprobs.float(), zero)
    raw = torch.where(mask, torch.exp(log_w.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)), zero)
    truncated = mask & (raw > cap)
    weights = raw.clamp(max=cap)
    n = mask.sum().clamp_min(1)
    return ImportanceWeights(
        weights=weights, truncated=truncated, mean=weights.sum() / n,
        max=weights.max() if weights.numel() else zero,  # weights >= 0, 0 off the mask
        truncated_frac=truncated.sum() / n)


@dataclass(frozen=True)
class LossStats:
    """Detached metrics, masked means over this call's own tokens (not over `num_tokens`), as
    0-dim tensors: reading them is the caller's device sync."""

    pg_loss: torch.Tensor
    kl: torch.Tensor
    """k3 KL to the reference (0 without one)."""
    entropy: torch.Tensor
    """Mean token entropy (0 when not given)."""
    clip_frac: torch.Tensor
    """Share of tokens where the clipped term is active (their gradient is 0)."""
    approx_kl: torch.Tensor
    """k3 estimate of KL(pi_old || pi): mean of (ratio - 1) - log ratio."""
    ratio_mean: torch.Tensor
    num_tokens: torch.Tensor
    """Masked tokens in this call."""
    tis_weight_mean: Optional[torch.Tensor] = None
    """Mean truncated importance weight (None without `tis_cap`)."""
    tis_weight_max: Optional[torch.Tensor] = None
    """Largest truncated importance weight, at most the cap (None without `tis_cap`)."""
    tis_truncated_frac: Optional[torch.Tensor] = None
    """Share of tokens whose importance weight was truncated (None without `tis_cap`)."""


def clipped_surrogate_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    num_tokens: Optional[float] = None,
    behaviour_logprobs: Optional[torch.Tensor] = None,
    tis_cap: Optional[float] = None,
) -> tuple[torch.Tensor, LossStats]:
    """Token-level PPO loss of the policy's completions; all tensors [B, T] except `advantages`
    ([B], one per trajectory, or [B, T]).

        ratio = exp(logp - logp_old)
        l_t   = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        loss  = sum_t mask * (l_t + kl_coef * kl_t - entropy_coef * H_t) / num_tokens

    `num_tokens` defaults to mask.sum() (a token-level mean, as in DAPO and verl's
    'token-mean'). When one batch is split over microbatches or data-parallel ranks, pass the
    global count of masked tokens: the per-call losses then sum to the global token mean, and
    summed gradients equal the full-batch gradient. Gradient flows through `logprobs` and
    `entropy` only; `old_logprobs`, `ref_logprobs` and `advantages` are treated as constants.
    Padding is selected away with `where`, so garbage there (even NaN) reaches neither the loss
    nor the gradient.

    For the momentum model's completions (when they are trained), `old_logprobs` are the
    momentum model's own: the ratio is then the importance weight pi_q / pi_k, clipped alike.

    With `tis_cap` (decoupled PPO with a truncated importance weight), `old_logprobs` are the
    proximal policy's (the policy's own, recomputed before the update) for every row, and the
    engine's `behaviour_logprobs` enter through w_t = min(pi_old / pi_behaviour, tis_cap)
    (`truncated_importance_weights`), a constant multiplying the surrogate term only:

        l_t = -w_t * min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)

    The KL and entropy terms are not reweighted (as verl's TIS). Where behaviour equals
    proximal every w_t is 1 and the loss is the plain one; without `tis_cap` nothing of this
    runs.
    """
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if (tis_cap is None) != (behaviour_logprobs is None):
        raise ValueError("tis_cap and behaviour_logprobs go together")
    # Ratios of bf16 log-probabilities are too coarse near 1 for clipping; work in fp32.
    logprobs, old_logprobs = logprobs.float(), old_logprobs.float()
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    advantages = advantages.detach().float()
    if advantages.dim() == 1:
        advantages = advantages[:, None]

    if num_tokens is not None and not num_tokens > 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    local_tokens = mask.sum()
    denom = local_tokens.clamp_min(1) if num_tokens is None else num_tokens

    def masked_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, zero).sum()

    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), zero)
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    tis = None
    if tis_cap is not None:
        tis = truncated_importance_weights(old_logprobs, behaviour_logprobs, mask, tis_cap)
        pg = pg * tis.weights
    pg_loss = masked_sum(pg) / denom
    loss = pg_loss

    if ref_logprobs is not None:
        kl_loss = masked_sum(kl_low_var(torch.where(mask, logprobs, zero),
                                        torch.where(mask, ref_logprobs.float(), zero))) / denom
        loss = loss + kl_coef * kl_loss
    else:
        kl_loss = zero
    if entropy is not None:
        entropy_mean = masked_sum(entropy.float()) / denom
        loss = loss - entropy_coef * entropy_mean
    else:
        entropy_mean = zero

    with torch.no_grad():
        # Metrics are means over this call's own tokens, whatever `num_tokens` says.
        n = local_tokens.clamp_min(1)
        stats = LossStats(
            pg_loss=masked_sum(pg) / n,
            kl=kl_loss.detach() * denom / n,
            entropy=entropy_mean.detach() * denom / n,
            clip_frac=masked_sum((clipped > unclipped).to(pg.dtype)) / n,
            approx_kl=masked_sum(ratio - 1 - log_ratio) / n,
            ratio_mean=masked_sum(ratio) / n,
            num_tokens=local_tokens,
            **({} if tis is None else dict(tis_weight_mean=tis.mean, tis_weight_max=tis.max,
                                           tis_truncated_frac=tis.truncated_frac)),
        )
    return loss, stats
