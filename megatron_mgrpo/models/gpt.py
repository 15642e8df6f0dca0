"""The policy: a megatron-core `GPTModel` built from an HF-style architecture description.

`transformer_config` is the one place our config becomes megatron-core's `TransformerConfig`.
Transformer Engine's layer spec is used when TE imports and a GPU is present, the local spec
otherwise, so the same model runs on a cluster and on a laptop.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_mgrpo.config.schema import ConfigError, ModelConfig, ParallelConfig
from megatron_mgrpo.models.architecture import complete
from megatron_mgrpo.platform import cuda_available

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install without cuDNN / CUDA headers
        return False
    return True


def use_transformer_engine() -> bool:
    return cuda_available() and have_transformer_engine()


def padded_vocab_size(m: ModelConfig, tp: int) -> int:
    """Rows of the embedding table: the vocabulary padded to split evenly over TP."""
    multiple = m.make_vocab_size_divisible_by * tp
    return int(math.ceil(m.vocab_size / multiple) * multiple)


def transformer_config(model: ModelConfig, parallel: ParallelConfig, **overrides):
    """Map our config into megatron-core's TransformerConfig (the only place that does)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = complete(model)
    dtype = TORCH_DTYPES[m.params_dtype]
    on_gpu = cuda_available()
    te = use_transformer_engine()
    if parallel.sequence_parallel and not te:
        try:
            import apex  # noqa: F401
        except ImportError:
            raise ConfigError("parallel.sequence_parallel: got True; accepted here: false "
                              "(the local layer spec needs apex or Transformer Engine for it)")
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.intermediate_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_key_value_heads,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.attention_bias,
        qk_layernorm=m.qk_norm,
        # RL fine-tuning: no dropout, so the logprobs of the update match the rollout's.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=(parallel.virtual_pipeline
                                              if parallel.virtual_pipeline > 1 else None),
        # With two stages and model chunks, each P2P exchange sends an activation and a
        # gradient to the same peer; batched, the two are matched in posting order and swap
        # (seen over gloo). Unbatched, megatron sends the two directions on separate groups.
        batch_p2p_comm=not (parallel.pipeline_parallel == 2 and parallel.virtual_pipeline > 1),
        sequence_parallel=parallel.sequence_parallel,
        recompute_granularity=None if parallel.recompute == "none" else parallel.recompute,
        **({"recompute_method": "uniform", "recompute_num_layers": 1}
           if parallel.recompute == "full" else {}),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        # The GRPO objective is a token mean over the global batch: megatron sums per-token
        # losses and divides by the global token count in finalize_model_grads.
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    if m.fp8 is not None:
        kwargs.update(fp8=m.fp8, fp8_recipe=m.fp8_recipe, fp8_param=m.fp8_param_gather)
        _check_fp8_hardware(m, te)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _check_fp8_hardware(m: ModelConfig, te: bool) -> None:
    """FP8 needs Transformer Engine and a GPU that has it; say so before megatron fails deep
    inside a kernel."""
    if not cuda_available():
        raise ConfigError(f"model.fp8: got {m.fp8!r}; accepted here: null (FP8 needs a CUDA GPU "
                          "with FP8, Hopper or newer, and Transformer Engine; this machine has "
                          "no GPU)")
    if not te:
        raise ConfigError(f"model.fp8: got {m.fp8!r}; accepted here: null (Transformer Engine "
                          "is not installed: pip install -e .[gpu])")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(f"model.fp8: got {m.fp8!r}; accepted here: null (this GPU, compute "
                          f"capability {major}.{minor}, has no FP8; Ada 8.9 or Hopper 9.0+)")
    if m.fp8_recipe == "mxfp8" and major < 10:
        raise ConfigError(f"model.fp8_recipe: got 'mxfp8'; accepted here: delayed | tensorwise "
                          f"| blockwise (MXFP8 needs Blackwell, compute capability 10+; this "
                          f"GPU is {major}.{minor})")


def layer_spec(m: ModelConfig):
    """TE spec on a GPU with Transformer Engine, the local (pure megatron-core) spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    m = complete(m)
    if use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=m.qk_norm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=m.qk_norm,
                                                    normalization="RMSNorm")


def llama3_inv_freq(m: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies, with HF's `llama3` scaling when configured.

    megatron-core's own llama3 scaling hard-codes low/high frequency factors and the original
    context length; HF configs carry them, so we compute the frequencies exactly as
    transformers does and install them in the model.
    """
    m = complete(m)
    dim = m.head_dim
    inv_freq = 1.0 / (m.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64)
                                       .float() / dim))
    rs = m.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return inv_freq
    factor = float(rs["factor"])
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_len = float(rs.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_policy(model: ModelConfig, parallel: ParallelConfig, pg_collection=None,
                 pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                 config=None, vp_stage: Optional[int] = None):
    """Build this rank's stage of the policy (or, with a virtual pipeline, its model chunk
    `vp_stage`) as a megatron-core GPTModel.

    `pre_process` / `post_process` default to the first / last chunk of the whole pipeline.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    m = complete(model)
    config = config or transformer_config(m, parallel)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(m),
        vocab_size=padded_vocab_size(m, parallel.tensor_parallel),
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(m.rope_theta) if float(m.rope_theta).is_integer() else m.rope_theta,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    if hasattr(gpt, "rotary_pos_emb"):
        gpt.rotary_pos_emb.inv_freq = llama3_inv_freq(m).to(gpt.rotary_pos_emb.inv_freq.device)
    gpt.real_vocab_size = m.vocab_size
    return gpt
