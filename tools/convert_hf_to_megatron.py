"""Convert an HF model directory to a megatron-core dist checkpoint the trainer loads at any TP/PP.

    python tools/convert_hf_to_megatron.py --hf-dir /models/Llama-3.1-8B --out /ckpt/llama8b \
        [--tp 8] [--pp 1] [--dtype source|bf16|fp32] [--force]

The output holds config.json and the tokenizer files of the source beside `dist_checkpoint/`;
point `model.load` at it. Tensors are read, converted and written one at a time (memory stays
near the largest tensor, not the model). `--tp` chunks tensors as a TP=N save would, so ranks
at that TP read only their own chunks; any other TP/PP still loads it. Every tensor's name,
shape and dtype is checked against config.json before anything is written, and the output
appears under its name only when complete. Tensors keep their dtype unless `--dtype` names
one. Bad input, an unwritable output or a failed read is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from megatron_mgrpo.weights.convert import DTYPE_CHOICES, parse_dtype

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json, safetensors)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--tp", type=int, default=1, help="chunk tensors for this tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="check this pipeline parallel size")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="source",
                   help="dtype of the written tensors (default: source, each tensor's own)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    args.dtype = parse_dtype(args.dtype)
    return args


def main(argv=None) -> dict:
    from megatron_mgrpo.config import ConfigError
    from megatron_mgrpo.weights.convert import convert_hf_to_megatron
    from megatron_mgrpo.weights.files import tool_errors
    from megatron_mgrpo.weights.safetensors_io import SafetensorsError

    args = parse_args(argv)
    with tool_errors("convert_hf_to_megatron", ConfigError, SafetensorsError):
        record = convert_hf_to_megatron(args.hf_dir, args.out, args.tp, args.pp, args.dtype,
                                        overwrite=args.force,
                                        log=lambda line: print(line, file=sys.stderr))
    print(f"{args.hf_dir} -> {args.out}: {record['tensors']} tensors, "
          f"{record['bytes'] / 2 ** 20:.1f} MiB ({record['dtype']}, chunked for "
          f"TP={args.tp}), {record['seconds']:.1f}s")
    return record


if __name__ == "__main__":
    main()
