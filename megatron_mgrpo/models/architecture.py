"""HF-style architecture descriptions: read an HF config.json, fill in family defaults.

The policy is always described in Hugging Face terms (the names users see in config.json); this
module turns that description into a complete `ModelConfig` and back into an HF config dict, so
that the conversion tools and the rollout engine's transformers models agree with Megatron.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict

from megatron_mgrpo.config.schema import ConfigError, ModelConfig

# HF `model_type` / `architectures` -> our family name.
_FAMILY_OF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_HF_ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
# ModelConfig field <- HF config key, for the keys whose names differ or matter.
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "attention_bias": "attention_bias",
}


def read_hf_config(path: str) -> Dict[str, Any]:
    """Load an HF config.json (given the file or its directory) as a dict."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"model.hf_config: no config.json at {path!r}")
    with open(file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.hf_config: {file} is not valid JSON ({e})") from None


def model_config_from_hf(hf: Dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """Build a ModelConfig from an HF config dict (fields missing there keep `base`'s value)."""
    model_type = hf.get("model_type")
    family = _FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise ConfigError(f"model.hf_config: model_type {model_type!r} is not supported; "
                          f"accepted: {' | '.join(_FAMILY_OF_MODEL_TYPE)}")
    values = dataclasses.asdict(base or ModelConfig())
    values["architecture"] = family
    for ours, theirs in _HF_KEYS.items():
        if theirs in hf and (hf[theirs] is not None or ours in ("head_dim", "rope_scaling")):
            values[ours] = hf[theirs]
    # HF nests rope_theta inside rope_parameters in newer transformers releases.
    rope_params = hf.get("rope_parameters")
    if isinstance(rope_params, dict):
        if "rope_theta" in rope_params:
            values["rope_theta"] = rope_params["rope_theta"]
        if rope_params.get("rope_type", "default") != "default":
            values["rope_scaling"] = dict(rope_params)
    if family == "qwen3":
        values["qk_norm"] = True
    return _fill_defaults(ModelConfig(**values))


def complete(m: ModelConfig) -> ModelConfig:
    """The full architecture: from `hf_config`, else from the config.json of `load`, else from
    the fields themselves; then the family defaults (kv heads, head_dim, QKV bias, QK-norm)."""
    source = m.hf_config or m.load
    if source:
        m = model_config_from_hf(read_hf_config(source), dataclasses.replace(m, hf_config=None))
    return _fill_defaults(m)


def _fill_defaults(m: ModelConfig) -> ModelConfig:
    kv = m.num_key_value_heads or m.num_attention_heads
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    attention_bias = m.attention_bias if m.attention_bias is not None else (
        m.architecture == "qwen2")
    qk_norm = m.qk_norm if m.qk_norm is not None else (m.architecture == "qwen3")
    return dataclasses.replace(m, num_key_value_heads=kv, head_dim=head_dim,
                               attention_bias=attention_bias, qk_norm=qk_norm)


def hf_config_dict(m: ModelConfig) -> Dict[str, Any]:
    """The HF config.json for this architecture (what transformers builds the same model from)."""
    m = complete(m)
    out: Dict[str, Any] = {
        "architectures": [_HF_ARCH_CLASS[m.architecture]],
        "model_type": m.architecture,
        "hidden_act": "silu",
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[m.params_dtype],
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "use_cache": True,
    }
    for ours, theirs in _HF_KEYS.items():
        out[theirs] = getattr(m, ours)
    if m.architecture == "qwen2":
        out.pop("attention_bias")  # Qwen2 always has QKV bias and no such key
        out["use_sliding_window"] = False
    if m.architecture == "llama":
        out["mlp_bias"] = False
    return out
