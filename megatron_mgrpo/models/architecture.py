"""HF-style architecture descriptions: read an HF config.json, fill in family defaults.

The policy is always described in Hugging Face terms (the names users see in config.json); this
module turns that description into a complete `ModelConfig` and back into an HF config dict, so
that the conversion tools and the rollout engine's transformers models agree with Megatron.
Reading (`read_hf_config`, `model_config_from_hf`, `complete`) lives in `config.model`, since
validating a config needs it; it is re-exported here.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_mgrpo.config.model import (HF_KEYS, ModelConfig, complete, model_config_from_hf,
                                         read_hf_config)

__all__ = ["read_hf_config", "model_config_from_hf", "complete", "hf_config_dict"]

_HF_ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


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
    for ours, theirs in HF_KEYS.items():
        out[theirs] = getattr(m, ours)
    if m.architecture == "qwen2":
        out.pop("attention_bias")  # Qwen2 always has QKV bias and no such key
        out["use_sliding_window"] = False
    if m.architecture == "llama":
        out["mlp_bias"] = False
    return out
