"""Write an HF model directory as an FP8 (E4M3) checkpoint for an FP8 SGLang rollout server.

    python tools/quantize_fp8.py --src /models/Llama-3-8B --out /models/Llama-3-8B-fp8 \
        [--block-size 128] [--force]

The layers' linear weights become float8_e4m3fn with one fp32 scale per 128 x 128 tile
(`weight_scale_inv`; `--block-size 0`: one `weight_scale` per tensor), everything else bf16,
and config.json gains `quantization_config: {quant_method: fp8, ...}`: the format SGLang serves
with FP8 GEMMs, and into which `rollout.weight_format: fp8` pushes (`sglang.launch` makes this
copy itself; use this tool for servers you start yourself). One tensor in memory at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    from megatron_mgrpo.config import ConfigError
    from megatron_mgrpo.weights.files import tool_errors
    from megatron_mgrpo.weights.fp8 import quantize_hf_dir
    from megatron_mgrpo.weights.safetensors_io import SafetensorsError

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="HF model directory (bf16/fp16/fp32)")
    p.add_argument("--out", required=True, help="FP8 HF model directory to write")
    p.add_argument("--block-size", type=int, default=128,
                   help="scale tile size (0: one scale per tensor)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if args.block_size < 0:
        p.error(f"--block-size: got {args.block_size}; accepted: an integer >= 0")
    t0 = time.time()
    with tool_errors("quantize_fp8", ConfigError, SafetensorsError):
        stats = quantize_hf_dir(args.src, args.out, args.block_size, overwrite=args.force,
                                log=lambda line: print(line, file=sys.stderr))
    print(f"{args.src} -> {args.out}: {stats['quantized']} of {stats['tensors']} tensors in "
          f"FP8, {stats['bytes'] / 2 ** 20:.1f} MiB, {time.time() - t0:.1f}s")
    return stats


if __name__ == "__main__":
    main()
