"""Token log-probs and full-vocabulary entropy from vocab-parallel logits.

Under tensor parallelism each rank holds logits for a contiguous slice of the (padded)
vocabulary. log p(target) and H = -sum_v p_v log p_v both need the whole distribution, so the
max, the partition function, the target logit and sum_v p_v z_v are each reduced over the TP
group. Rows of the padded vocabulary beyond the real one are masked out so that they carry no
probability.

The reductions are all-reduces with an identity backward: every TP rank computes the same
(replicated) loss from the reduced values, and the gradient of that loss with respect to a
rank's own logit slice is exactly what flows back through its local terms.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _tp_sum(x: torch.Tensor, group, size: int) -> torch.Tensor:
    return _AllReduceSum.apply(x, group) if size > 1 else x


def _tp_max(x: torch.Tensor, group, size: int) -> torch.Tensor:
    # The max is a numerical shift that cancels in every result: no gradient through it.
    x = x.detach().clone()
    if size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    tp_rank: int = 0,
    tp_size: int = 1,
    real_vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p(targets) and the entropy of the full distribution, per position.

    logits: [..., V_local] this rank's vocabulary slice (slice `tp_rank` of `tp_size` equal
    slices of the padded vocabulary); targets: [...] global token ids. `real_vocab_size` masks
    the padding rows. Logits are divided by `temperature` first, so the result is the
    distribution the sampler drew from. Computed in fp32 whatever the logits' dtype.
    Returns (logprobs [...], entropy [...] or None).
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    v_local = z.shape[-1]
    start = tp_rank * v_local
    pad = None
    if real_vocab_size is not None and start + v_local > real_vocab_size:
        n_real = max(real_vocab_size - start, 0)
        pad = torch.arange(v_local, device=z.device) >= n_real
        z = z.masked_fill(pad, float("-inf"))

    zmax = _tp_max(z.max(dim=-1).values, tp_group, tp_size)
    shifted = z - zmax.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = _tp_sum(exp.sum(dim=-1), tp_group, tp_size)
    log_z = sum_exp.log()  # log partition function of the shifted logits

    local = targets - start
    in_slice = (local >= 0) & (local < v_local)
    picked = shifted.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = _tp_sum(picked.masked_fill(~in_slice, 0.0), tp_group, tp_size)
    logprobs = target_logit - log_z

    entropy = None
    if with_entropy:
        # H = log Z - E_p[z]. Padded rows have p = 0; zero their -inf logit first, because
        # 0 * -inf is NaN in the forward and in the backward of a where().
        finite = shifted if pad is None else shifted.masked_fill(pad, 0.0)
        weighted = (exp * finite).sum(dim=-1)
        entropy = log_z - _tp_sum(weighted, tp_group, tp_size) / sum_exp
    return logprobs, entropy


def completion_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    tp_group=None,
    tp_rank: int = 0,
    tp_size: int = 1,
    real_vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs and entropies aligned with `input_ids`: position t scores token t given
    tokens < t. logits: [B, S, V_local] from the model on input_ids [B, S]. Position 0 has no
    prediction and gets 0; callers mask it (it is a prompt token). Returns [B, S] each.
    """
    lp, ent = vocab_parallel_logprobs_and_entropy(
        logits[:, :-1], input_ids[:, 1:], tp_group, tp_rank, tp_size, real_vocab_size,
        temperature, with_entropy)
    pad = lp.new_zeros(lp.shape[0], 1)
    lp = torch.cat([pad, lp], dim=1)
    if ent is not None:
        ent = torch.cat([pad, ent], dim=1)
    return lp, ent
