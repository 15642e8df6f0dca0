"""Write the policy (or the momentum model) as an HF model directory.

Tensors come from the same gather-and-convert path as the live weight push (`iter_hf_tensors`)
and go to disk shard by shard (`model-0000i-of-0000N.safetensors` + index), so only one shard
is held at a time beside the model. The directory is written under a temporary name and renamed
when complete: an interrupted export never looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_mgrpo.models.architecture import hf_config_dict, read_hf_config
from megatron_mgrpo.weights.push import bucketize, iter_hf_tensors

# Files of an HF model directory that belong to its tokenizer (copied along with an export).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "mgrpo_tokenizer.json", "vocab.json", "merges.txt",
                   "generation_config.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def export_hf(policy, out_dir: str, momentum=None, dtype: torch.dtype = torch.bfloat16,
              shard_bytes: int = 2 * 2 ** 30, tokenizer_dir: Optional[str] = None,
              overwrite: bool = False) -> Dict[str, object]:
    """Export the policy, or with `momentum` its EMA, to `out_dir`. Collective over the TP
    group; one pipeline stage only (the export tool runs at TP=1, PP=1 and loads a checkpoint
    of any layout). Returns {"tensors", "bytes", "shards"}."""
    from safetensors.torch import save_file

    if policy.ctx.pp_size != 1:
        raise ValueError("export_hf runs with pipeline_parallel 1 (load the checkpoint at PP=1; "
                         "dist_checkpointing reshards it)")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists; pass overwrite=True (--force) to replace it")
    writer = policy.ctx.rank == 0
    tmp = out_dir.rstrip("/") + ".tmp"
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    tensor_of = momentum.tensor_of if momentum is not None else None
    names, weight_map, total, shards = [], {}, 0, []
    for bucket in bucketize(iter_hf_tensors(policy, tensor_of=tensor_of, dtype=dtype),
                            shard_bytes):
        if writer:
            shard = f"shard-{len(shards):05d}.safetensors"
            save_file({n: t.contiguous().clone() for n, t in bucket}, os.path.join(tmp, shard),
                      metadata={"format": "pt"})
            shards.append(shard)
            for n, t in bucket:
                weight_map[n] = shard
                total += t.numel() * t.element_size()
                names.append(n)
    if writer:
        final_names = {s: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                       for i, s in enumerate(shards)}
        if len(shards) == 1:
            final_names = {shards[0]: "model.safetensors"}
        for old, new in final_names.items():
            os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: final_names[s] for n, s in weight_map.items()}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        # Keep the source model's other fields (special token ids, ...); ours win on the
        # architecture, which is what the tensors were laid out for.
        config = {}
        if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "config.json")):
            config = read_hf_config(tokenizer_dir)
        config.update(hf_config_dict(policy.model_cfg))
        config["torch_dtype"] = config["dtype"] = _DTYPE_NAMES[dtype]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    if dist.is_initialized() and policy.ctx.world_size > 1:
        dist.barrier()
    return {"tensors": len(names), "bytes": total, "shards": len(shards)}
