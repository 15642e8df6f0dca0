"""Export a training checkpoint as an HF model directory (policy or momentum model).

    python tools/convert_megatron_to_hf.py --ckpt runs/tiny [--model momentum] \
        [--dtype bf16|fp32] --out runs/tiny_hf

`--ckpt` is a run directory (its newest checkpoint) or one `checkpoints/step_*` directory. The
checkpoint may have been saved at any TP/PP/DP layout: it is loaded here at TP=1, PP=1 in one
process (dist_checkpointing reshards it) and written with the same HF map as the live weight
push. The run's config (saved in the checkpoint) gives the architecture; tokenizer files and
special-token ids are copied from the base model directory (`model.load`) when it exists.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="run dir or checkpoints/step_* dir")
    p.add_argument("--out", required=True, help="HF model directory to write")
    p.add_argument("--model", choices=("policy", "momentum"), default="policy",
                   help="export the policy or the momentum model (its EMA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def resolve_checkpoint(path: str) -> str:
    from megatron_mgrpo.checkpoint import latest_step, step_dir

    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    last = latest_step(path)
    if last is None:
        raise SystemExit(f"convert: no checkpoint in {path!r} (expected a run dir with "
                         "checkpoints/latest, or a checkpoints/step_* dir)")
    return step_dir(path, last)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_mgrpo.checkpoint import load_checkpoint, read_trainer_state
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.optim.momentum import MomentumModel
    from megatron_mgrpo.parallel import destroy_parallel, init_parallel
    from megatron_mgrpo.weights.export import export_hf

    ckpt = resolve_checkpoint(args.ckpt)
    state = read_trainer_state(ckpt)
    if "config" not in state:
        raise SystemExit(f"convert: {ckpt!r} holds no run config (saved by an older version)")
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(state["config"])
    cfg = load_config(f.name, ["--parallel.tensor_parallel", "1",
                               "--parallel.pipeline_parallel", "1"], world_size=1)
    os.unlink(f.name)
    if args.model == "momentum" and cfg.algorithm.mode != "mgrpo":
        raise SystemExit(f"convert: the run's mode is {cfg.algorithm.mode!r}: it has no "
                         "momentum model")
    t0 = time.time()
    try:
        ctx = init_parallel(cfg.parallel, seed=cfg.training.seed)
        policy = MegatronPolicy(cfg, ctx)
        momentum = (MomentumModel(list(policy.unwrapped.parameters()), cfg.algorithm.momentum)
                    if cfg.algorithm.mode == "mgrpo" else None)
        load_checkpoint(ckpt, policy, momentum, load_optimizer=False)
        stats = export_hf(policy, args.out,
                          momentum=momentum if args.model == "momentum" else None,
                          dtype=DTYPES[args.dtype], tokenizer_dir=cfg.model.load,
                          overwrite=args.force)
    finally:
        destroy_parallel()
    print(f"{ckpt} ({args.model}, step {state['step']}) -> {args.out}: {stats['tensors']} "
          f"tensors, {stats['bytes'] / 2 ** 20:.1f} MiB in {stats['shards']} shard(s), "
          f"{time.time() - t0:.1f}s")
    return stats


if __name__ == "__main__":
    try:
        main()
    except FileExistsError as e:
        raise SystemExit(f"convert: {e}")
