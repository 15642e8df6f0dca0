"""The momentum model's EMA fused into the Adam step, against Adam alone and a separate EMA pass
(issue 5); and the EMA's memory per rank, sharded over data-parallel ranks.

    python benchmarks/ema_step.py [--numel 16777216] [--repeats 15]

Step time, on one rank's optimizer shard (`--numel` fp32 elements in tensors shaped like a
Llama layer's, with their grads), best of `--repeats`, the variants interleaved so that drift
on a shared machine hits them alike:

  torch_adamw            torch.optim.AdamW: what megatron-core steps on CPU without TE/apex
  adam                   AdamEMA with no EMA armed (the same math, tiled foreach kernels)
  adam_fused_ema         AdamEMA with the EMA folded into the same pass over each tile
  adam_separate_ema      AdamEMA, then `ema_update_` over the whole shard

Counting tensor traffic, Adam reads grad, param, exp_avg, exp_avg_sq and writes three of them
(7 passes); the fused EMA adds a read and a write of the EMA (9/7 = 1.29); a separate pass also
re-reads the param (10/7 = 1.43).

On a GPU (when one is present) the Triton kernel: fused / Adam alone (the same kernel with
the EMA off), and its achieved bandwidth (9 fp32 transfers per element) against a
device-to-device copy's.

Memory: the tiny smoke model under the distributed optimizer at DP=1 and DP=2 (gloo, spawned
processes): EMA bytes on each rank per model parameter, against the goal 4 / DP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def shard_tensors(numel: int, seed: int = 0):
    """fp32 params (with grads) summing to about `numel`, in a Llama layer's proportions."""
    parts = [4, 1, 1, 4, 11, 11, 11]  # q, k, v, o, gate, up, down (GQA 4:1, ffn 2.75x)
    unit = numel // sum(parts)
    g = torch.Generator().manual_seed(seed)
    params = []
    for n in parts:
        p = torch.nn.Parameter(torch.randn(n * unit, generator=g))
        p.grad = torch.randn(n * unit, generator=g) * 1e-3
        params.append(p)
    return params


def step_times(numel: int, repeats: int) -> dict:
    from megatron_mgrpo.algorithm import ema_update_
    from megatron_mgrpo.optim.adam_ema import AdamEMA

    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    torch_params = shard_tensors(numel)
    torch_adam = torch.optim.AdamW(torch_params, **hyper)
    params = shard_tensors(numel)
    adam = AdamEMA(params, **hyper)
    ema = [p.detach().clone() for p in params]
    adam.attach_ema(zip(params, ema))

    def fused():
        adam.ema_momentum = 0.99
        adam.step()

    def separate():
        adam.step()
        ema_update_(ema, [p.detach() for p in params], 0.99)

    variants = {"torch_adamw": torch_adam.step, "adam": adam.step,
                "adam_fused_ema": fused, "adam_separate_ema": separate}
    for fn in variants.values():  # state allocation and warm-up
        fn()
    best = {k: float("inf") for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def gpu_figures(numel: int, repeats: int) -> list:
    """The Triton kernel on the lent GPU: its ratio to Adam alone (the same kernel without the
    EMA) and its achieved bandwidth against a device-to-device copy's."""
    from megatron_mgrpo.optim.triton_adam_ema import adam_ema_triton_

    g = torch.Generator(device="cuda").manual_seed(0)
    ts = [torch.randn(numel, device="cuda", generator=g) for _ in range(5)]
    ts[3].abs_()
    kw = dict(step=3.0, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best

    p, gr, m, v, e = ([t] for t in ts)
    adam = timed(lambda: adam_ema_triton_(p, gr, m, v, None, momentum=None, **kw))
    fused = timed(lambda: adam_ema_triton_(p, gr, m, v, e, momentum=0.99, **kw))
    dst = torch.empty_like(ts[0])
    copy = timed(lambda: dst.copy_(ts[0]))
    copy_bw = 2 * 4 * numel / copy
    fused_bw = 9 * 4 * numel / fused
    return [("ema_step.gpu_fused_over_adam", fused / adam, "ratio", "<= 1.3"),
            ("ema_step.gpu_fused_bandwidth", fused_bw / 1e9, "GB/s", None),
            ("ema_step.gpu_copy_bandwidth", copy_bw / 1e9, "GB/s", None),
            ("ema_step.gpu_fused_bandwidth_over_copy", fused_bw / copy_bw, "ratio", None)]


def _memory_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.optim.momentum import MomentumSchedule, ShardedMomentum
    from megatron_mgrpo.parallel import destroy_parallel, init_parallel

    cfg = load_config(os.path.join(ROOT, "examples/tiny/smoke.yaml"),
                      ["--parallel.use_distributed_optimizer", "true"])
    ctx = init_parallel(cfg.parallel, seed=0)
    policy = MegatronPolicy(cfg, ctx)
    momentum = ShardedMomentum(policy, MomentumSchedule())
    params = sum(p.numel() for p in policy.parameters())
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump({"bytes": momentum.nbytes(), "params": params, "dp": ctx.dp_size}, f)
    destroy_parallel()


def ema_bytes_per_param(world: int) -> float:
    """Max over ranks of EMA bytes / model parameters, at DP = `world`."""
    import torch.multiprocessing as mp

    from megatron_mgrpo.parallel import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_memory_rank, args=(world, free_port(), out_dir), nprocs=world,
                           start_method="spawn")
        ranks = [json.load(open(os.path.join(out_dir, f"{r}.json"))) for r in range(world)]
    assert all(r["dp"] == world for r in ranks)
    return max(r["bytes"] / r["params"] for r in ranks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--gpu-numel", type=int, default=1 << 28, help="shard size on a GPU")
    args = p.parse_args()

    t = step_times(args.numel, args.repeats)
    figures = [
        ("ema_step.shard_numel", args.numel, "elements", None),
        ("ema_step.torch_adamw_ms", 1e3 * t["torch_adamw"], "ms", None),
        ("ema_step.adam_ms", 1e3 * t["adam"], "ms", None),
        ("ema_step.fused_over_adam", t["adam_fused_ema"] / t["adam"], "ratio", "<= 1.3"),
        ("ema_step.separate_over_adam", t["adam_separate_ema"] / t["adam"], "ratio", None),
        ("ema_step.fused_over_separate", t["adam_fused_ema"] / t["adam_separate_ema"], "ratio",
         None),
        ("ema_step.fused_over_torch_adamw", t["adam_fused_ema"] / t["torch_adamw"], "ratio",
         None),
    ]
    if torch.cuda.is_available():
        figures += gpu_figures(args.gpu_numel, args.repeats)
    for world in (1, 2):
        figures.append((f"ema_step.ema_bytes_per_param_dp{world}", ema_bytes_per_param(world),
                        "bytes/param", f"== {4 / world:g} (4 / DP)"))
    for name, value, unit, goal in figures:
        line = {"name": name, "value": round(float(value), 4), "unit": unit}
        if goal:
            line["goal"] = goal
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
