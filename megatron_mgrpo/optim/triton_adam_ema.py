"""One Triton kernel for the AdamW step with the momentum model's EMA folded in (GPU path).

Per element it reads grad, param, exp_avg, exp_avg_sq and ema once and writes param, exp_avg,
exp_avg_sq and ema once: 9 fp32 transfers against Adam's 7 (the bound behind the issue's
~1.27 goal). The arithmetic is torch AdamW's (`adam_ema.adam_ema_foreach_`), with
round-to-nearest sqrt and division; results agree with the foreach path to fp32 rounding (FMA
contraction), not bit for bit.

Tested on CPU under Triton's interpreter (TRITON_INTERPRET=1, tests/test_sharded_ema.py).
"""

from __future__ import annotations

from typing import List, Optional

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU installs: the foreach path serves
    HAVE_TRITON = False

BLOCK = 1024


if HAVE_TRITON:

    @triton.jit
    def _adam_ema_kernel(p_ptr, g_ptr, m_ptr, v_ptr, e_ptr, n, beta1, beta2, eps, decay,
                         step_size, bias2_sqrt, ema_m, HAS_EMA: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * (g * g)
        denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_EMA:
            e = tl.load(e_ptr + offs, mask=mask, other=0.0)
            tl.store(e_ptr + offs, e * ema_m + (1.0 - ema_m) * p, mask=mask)


@torch.no_grad()
def adam_ema_triton_(params: List[torch.Tensor], grads: List[torch.Tensor],
                     exp_avgs: List[torch.Tensor], exp_avg_sqs: List[torch.Tensor],
                     emas: Optional[List[torch.Tensor]], *, step: float, lr: float,
                     beta1: float, beta2: float, eps: float, weight_decay: float,
                     momentum: Optional[float]) -> None:
    """`adam_ema_foreach_`'s contract, one kernel launch per tensor (fp32, contiguous)."""
    if not HAVE_TRITON:
        raise RuntimeError("adam_ema_triton_: Triton is not installed")
    bias2_sqrt = (1 - beta2 ** step) ** 0.5
    step_size = lr / (1 - beta1 ** step)
    decay = 1 - lr * weight_decay
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        for t in (p, exp_avgs[i], exp_avg_sqs[i]) + ((emas[i],) if emas is not None else ()):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError("adam_ema_triton_: fp32 contiguous tensors only")
        e = emas[i] if emas is not None else p  # unused when HAS_EMA is off
        _adam_ema_kernel[(triton.cdiv(n, BLOCK),)](
            p, grads[i].contiguous(), exp_avgs[i], exp_avg_sqs[i], e, n, beta1, beta2, eps,
            decay, step_size, bias2_sqrt, momentum if momentum is not None else 0.0,
            HAS_EMA=emas is not None, BLOCK_SIZE=BLOCK)
