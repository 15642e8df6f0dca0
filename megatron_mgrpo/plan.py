"""`mgrpo plan`: will a config fit, per GPU, before the job is queued?

Parameters are counted exactly from the architecture (the HF parameter set: embeddings, per
layer Q/K/V/O with optional biases and QK-norm, SwiGLU, two RMSNorms, the final norm, an untied
LM head). Memory per training GPU is the worst pipeline stage's, in these parts:

- `params`: the model weights in `model.params_dtype`, or FP8 with `fp8_param_gather` (the
  stage's layers / TP; the embedding on
  the first stage and the LM head on the last, / TP, with the vocabulary padded as Megatron
  pads it);
- `grads`: the DDP gradient buffer, fp32 (`grad_reduce_in_fp32`);
- `optimizer`: Adam's fp32 main params (only when the weights are not fp32), exp_avg and
  exp_avg_sq, / (DP x CP) with the distributed optimizer (megatron shards over both);
- `ema`: the momentum model, an fp32 shard like the optimizer state (mgrpo mode only);
- `reference`: the frozen reference model of the KL term, the stage's weights again in
  `model.params_dtype` (only with `algorithm.kl_coef > 0` and `kl_reference: base`; the
  `momentum` reference borrows the policy's weights for one forward and keeps no copy);
- `activations`: what one microbatch keeps per layer for the backward (bf16 tensors of the
  attention and SwiGLU blocks; sequence parallel divides the hidden-size ones by TP, context
  parallel all of them by CP; Flash attention keeps no s x s scores), times the layers a stage
  holds in flight at its peak: 1F1B keeps PP - i microbatches of its L/PP layers on stage i;
  the interleaved schedule (virtual pipeline V) keeps 2(PP - i - 1) + (V - 1) PP + 1 chunk
  forwards of L/(PP V) layers each, which on stage 0 is megatron's (1 + (PP-1)/(PP V)) x L
  (both at most the step's microbatches; the interleaved schedule pads them to a multiple of
  PP);
  `selective` recompute drops the attention core's, `full` keeps only each layer's input plus
  one layer's working set;
- `logits`: the last stage's fp32 logits and their gradient for one microbatch (vocab / TP,
  sequence / CP);
- `overhead`: CUDA context, NCCL buffers and allocator fragmentation, a flat allowance.

The sequence length is data.max_prompt_length + rollout.max_new_tokens. The rollout side (SGLang
servers on their own GPUs) is planned as bf16 weights (FP8 with `rollout.weight_format: fp8`) /
server TP plus the KV cache the step's sequences need spread over the servers, against
`mem_fraction` of a GPU. These are estimates of the kind Megatron's own memory report makes
(Korthikanti et al. 2022), not measurements.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, Optional

from megatron_mgrpo.config.schema import Config, ModelConfig

__all__ = ["count_parameters", "MemoryPlan", "plan_memory", "format_plan"]

GIB = 2 ** 30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OVERHEAD_GIB = 4.0


def _layer_parameters(m: ModelConfig) -> Dict[str, int]:
    h, d = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_key_value_heads * d
    attention = h * q + 2 * h * kv + q * h
    if m.attention_bias:
        attention += q + 2 * kv
    if m.qk_norm:
        attention += 2 * d
    return {"attention": attention, "mlp": 3 * h * m.intermediate_size, "norms": 2 * h}


def count_parameters(model: ModelConfig) -> Dict[str, int]:
    """Exact parameter counts of the HF model: `embedding`, `layers` (all of them), `final_norm`,
    `lm_head` (0 when tied) and `total`."""
    from megatron_mgrpo.models.architecture import complete

    m = complete(model)
    per_layer = sum(_layer_parameters(m).values())
    out = {"embedding": m.vocab_size * m.hidden_size, "layers": m.num_layers * per_layer,
           "final_norm": m.hidden_size,
           "lm_head": 0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size}
    out["total"] = sum(out.values())
    return out


def rollout_weight_bytes(model: ModelConfig, weight_format: str = "bf16",
                         block_size: int = 128) -> int:
    """Bytes of the rollout engine's copy of the model: bf16, or with `weight_format` fp8 the
    layers' linear weights in one byte each plus their fp32 scales (`weights.fp8`)."""
    from megatron_mgrpo.models.architecture import complete
    from megatron_mgrpo.weights.fp8 import scale_shape

    m = complete(model)
    total = count_parameters(m)["total"]
    if weight_format != "fp8":
        return 2 * total
    h, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, \
        m.num_key_value_heads * m.head_dim
    f = m.intermediate_size
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)]  # [out, in] each
    linear = m.num_layers * sum(a * b for a, b in shapes)
    scales = m.num_layers * sum(math.prod(scale_shape(shape, block_size)) for shape in shapes)
    return linear + 4 * scales + 2 * (total - linear)


@dataclass
class MemoryPlan:
    """A config's memory per GPU, in GiB."""

    params_total: int
    layout: Dict[str, object]
    """tp, pp, vpp, cp, dp, gpus, micro_batch_size, seq_len, microbatches (per DP rank and
    step, before pruning), rollout_servers, server_tp (ints), pipeline_bubble (the idle share
    of a pipelined step, (PP - 1) / (V x microbatches)) and rollout_weights (bf16 | fp8)."""
    per_gpu: Dict[str, float]
    """Training GPU of the worst pipeline stage: params, grads, optimizer, ema, activations,
    logits, overhead."""
    per_gpu_peak_gib: float
    gpu_memory_gib: float
    rollout: Dict[str, float]
    """Rollout GPU: weights_gib, kv_cache_gib (the step's sequences at once, per server GPU),
    capacity_gib (mem_fraction of a GPU), kv_fits (1.0 when all sequences fit at once)."""

    def problems(self) -> list:
        """Why the plan does not fit, one line each (empty: it fits)."""
        out = []
        if self.per_gpu_peak_gib > self.gpu_memory_gib:
            out.append(f"training: {self.per_gpu_peak_gib:.1f} GiB per GPU > "
                       f"{self.gpu_memory_gib:g} GiB; raise parallel.tensor_parallel or "
                       "pipeline_parallel, use more GPUs (DP shards the optimizer and the EMA), "
                       "set parallel.recompute: full, or lower parallel.micro_batch_size")
        if self.rollout["weights_gib"] >= self.rollout["capacity_gib"]:
            out.append(f"rollout: the weights take {self.rollout['weights_gib']:.1f} GiB per "
                       f"server GPU of {self.rollout['capacity_gib']:.1f} usable, no room for "
                       "a KV cache; give each server more GPUs (sglang.server_tp, or --server-tp)")
        return out

    @property
    def fits(self) -> bool:
        return not self.problems()

    def to_json(self) -> str:
        return json.dumps({"params_total": self.params_total, "layout": self.layout,
                           "per_gpu_peak_gib": round(self.per_gpu_peak_gib, 3),
                           "per_gpu_gib": {k: round(v, 3) for k, v in self.per_gpu.items()},
                           "gpu_memory_gib": self.gpu_memory_gib, "fits": self.fits,
                           "rollout": {k: round(v, 3) for k, v in self.rollout.items()}})


def _stage_parameters(m: ModelConfig, tp: int, pp: int, stage: int, vocab: int) -> float:
    """Parameters held by one (TP, PP) rank of `stage`."""
    layers = m.num_layers // pp + (1 if stage < m.num_layers % pp else 0)
    per_layer = _layer_parameters(m)
    n = layers * (per_layer["attention"] + per_layer["mlp"]) / tp + layers * per_layer["norms"]
    if stage == 0:
        n += vocab * m.hidden_size / tp
    if stage == pp - 1:
        n += m.hidden_size
        if not m.tie_word_embeddings or pp > 1:  # tied with PP > 1: a copy on the last stage
            n += vocab * m.hidden_size / tp
    return n


def _activations_per_layer(m: ModelConfig, s: int, b: int, tp: int, sp: bool,
                           recompute: str) -> float:
    h, d, inter = m.hidden_size, m.head_dim, m.intermediate_size
    q, kv = m.num_attention_heads * d, m.num_key_value_heads * d
    hidden = 2 * s * b * h / (tp if sp else 1)  # one bf16 [s, b, h] tensor
    if recompute == "full":
        return hidden
    attention_core = 2 * s * b * q / tp  # the Flash-attention output (and its softmax stats)
    kept = (4 * hidden + 2 * s * b * (q + 2 * kv) / tp + 2 * s * b * 3 * inter / tp
            + attention_core)
    if recompute == "selective":
        kept -= attention_core
    return kept


def plan_memory(cfg: Config, num_gpus: int, gpu_memory_gib: float = 80.0,
                rollout_servers: Optional[int] = None, server_tp: Optional[int] = None,
                mem_fraction: float = 0.85) -> MemoryPlan:
    """The memory plan of `cfg` on `num_gpus` training GPUs (see the module docstring).
    `rollout_servers` defaults to sglang.num_servers, else len(sglang.urls) or sglang.launch,
    else 1; `server_tp` to sglang.server_tp."""
    from megatron_mgrpo.models.architecture import complete
    from megatron_mgrpo.models.gpt import padded_vocab_size

    m = complete(cfg.model)
    p, r, d, a = cfg.parallel, cfg.rollout, cfg.data, cfg.algorithm
    tp, pp, cp = p.tensor_parallel, p.pipeline_parallel, p.context_parallel
    vpp = p.virtual_pipeline if pp > 1 else 1
    if num_gpus % (tp * pp * cp):
        raise ValueError(f"{num_gpus} GPUs do not divide into TP={tp} x PP={pp} x CP={cp}")
    dp = num_gpus // (tp * pp * cp)
    vocab = padded_vocab_size(m, tp)
    weight_bytes = 1 if m.fp8_param_gather else BYTES[m.params_dtype]
    shard = 1 if not p.use_distributed_optimizer else dp * cp
    s = d.max_prompt_length + r.max_new_tokens
    s_rank = s / cp  # context parallel: each rank keeps its share of every sequence
    recompute = p.recompute
    sequences = d.prompts_per_step * (r.num_policy_rollouts + r.num_momentum_rollouts)
    microbatches = max(1, math.ceil(math.ceil(sequences / dp) / p.micro_batch_size))
    worst = None
    for stage in range(pp):
        n = _stage_parameters(m, tp, pp, stage, vocab)
        layers = m.num_layers // pp + (1 if stage < m.num_layers % pp else 0)
        act = _activations_per_layer(m, s_rank, p.micro_batch_size, tp, p.sequence_parallel,
                                     recompute)
        if vpp > 1:  # interleaved: warm-up chunk forwards (megatron's schedule) plus one
            chunk_forwards = 2 * (pp - stage - 1) + (vpp - 1) * pp + 1
            in_flight = min(chunk_forwards, -(-microbatches // pp) * pp * vpp) / vpp
        else:  # 1F1B: stage i holds pp - i microbatches at its peak
            in_flight = min(pp - stage, microbatches)
        acts = act * layers * in_flight
        if recompute == "full":  # one layer recomputed at a time keeps its full working set
            acts += _activations_per_layer(m, s_rank, p.micro_batch_size, tp,
                                           p.sequence_parallel, "none")
        parts = {
            "params": n * weight_bytes,
            "grads": n * 4,
            "optimizer": n * ((0 if weight_bytes == 4 else 4) + 8) / shard,
            "ema": n * 4 / shard if a.mode == "mgrpo" else 0.0,
            "reference": n * BYTES[m.params_dtype] if a.kl_coef > 0 and a.kl_reference == "base"
            else 0.0,
            "activations": acts,
            "logits": (2 * 4 * s_rank * p.micro_batch_size * vocab / tp) if stage == pp - 1
            else 0.0,
        }
        gib = {k: v / GIB for k, v in parts.items()}
        gib["overhead"] = OVERHEAD_GIB
        if worst is None or sum(gib.values()) > sum(worst.values()):
            worst = gib
    total = count_parameters(cfg.model)["total"]
    servers = rollout_servers or cfg.sglang.num_servers or max(len(cfg.sglang.urls),
                                                               cfg.sglang.launch, 1)
    server_tp = server_tp or cfg.sglang.server_tp
    kv_per_token = 2 * m.num_layers * m.num_key_value_heads * m.head_dim * 2
    kv = sequences * s * kv_per_token / servers / server_tp / GIB
    weights = rollout_weight_bytes(cfg.model, r.weight_format, r.fp8_block_size) \
        / server_tp / GIB
    capacity = gpu_memory_gib * mem_fraction
    rollout = {"weights_gib": weights, "kv_cache_gib": kv, "capacity_gib": capacity,
               "kv_fits": min(1.0, max(0.0, capacity - weights) / kv) if kv else 1.0}
    bubble = (pp - 1) / (vpp * microbatches) if pp > 1 else 0.0
    return MemoryPlan(total, {"tp": tp, "pp": pp, "vpp": vpp, "cp": cp, "dp": dp,
                              "gpus": num_gpus, "micro_batch_size": p.micro_batch_size,
                              "seq_len": s, "microbatches": microbatches,
                              "pipeline_bubble": round(bubble, 4),
                              "rollout_servers": servers, "server_tp": server_tp,
                              "rollout_weights": "fp8" if r.weight_format == "fp8" else "bf16"},
                      worst, sum(worst.values()), gpu_memory_gib, rollout)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a few readable lines."""
    L = plan.layout
    lines = [f"parameters: {plan.params_total:,} ({plan.params_total / 1e9:.2f} B)",
             f"layout: {L['gpus']} training GPUs = TP {L['tp']} x PP {L['pp']}"
             + (f" (x {L['vpp']} model chunks each)" if L["vpp"] > 1 else "")
             + (f" x CP {L['cp']}" if L["cp"] > 1 else "") + f" x DP {L['dp']}; "
             f"micro batch {L['micro_batch_size']} x {L['seq_len']} tokens, "
             f"{L['microbatches']} microbatches per step"
             + (f" (pipeline bubble {L['pipeline_bubble']:.1%})" if L["pp"] > 1 else ""),
             "per training GPU (worst pipeline stage), GiB:"]
    lines += [f"  {k:<12}{v:8.2f}" for k, v in plan.per_gpu.items()]
    lines.append(f"  {'peak':<12}{plan.per_gpu_peak_gib:8.2f}  of {plan.gpu_memory_gib:g}")
    ro = plan.rollout
    lines.append(f"rollout: {L['rollout_servers']} server(s) x TP {L['server_tp']}: "
                 f"{L['rollout_weights']} weights {ro['weights_gib']:.2f} GiB/GPU, KV cache for "
                 f"the whole step {ro['kv_cache_gib']:.2f} GiB/GPU of "
                 f"{ro['capacity_gib']:.1f} usable ({math.floor(ro['kv_fits'] * 100)}% of the "
                 "step's sequences at once)")
    lines.append("fits" if plan.fits else "DOES NOT FIT")
    return "\n".join(lines)
