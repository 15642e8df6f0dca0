"""HF <-> Megatron names and layouts for Llama 3, Qwen2/2.5 and Qwen3 (full, unsplit tensors).

One source of truth for the conversion tools and the live weight push. Most tensors map one to
one by name (the table below); two are fused in Megatron:
- `linear_qkv` = per KV group g: [q heads of g; k_g; v_g] stacked on dim 0 (GQA-aware), from
  HF's q_proj, k_proj, v_proj (weights and, for Qwen2, biases);
- `linear_fc1` = [gate_proj; up_proj] (SwiGLU).
Both directions work tensor by tensor over any mapping (a dict, or a lazy safetensors reader),
so a converter never holds more than one layer's attention weights at once.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple

import torch

from megatron_mgrpo.config.schema import ModelConfig
from megatron_mgrpo.models.architecture import complete

# Megatron name pattern ({i} = global layer index) -> HF name pattern, for 1:1 tensors.
_ONE_TO_ONE = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.pre_mlp_layernorm.weight":
        "model.layers.{i}.post_attention_layernorm.weight",
    "decoder.layers.{i}.self_attention.linear_proj.weight":
        "model.layers.{i}.self_attn.o_proj.weight",
    "decoder.layers.{i}.self_attention.q_layernorm.weight":
        "model.layers.{i}.self_attn.q_norm.weight",
    "decoder.layers.{i}.self_attention.k_layernorm.weight":
        "model.layers.{i}.self_attn.k_norm.weight",
    "decoder.layers.{i}.mlp.linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_QKV = "decoder.layers.{i}.self_attention.linear_qkv.{kind}"
_FC1 = "decoder.layers.{i}.mlp.linear_fc1.weight"


def _qkv_dims(m: ModelConfig) -> Tuple[int, int, int]:
    m = complete(m)
    groups = m.num_key_value_heads
    return groups, m.num_attention_heads // groups, m.head_dim


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """HF q/k/v projections (weights [out, in] or biases [out]) -> Megatron's linear_qkv."""
    groups, per_group, hd = _qkv_dims(m)
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * hd, *rest)
    k = k.reshape(groups, hd, *rest)
    v = v.reshape(groups, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * hd, *rest)


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv."""
    groups, per_group, hd = _qkv_dims(m)
    rest = qkv.shape[1:]
    x = qkv.reshape(groups, (per_group + 2) * hd, *rest)
    q, k, v = x.split([per_group * hd, hd, hd], dim=1)
    return (q.reshape(groups * per_group * hd, *rest), k.reshape(groups * hd, *rest),
            v.reshape(groups * hd, *rest))


def expected_megatron_names(m: ModelConfig) -> Iterator[str]:
    """Every full Megatron tensor of the model, layer by layer, in conversion order."""
    m = complete(m)
    for i in range(m.num_layers):
        for mg in _ONE_TO_ONE:
            if "{i}" not in mg:
                continue
            if "layernorm" in mg and ("q_layernorm" in mg or "k_layernorm" in mg) and not m.qk_norm:
                continue
            yield mg.format(i=i)
        yield _QKV.format(i=i, kind="weight")
        if m.attention_bias:
            yield _QKV.format(i=i, kind="bias")
        yield _FC1.format(i=i)
    yield "embedding.word_embeddings.weight"
    yield "decoder.final_layernorm.weight"
    if not m.tie_word_embeddings:
        yield "output_layer.weight"


def megatron_shapes(m: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Full (TP=1, unpadded vocabulary) shape of every Megatron tensor, in conversion order."""
    m = complete(m)
    h, hd, f, v = m.hidden_size, m.head_dim, m.intermediate_size, m.vocab_size
    qkv = (m.num_attention_heads + 2 * m.num_key_value_heads) * hd
    by_suffix = {
        "word_embeddings.weight": (v, h), "output_layer.weight": (v, h),
        "layernorm.weight": (h,), "linear_qkv.weight": (qkv, h), "linear_qkv.bias": (qkv,),
        "linear_proj.weight": (h, m.num_attention_heads * hd), "linear_fc1.weight": (2 * f, h),
        "linear_fc2.weight": (h, f), "q_layernorm.weight": (hd,), "k_layernorm.weight": (hd,),
    }
    out = {}
    for name in expected_megatron_names(m):
        suffix = max((s for s in by_suffix if name.endswith(s)), key=len)
        out[name] = by_suffix[suffix]
    return out


def hf_shapes(m: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Shape of every HF tensor the model needs (from the same map, on meta tensors)."""
    out = {}
    for name, shape in megatron_shapes(m).items():
        for hf_name, t in megatron_to_hf_tensors(name, torch.empty(shape, device="meta"), m):
            out[hf_name] = tuple(t.shape)
    return out


def hf_to_megatron(hf: Mapping[str, torch.Tensor], m: ModelConfig,
                   names: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) for every Megatron tensor of the model (or only `names`),
    reading `hf` by key. A missing HF tensor raises KeyError naming it."""
    wanted = None if names is None else set(names)
    def get(name):
        if name not in hf:
            raise KeyError(f"HF checkpoint has no tensor {name!r}")
        return hf[name]

    for mg in expected_megatron_names(m):
        if wanted is not None and mg not in wanted:
            continue
        layer = re.match(r"decoder\.layers\.(\d+)\.", mg)
        i = layer.group(1) if layer else None
        if mg.endswith("linear_qkv.weight") or mg.endswith("linear_qkv.bias"):
            kind = mg.rsplit(".", 1)[1]
            base = f"model.layers.{i}.self_attn"
            yield mg, fuse_qkv(get(f"{base}.q_proj.{kind}"), get(f"{base}.k_proj.{kind}"),
                               get(f"{base}.v_proj.{kind}"), m)
        elif mg.endswith("linear_fc1.weight"):
            base = f"model.layers.{i}.mlp"
            yield mg, torch.cat([get(f"{base}.gate_proj.weight"), get(f"{base}.up_proj.weight")])
        else:
            pattern = re.sub(r"decoder\.layers\.\d+\.", "decoder.layers.{i}.", mg)
            yield mg, get(_ONE_TO_ONE[pattern].format(i=i))


def megatron_to_hf_tensors(name: str, tensor: torch.Tensor, m: ModelConfig
                           ) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one full Megatron tensor (used by export and weight push)."""
    layer = re.match(r"decoder\.layers\.(\d+)\.", name)
    i = layer.group(1) if layer else None
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        kind = name.rsplit(".", 1)[1]
        q, k, v = split_qkv(tensor, m)
        base = f"model.layers.{i}.self_attn"
        yield f"{base}.q_proj.{kind}", q
        yield f"{base}.k_proj.{kind}", k
        yield f"{base}.v_proj.{kind}", v
    elif name.endswith("linear_fc1.weight"):
        gate, up = tensor.chunk(2, dim=0)
        yield f"model.layers.{i}.mlp.gate_proj.weight", gate
        yield f"model.layers.{i}.mlp.up_proj.weight", up
    else:
        pattern = re.sub(r"decoder\.layers\.\d+\.", "decoder.layers.{i}.", name)
        if pattern not in _ONE_TO_ONE:
            raise KeyError(f"no HF name for Megatron tensor {name!r}")
        yield _ONE_TO_ONE[pattern].format(i=i), tensor


def megatron_to_hf(mg: Mapping[str, torch.Tensor], m: ModelConfig
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield HF (name, tensor) pairs for a full Megatron state dict (tied models: no lm_head)."""
    for name in expected_megatron_names(m):
        yield from megatron_to_hf_tensors(name, mg[name], m)
