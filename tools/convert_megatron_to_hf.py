"""Export a training checkpoint (policy or momentum model) or a converted model as an HF directory.

    python tools/convert_megatron_to_hf.py --ckpt runs/tiny --out runs/tiny_hf \
        [--model policy|momentum] [--dtype source|bf16|fp32] [--force]

`--ckpt` is a run directory (its newest checkpoint), one `checkpoints/step_*` directory, or the
output of convert_hf_to_megatron.py. The checkpoint may have been saved at any TP/PP/DP layout:
tensors are read one at a time out of the dist checkpoint (no model is built) and written as
safetensors (one file, or shards of at most --shard-gb; `model.safetensors.index.json` either
way), with config.json and the tokenizer files of the base model, so
`AutoModelForCausalLM.from_pretrained(out)` works offline. The output appears under its name
only when complete. Tensors keep their dtype unless `--dtype` names one. Bad input, an unwritable
output or a failed read is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from megatron_mgrpo.weights.convert import DTYPE_CHOICES, parse_dtype

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="run dir, checkpoints/step_* dir or converted dir")
    p.add_argument("--out", required=True, help="HF model directory to write")
    p.add_argument("--model", choices=("policy", "momentum"), default="policy",
                   help="export the policy or the momentum model (its EMA)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="source",
                   help="dtype of the written tensors (default: source, each tensor's own)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest safetensors shard")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    args.dtype = parse_dtype(args.dtype)
    return args


def main(argv=None) -> dict:
    from megatron_mgrpo.config import ConfigError
    from megatron_mgrpo.weights.convert import export_megatron_to_hf
    from megatron_mgrpo.weights.files import tool_errors
    from megatron_mgrpo.weights.safetensors_io import SafetensorsError

    args = parse_args(argv)
    with tool_errors("convert_megatron_to_hf", ConfigError, SafetensorsError):
        stats = export_megatron_to_hf(args.ckpt, args.out, args.model, args.dtype,
                                      overwrite=args.force,
                                      shard_bytes=int(args.shard_gb * 2 ** 30),
                                      log=lambda line: print(line, file=sys.stderr))
    print(f"{stats['source']} -> {args.out}: {stats['tensors']} tensors, "
          f"{stats['bytes'] / 2 ** 20:.1f} MiB ({stats['dtype']}) in {stats['shards']} shard(s), "
          f"{stats['seconds']:.1f}s")
    return stats


if __name__ == "__main__":
    main()
