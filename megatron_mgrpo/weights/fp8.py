"""FP8 (E4M3) rollout weights: the HF checkpoint format that SGLang serves as `quant_method: fp8`.

The rollout engine may serve the policy and the momentum model with FP8 weights while training
stays in BF16: each linear weight of a transformer layer is sent as `<name>.weight` in
float8_e4m3fn plus its dequantisation scale, everything else (embeddings, lm_head, norms,
biases) in bf16. Two layouts, both of them SGLang's (and DeepSeek-V3's / Qwen3-FP8's):

- block-wise (`block_size` b > 0): one fp32 scale per b x b tile, `<name>.weight_scale_inv`
  of shape [ceil(out / b), ceil(in / b)]; the weight is `q * scale_inv` tile by tile.
- per-tensor (`block_size` 0): one fp32 scalar, `<name>.weight_scale`; the weight is
  `q * scale`.

A weight and its scale travel in the same bucket (`quantize_stream` yields them as one group),
so a receiver can dequantise each bucket on its own (`dequantize_bucket`).
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
# The smallest scale: an all-zero tile quantises to zeros, not NaNs.
_TINY = 1e-12

Named = Tuple[str, torch.Tensor]


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """The linear weights of the transformer layers (attention and MLP projections)."""
    return (len(shape) == 2 and name.startswith("model.layers.")
            and name.endswith("_proj.weight"))


def quantize(weight: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q in float8_e4m3fn, scale in fp32) with `weight ~= q * scale` (per tile, or per
    tensor when block_size is 0). Each tile's largest magnitude maps onto FP8's 448."""
    w = weight.detach().float()
    if block_size <= 0:
        scale = (w.abs().amax().clamp(min=_TINY) / FP8_MAX).reshape(())
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    rows, cols = w.shape
    br, bc = -(-rows // block_size), -(-cols // block_size)
    padded = w.new_zeros(br * block_size, bc * block_size)
    padded[:rows, :cols] = w
    tiles = padded.view(br, block_size, bc, block_size)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=_TINY) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(br * block_size, bc * block_size)[:rows, :cols]
    return q.contiguous().to(FP8_DTYPE), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block_size: Optional[int] = None
               ) -> torch.Tensor:
    """fp32 weight of an FP8 tensor and its scale: a scalar, or one per `block_size` tile
    (the tiling cannot be read off the shapes: 37 x 150 in 1 x 2 tiles may be b = 75 or 128)."""
    w = q.float()
    if scale.dim() <= 1 and scale.numel() == 1:  # one per tensor ([] or [1])
        return w * scale.float().reshape(())
    if not block_size:
        raise ValueError(f"block scales of shape {tuple(scale.shape)} but no block size (the "
                         "receiver's quantization_config.weight_block_size)")
    if q.dim() != 2 or tuple(scale.shape) != scale_shape(q.shape, block_size):
        raise ValueError(f"scales of shape {tuple(scale.shape)} do not tile a weight of shape "
                         f"{tuple(q.shape)} in {block_size} x {block_size} blocks")
    rows, cols = q.shape
    full = scale.float().repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return w * full[:rows, :cols]


def scale_name(weight_name: str, block_size: int) -> str:
    return weight_name + ("_scale_inv" if block_size > 0 else "_scale")


def scale_shape(shape: Sequence[int], block_size: int) -> Tuple[int, ...]:
    if block_size <= 0:
        return ()
    return tuple(-(-n // block_size) for n in shape)


def quantize_stream(named: Iterable[Named], block_size: int) -> Iterator[List[Named]]:
    """Groups of (HF name, tensor) in FP8 format: [weight, its scale] for a layer's linear
    weight, [tensor in bf16] for anything else. Bucket the groups, not the tensors, so that a
    weight never travels without its scale."""
    for name, t in named:
        if quantizable(name, t.shape):
            q, scale = quantize(t, block_size)
            yield [(name, q), (scale_name(name, block_size), scale)]
        else:
            yield [(name, t if t.dtype == torch.bfloat16 else t.to(torch.bfloat16))]


def dequantize_bucket(bucket: Sequence[Named], block_size: Optional[int] = None
                      ) -> List[Named]:
    """The bucket with each FP8 weight and its scale replaced by the fp32 weight, in order
    (`block_size`: the receiver's tile size, needed for block scales).
    A weight without its scale (or a scale without its weight) is an error: a sender that
    splits them would otherwise load raw FP8 codes as weights."""
    scales: Dict[str, torch.Tensor] = {}
    for name, t in bucket:
        for suffix in SCALE_SUFFIXES:
            if name.endswith(suffix):
                base = name[:-len(suffix)] + ".weight"
                if base in scales:
                    raise ValueError(f"{base!r} has two scales in one bucket")
                scales[base] = t
    if not scales and not any(t.dtype == FP8_DTYPE for _, t in bucket):
        return list(bucket)
    out: List[Named] = []
    used = set()
    for name, t in bucket:
        if name.endswith(SCALE_SUFFIXES):
            continue
        if t.dtype == FP8_DTYPE:
            scale: Optional[torch.Tensor] = scales.get(name)
            if scale is None:
                raise ValueError(f"{name!r} is FP8 but its scale ({name}_scale_inv or "
                                 f"{name}_scale) is not in the same bucket")
            out.append((name, dequantize(t, scale, block_size)))
            used.add(name)
        else:
            out.append((name, t))
    orphans = sorted(set(scales) - used)
    if orphans:
        raise ValueError(f"a scale came without its FP8 weight: {orphans[0]!r} is not in the "
                         "bucket (or not FP8)")
    return out


def quantization_config(block_size: int) -> dict:
    """The `quantization_config` of config.json for this format (SGLang's and HF's `fp8`)."""
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if block_size > 0:
        cfg["weight_block_size"] = [block_size, block_size]
    return cfg


def is_fp8_config(hf_config: dict) -> bool:
    """Whether an HF config.json describes a checkpoint in this FP8 format."""
    q = hf_config.get("quantization_config") or {}
    return q.get("quant_method") == "fp8"


def block_size_of(hf_config: dict) -> Optional[int]:
    """The scale tile size of an FP8 config (None: not FP8, or one scale per tensor)."""
    if not is_fp8_config(hf_config):
        return None
    block = hf_config["quantization_config"].get("weight_block_size")
    if not block:
        return None
    if len(block) != 2 or block[0] != block[1]:
        raise ValueError(f"quantization_config.weight_block_size: got {block}; accepted: "
                         "square tiles [b, b]")
    return int(block[0])


def quantize_hf_dir(src: str, dst: str, block_size: int = 128, overwrite: bool = False,
                    log=print) -> Dict[str, int]:
    """Write the HF model directory `src` as an FP8 checkpoint at `dst` (shard by shard, one
    tensor in memory at a time): what an FP8 SGLang server starts from before FP8 weights are
    pushed into it. Tokenizer files come along; config.json gains `quantization_config`."""
    import glob
    import os

    from megatron_mgrpo.models.architecture import read_hf_config
    from megatron_mgrpo.weights.files import (ConversionError, copy_tokenizer, staged_dir,
                                              write_json)
    from megatron_mgrpo.weights.safetensors_io import (DTYPES, StreamingWriter, read_header,
                                                       read_tensor)

    if not os.path.isdir(src):
        what = "not a directory" if os.path.exists(src) else "no such directory"
        raise ConversionError(f"{src!r}: {what} (give an HF model directory)")
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    if not files:
        raise ConversionError(f"{src!r}: no *.safetensors files")
    config = read_hf_config(src)
    if is_fp8_config(config):
        raise ConversionError(f"{src!r} is already an FP8 checkpoint")
    weight_map: Dict[str, str] = {}
    stats = {"tensors": 0, "quantized": 0, "bytes": 0}
    with staged_dir(dst, overwrite) as tmp:
        for file in files:
            header, start = read_header(file)
            entries = [(n, e) for n, e in header.items() if n != "__metadata__"]
            layout = []
            for name, e in entries:
                if e["dtype"] not in DTYPES:
                    raise ConversionError(f"{file}: {name} has dtype {e['dtype']}, which is not "
                                          "supported")
                if quantizable(name, e["shape"]):
                    layout += [(name, e["shape"], FP8_DTYPE),
                               (scale_name(name, block_size),
                                scale_shape(e["shape"], block_size), torch.float32)]
                else:
                    layout.append((name, e["shape"], torch.bfloat16))
            base = os.path.basename(file)
            writer = StreamingWriter(os.path.join(tmp, base), layout)
            try:
                with open(file, "rb") as f:
                    for group in quantize_stream(((n, read_tensor(f, e, start))
                                                  for n, e in entries), block_size):
                        for n, t in group:
                            writer.write(n, t)
                            weight_map[n] = base
                            stats["bytes"] += t.numel() * t.element_size()
                        stats["tensors"] += 1
                        stats["quantized"] += len(group) == 2
                writer.close()
            except BaseException:
                writer.discard()
                raise
            log(f"[fp8] {base}: {len(entries)} tensors")
        if len(files) > 1 or os.path.isfile(os.path.join(src, "model.safetensors.index.json")):
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": stats["bytes"]}, "weight_map": weight_map})
        config["quantization_config"] = quantization_config(block_size)
        config["torch_dtype"] = config["dtype"] = "bfloat16"
        write_json(os.path.join(tmp, "config.json"), config)
        copy_tokenizer(src, tmp)
    return stats
