"""Training throughput of the policy on one device: BF16 and FP8 tokens/s and MFU (issue 8).

    python benchmarks/train_throughput.py [--shape 1b|tiny] [--seq-len S] [--micro-batch B]
        [--micro-batches M] [--steps N] [--warmup W] [--variants bf16,fp8]
        [--fp8 hybrid|e4m3] [--fp8-recipe delayed|tensorwise|blockwise|mxfp8]
        [--peak-tflops T] [--peak-fp8-tflops T]

The model is the project's own: `MegatronPolicy` (megatron-core GPTModel from `build_policy`,
Float16Module, megatron DDP, megatron's Adam), in one process (`init_parallel` with a world of
one). Each timed step is `MegatronPolicy.train_step`: forward, backward and optimizer step
through megatron's forward_backward_func, on M microbatches of B random sequences of S tokens,
with the trainer's log-prob path and a token-sum loss (-sum of log p(token)). `--warmup` steps
first, then `--steps` timed (torch.cuda.synchronize around them on a GPU); tokens/s is B*M*S
tokens per step over the mean step time.

Shapes (`--shape`; default `1b` on a GPU, `tiny` on CPU):
  1b    Llama-like, 1.26B parameters: hidden 2048, 24 layers, SwiGLU 5632, 16 query heads and
        8 KV heads of 128, vocab 32000 (untied), seq 4096, micro batch 4 (planned ~52 GiB by
        `mgrpo plan`'s estimate on an 80 GiB GPU; on out-of-memory the micro batch is halved
        and the microbatches doubled, so a step keeps its tokens)
  tiny  hidden 256, 4 layers, SwiGLU 704, 4 query heads and 2 KV heads of 64, vocab 4096,
        seq 256, micro batch 4 (a few steps in well under a minute on 2 CPU cores)

Variants: `bf16` (params_dtype bf16) always, except on a CPU without native bf16, where `fp32`
is timed instead and the bf16 line says why it was skipped; `fp8` (the same plus model.fp8 = `--fp8`, default
hybrid, with `--fp8-recipe`, default delayed) where `transformer_config` accepts it: a GPU with
FP8 (compute capability 8.9+) and Transformer Engine. Elsewhere its line has value null and
`skipped` holding the ConfigError's message. On a GPU with Transformer Engine both variants use
TE's layer spec (as the trainer does); without it the local spec (`layer_spec` on the first
line says which).

Model FLOPs per token (`model_flops_per_token`), fwd + bwd = 3x the forward, as in PaLM (app. B)
and Megatron-LM (Narayanan et al. 2021):
    6 * N  +  12 * L * (n_heads * head_dim) * S
N is the number of weights in the matmuls every token goes through: per layer Q, K, V, O
(h*q + 2*h*kv + q*h with q = n_heads*head_dim, kv = n_kv_heads*head_dim) and the SwiGLU's three
(3*h*ffn), times L layers, plus the LM head (vocab*h). Not counted: the input embedding (a
lookup), norms, biases, RoPE, softmax. The second term is attention's scores QK^T and its
weighted sum AV, 2 * 2*S*q per token per layer forward, over the full S x S square (the
causal half is not subtracted, the papers' convention; recomputation is not counted: this is
MFU, not hardware FLOPs utilisation).

Figures (one JSON object per line; all names prefixed `train_throughput.`):
  parameters                 the model's parameter count; shape, device, sizes in extra fields
  model_flops_per_token      the formula above, FLOP/token
  gemm_tflops_measured       a large bf16 torch.matmul's achieved TFLOP/s, this device
  peak_bf16_tflops, peak_fp8_tflops   datasheet dense peaks (GPU: by device name or flags)
  bf16_tokens_per_s, fp8_tokens_per_s training throughput (step time, peak memory beside)
  bf16_mfu, fp8_mfu          model FLOP/s over the datasheet peak of that precision (GPU)
  bf16_mfu_vs_measured_gemm  on CPU (no datasheet peak; unless --peak-tflops is given):
                             model FLOP/s over gemm_tflops_measured
  fp8_speedup                fp8 / bf16 tokens/s, where both ran (goal on Hopper: >= 1.3)
FP8 runs the linear layers' GEMMs in FP8; attention's core and the LM head stay in bf16, so
fp8_mfu against the FP8 peak understates how busy the FP8 units are.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import warnings
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", module="megatron")

import torch  # noqa: E402

from megatron_mgrpo.config.schema import (Config, ConfigError, ModelConfig,  # noqa: E402
                                          OptimizerConfig, ParallelConfig)

PREFIX = "train_throughput."

SHAPES = {
    "1b": dict(model=ModelConfig(architecture="llama", vocab_size=32000, hidden_size=2048,
                                 intermediate_size=5632, num_layers=24, num_attention_heads=16,
                                 num_key_value_heads=8, max_position_embeddings=4096,
                                 rope_theta=500000.0, rms_norm_eps=1e-5,
                                 make_vocab_size_divisible_by=128),
               seq_len=4096, micro_batch=4),
    "tiny": dict(model=ModelConfig(architecture="llama", vocab_size=4096, hidden_size=256,
                                   intermediate_size=704, num_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256),
                 seq_len=256, micro_batch=4),
}

# Dense (no sparsity) peak TFLOP/s, bf16 and fp8, from NVIDIA's datasheets; the first entry
# whose key is in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 1513.0),
    ("H100 NVL", 835.0, 1671.0),
    ("H200 NVL", 835.0, 1671.0),
    ("H100", 989.0, 1979.0),   # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0, 1979.0),   # SXM, and GH200
    ("H800", 989.0, 1979.0),
    ("A100", 312.0, None),
]


def model_flops_per_token(m: ModelConfig, seq_len: int) -> int:
    """Training (fwd + bwd) model FLOPs per token: 6 * N + 12 * L * q * S (module docstring)."""
    from megatron_mgrpo.models.architecture import complete

    m = complete(m)
    h, d = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_key_value_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * m.intermediate_size
    matmul_weights = m.num_layers * per_layer + m.vocab_size * h
    return 6 * matmul_weights + 12 * m.num_layers * q * seq_len


def datasheet_peak(device_name: str):
    """(bf16, fp8) dense peak TFLOP/s for a known GPU name, else None."""
    for key, bf16, fp8 in PEAK_TFLOPS:
        if key in device_name:
            return bf16, fp8
    return None


def emit(name: str, value, unit: str, **extra) -> None:
    if value is not None:
        value = round(float(value), 4) if isinstance(value, float) else value
    print(json.dumps({"name": PREFIX + name, "value": value, "unit": unit, **extra}),
          flush=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX, Arm's bf16): without
    it torch emulates bf16 matmuls, many times slower than fp32 (benchmarks/README.md has the
    measurement), and a bf16 figure would time the emulation."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def measured_gemm_tflops(on_gpu: bool, repeats: int = 5, dtype=torch.bfloat16) -> float:
    """Best achieved TFLOP/s of a square matmul in `dtype` (8192 on a GPU, 2048 on CPU)."""
    n = 8192 if on_gpu else 2048
    device = "cuda" if on_gpu else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4 if on_gpu else 1):
            a @ b
        _sync()
        best = min(best, (time.perf_counter() - t0) / (4 if on_gpu else 1))
    return 2 * n ** 3 / best / 1e12


def make_config(model: ModelConfig, micro_batch: int, fp8: Optional[str] = None,
                fp8_recipe: str = "delayed", params_dtype: str = "bf16") -> Config:
    model = dataclasses.replace(model, params_dtype=params_dtype, fp8=fp8,
                                fp8_recipe=fp8_recipe)
    cfg = Config(model=model, parallel=ParallelConfig(micro_batch_size=micro_batch),
                 optimizer=OptimizerConfig(lr=1e-5))
    return cfg.validate(world_size=1)


def fp8_unavailable(cfg: Config) -> Optional[str]:
    """Why this machine cannot build the FP8 model (the project's own check), or None."""
    from megatron_mgrpo.models.gpt import transformer_config

    try:
        transformer_config(cfg.model, cfg.parallel)
    except ConfigError as e:
        return str(e)
    return None


def token_sum_loss(lp, ent, micro):
    mask = micro["loss_mask"]
    return -(lp * mask).sum(), mask.sum(), {}


def time_train_steps(cfg: Config, ctx, seq_len: int, micro_batches: int, steps: int,
                     warmup: int) -> dict:
    """Build the policy from `cfg`, run `warmup` + `steps` train steps; time the last `steps`."""
    from megatron_mgrpo.models.policy import MegatronPolicy

    policy = MegatronPolicy(cfg, ctx, total_steps=warmup + steps)
    rows = cfg.parallel.micro_batch_size * micro_batches
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, cfg.model.vocab_size, (rows, seq_len), generator=g),
             "loss_mask": torch.ones(rows, seq_len)}
    batch["loss_mask"][:, 0] = 0  # position 0 has no prediction
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        policy.train_step(batch, token_sum_loss)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        result = policy.train_step(batch, token_sum_loss)
    _sync()
    step_s = (time.perf_counter() - t0) / steps
    out = {"step_s": step_s, "tokens_per_step": rows * seq_len,
           "tokens_per_s": rows * seq_len / step_s, "loss": result.loss}
    if ctx.device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def run_variant(cfg: Config, ctx, seq_len: int, micro_batches: int, steps: int,
                warmup: int) -> dict:
    """`time_train_steps`, halving the micro batch (and doubling the microbatches) on a GPU
    out-of-memory until it fits or the micro batch is 1."""
    while True:
        b = cfg.parallel.micro_batch_size
        try:
            out = time_train_steps(cfg, ctx, seq_len, micro_batches, steps, warmup)
            return {**out, "micro_batch": b, "micro_batches": micro_batches}
        except torch.cuda.OutOfMemoryError:
            if b == 1:
                return {"skipped": f"out of memory at micro batch 1 x {seq_len} tokens"}
        gc.collect()
        torch.cuda.empty_cache()
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel,
                                                                    micro_batch_size=b // 2))
        micro_batches *= 2
        print(f"out of memory at micro batch {b}; retrying with {b // 2} x {micro_batches}",
              file=sys.stderr, flush=True)


def main(argv=None) -> None:
    on_gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b" if on_gpu else "tiny")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default: the shape's)")
    ap.add_argument("--micro-batch", type=int, help="sequences per microbatch (the shape's)")
    ap.add_argument("--micro-batches", type=int, default=1, help="microbatches per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3 if on_gpu else 2,
                    help="untimed steps")
    ap.add_argument("--variants", default="bf16,fp8", help="any of bf16,fp8")
    ap.add_argument("--fp8", choices=("hybrid", "e4m3"), default="hybrid")
    ap.add_argument("--fp8-recipe", choices=("delayed", "tensorwise", "blockwise", "mxfp8"),
                    default="delayed")
    ap.add_argument("--peak-tflops", type=float,
                    help="dense bf16 peak of this GPU (needed when its name is not in the table)")
    ap.add_argument("--peak-fp8-tflops", type=float, help="dense fp8 peak (default 2x bf16)")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= {"bf16", "fp8"} or not variants:
        ap.error(f"--variants: got {args.variants!r}; accepted: bf16, fp8 or bf16,fp8")

    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = None  # (bf16, fp8 or None, source); on CPU without flags MFU is vs measured GEMM
    table = datasheet_peak(device_name) if on_gpu else None
    if args.peak_tflops:
        peak = (args.peak_tflops, args.peak_fp8_tflops or 2 * args.peak_tflops, "flags")
    elif table:
        peak = (table[0], args.peak_fp8_tflops or table[1], "datasheet")
    elif on_gpu:
        ap.error(f"no peak FLOP/s known for {device_name!r}; pass --peak-tflops "
                 "(dense bf16 TFLOP/s)")

    from megatron_mgrpo.models.architecture import complete
    from megatron_mgrpo.models.gpt import use_transformer_engine
    from megatron_mgrpo.parallel import destroy_parallel, init_parallel
    from megatron_mgrpo.plan import count_parameters

    shape = SHAPES[args.shape]
    seq_len = args.seq_len or shape["seq_len"]
    micro_batch = args.micro_batch or shape["micro_batch"]
    model = dataclasses.replace(shape["model"], max_position_embeddings=max(
        shape["model"].max_position_embeddings, seq_len))
    m = complete(model)
    flops_per_token = model_flops_per_token(m, seq_len)

    emit("parameters", count_parameters(m)["total"], "parameters", shape=args.shape,
         device=device_name, layer_spec="transformer_engine" if use_transformer_engine()
         else "local", hidden=m.hidden_size, layers=m.num_layers, ffn=m.intermediate_size,
         heads=m.num_attention_heads, kv_heads=m.num_key_value_heads, head_dim=m.head_dim,
         vocab=m.vocab_size, seq_len=seq_len, micro_batch=micro_batch,
         micro_batches=args.micro_batches, steps=args.steps, warmup=args.warmup,
         threads=torch.get_num_threads())
    emit("model_flops_per_token", flops_per_token, "FLOP/token",
         formula="6*N_matmul + 12*L*q*S")
    native = on_gpu or cpu_has_bf16()
    if not native and "bf16" in variants:  # time what this CPU computes natively instead
        emit("bf16_tokens_per_s", None, "tokens/s",
             skipped="this CPU has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 flag): "
                     "timing it would measure torch's emulation; fp32 timed instead")
        variants = ["fp32" if v == "bf16" else v for v in variants]
    gemm_dtype = "bf16" if native else "fp32"
    gemm = measured_gemm_tflops(on_gpu, dtype=getattr(torch, {"bf16": "bfloat16",
                                                              "fp32": "float32"}[gemm_dtype]))
    emit("gemm_tflops_measured", gemm, "TFLOP/s", dtype=gemm_dtype)
    if peak:
        emit("peak_bf16_tflops", peak[0], "TFLOP/s", source=peak[2])
        if peak[1]:
            emit("peak_fp8_tflops", peak[1], "TFLOP/s", source=peak[2])

    ctx = init_parallel(ParallelConfig(), seed=0)
    tokens_per_s = {}
    try:
        for variant in variants:
            fp8 = args.fp8 if variant == "fp8" else None
            cfg = make_config(model, micro_batch, fp8, args.fp8_recipe,
                              params_dtype="fp32" if variant == "fp32" else "bf16")
            why = fp8_unavailable(cfg) if fp8 else None
            if why:
                emit(f"{variant}_tokens_per_s", None, "tokens/s", skipped=why)
                continue
            r = run_variant(cfg, ctx, seq_len, args.micro_batches, args.steps, args.warmup)
            if "skipped" in r:
                emit(f"{variant}_tokens_per_s", None, "tokens/s", skipped=r["skipped"])
                continue
            tokens_per_s[variant] = r["tokens_per_s"]
            extra = {k: round(r[k], 4) for k in ("step_s", "loss", "peak_memory_gib") if k in r}
            emit(f"{variant}_tokens_per_s", r["tokens_per_s"], "tokens/s",
                 micro_batch=r["micro_batch"], micro_batches=r["micro_batches"],
                 tokens_per_step=r["tokens_per_step"], **extra,
                 **({"recipe": f"{args.fp8}/{args.fp8_recipe}"} if fp8 else {}))
            achieved = r["tokens_per_s"] * flops_per_token / 1e12
            emit(f"{variant}_model_tflops", achieved, "TFLOP/s")
            if peak:
                variant_peak = peak[0] if variant in ("bf16", "fp32") else peak[1]
                if variant_peak:
                    emit(f"{variant}_mfu", achieved / variant_peak, "fraction",
                         peak_tflops=variant_peak)
            else:
                emit(f"{variant}_mfu_vs_measured_gemm", achieved / gemm, "fraction",
                     gemm_tflops=round(gemm, 4))
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
        if "bf16" in tokens_per_s and "fp8" in tokens_per_s:
            hopper = on_gpu and torch.cuda.get_device_capability()[0] >= 9
            emit("fp8_speedup", tokens_per_s["fp8"] / tokens_per_s["bf16"], "ratio",
                 **({"goal": ">= 1.3"} if hopper else {}))
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
