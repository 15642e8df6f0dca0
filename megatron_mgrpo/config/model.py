"""The model and parallel sections, and reading an HF config.json into a `ModelConfig`.

`ModelConfig.validate()` checks the architecture (the HF config's when `hf_config` or `load` is
set: the placeholder defaults here do not count then) and returns it; `ParallelConfig.validate()`
checks the layout against that architecture. Reading config.json is plain file and JSON logic,
kept here because validation needs it; `models.architecture` re-exports it beside the way back
(`hf_config_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Literal, Optional

from megatron_mgrpo.config.checks import ConfigError, fail, one_of, positive

__all__ = ["ModelConfig", "ParallelConfig", "ARCHITECTURES", "DTYPES", "FP8_RECIPES",
           "LLAMA3_ROPE_KEYS", "HF_KEYS", "ARCHITECTURE_FIELDS", "read_hf_config",
           "model_config_from_hf", "complete", "resolve"]

ARCHITECTURES = ("llama", "qwen2", "qwen3")
DTYPES = ("fp32", "bf16", "fp16")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """The policy's architecture, in Hugging Face terms (config.json field names in comments)."""

    architecture: Literal["llama", "qwen2", "qwen3"] = "llama"
    """Model family: `llama` (Llama 3: GQA, RoPE with optional llama3 scaling, SwiGLU, RMSNorm),
    `qwen2` (Qwen2/2.5: as llama plus QKV bias), `qwen3` (Qwen3: as llama plus QK-norm)."""

    hf_config: Optional[str] = None
    """Path to an HF model directory or config.json. When set, the architecture fields below
    (architecture, vocab_size ... attention_bias, qk_norm) are read from it when the config is
    loaded: `mgrpo config` and the run's config.yaml show the base's values, and a field
    written here that disagrees with it is refused (the rest of this section, like
    `params_dtype`, `make_vocab_size_divisible_by`, `init_std`, `seed`, stays the run's)."""

    vocab_size: int = 256
    """Vocabulary size (`vocab_size`). Padded up to a multiple of `make_vocab_size_divisible_by`
    times the TP size inside Megatron; log-probs only ever cover the real vocabulary."""

    make_vocab_size_divisible_by: int = 1
    """Pad the embedding rows to a multiple of this times TP (Megatron uses 128 for speed)."""

    hidden_size: int = 64
    """Model width (`hidden_size`)."""

    intermediate_size: int = 128
    """SwiGLU inner width (`intermediate_size`)."""

    num_layers: int = 2
    """Transformer layers (`num_hidden_layers`)."""

    num_attention_heads: int = 4
    """Query heads (`num_attention_heads`)."""

    num_key_value_heads: Optional[int] = None
    """KV heads for GQA (`num_key_value_heads`); None means equal to the query heads."""

    head_dim: Optional[int] = None
    """Per-head width (`head_dim`); None means hidden_size / num_attention_heads."""

    max_position_embeddings: int = 2048
    """Longest sequence the model is built for (`max_position_embeddings`)."""

    rope_theta: float = 10000.0
    """RoPE base (`rope_theta`)."""

    rope_scaling: Optional[Dict[str, Any]] = None
    """HF `rope_scaling` dict. Supported: None, or `{rope_type: llama3, factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings}` (Llama 3.1+)."""

    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon (`rms_norm_eps`)."""

    tie_word_embeddings: bool = False
    """Share the input embedding and the output layer (`tie_word_embeddings`)."""

    attention_bias: Optional[bool] = None
    """Bias on the Q, K, V projections; None means the family's default (True for qwen2)."""

    qk_norm: Optional[bool] = None
    """RMSNorm on queries and keys per head; None means the family's default (True for qwen3)."""

    load: Optional[str] = None
    """HF model directory (safetensors), or the output of tools/convert_hf_to_megatron.py, to
    initialise the policy and the momentum model from. Its config.json gives the architecture
    when `hf_config` is not set, as `hf_config` describes; its tokenizer is the run's unless
    `data.tokenizer` is set. None: random init (tests, smoke runs)."""

    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of the model weights and compute. The optimizer keeps fp32 main params."""

    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 GEMMs through Transformer Engine (needs params_dtype bf16 and a GPU with FP8:
    Hopper or newer): `e4m3` everywhere, or `hybrid` (e4m3 forward, e5m2 gradients). None: off."""

    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling: `delayed` (amax history), `tensorwise` (current scaling), `blockwise`
    (1x128 / 128x128 blocks), `mxfp8` (Blackwell only)."""

    fp8_param_gather: bool = False
    """Keep the weights in FP8 and all-gather them in FP8 (megatron's fp8_param; needs fp8 and
    the distributed optimizer). Rollout weights are still pushed in bf16."""

    init_std: float = 0.02
    """Std of the normal init for freshly built (not loaded) weights."""

    seed: int = 1234
    """Seed for weight initialisation (per TP rank offsets are derived from it)."""

    def validate(self) -> "ModelConfig":
        """Check this section (ConfigError naming the field); return the architecture that the
        other sections are checked against: the HF config's when `hf_config` or `load` is set
        (see `complete`), else this section itself."""
        one_of("model.architecture", self.architecture, ARCHITECTURES)
        one_of("model.params_dtype", self.params_dtype, DTYPES)
        if self.fp8 is not None:
            one_of("model.fp8", self.fp8, ("e4m3", "hybrid"))
            one_of("model.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
            if self.params_dtype != "bf16":
                fail("model.params_dtype", self.params_dtype, "bf16 (model.fp8 trains in bf16 "
                     "with FP8 GEMMs)")
        # The architecture comes from the HF config, not from the placeholder defaults here.
        m = complete(self) if self.hf_config or self.load else self
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_attention_heads", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            positive(f"model.{name}", getattr(m, name))
        if m.head_dim is not None:
            positive("model.head_dim", m.head_dim)
        kv = _kv_heads(m)
        positive("model.num_key_value_heads", kv)
        if m.num_attention_heads % kv:
            fail("model.num_key_value_heads", kv,
                 f"a divisor of model.num_attention_heads={m.num_attention_heads}")
        if m.head_dim is None and m.hidden_size % m.num_attention_heads:
            fail("model.hidden_size", m.hidden_size,
                 f"a multiple of model.num_attention_heads={m.num_attention_heads} "
                 "(or set model.head_dim)")
        if m.rope_scaling is not None:
            rtype = m.rope_scaling.get("rope_type", m.rope_scaling.get("type"))
            if rtype not in ("llama3", "default"):
                fail("model.rope_scaling.rope_type", rtype,
                     "llama3 | default | (no rope_scaling)")
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in m.rope_scaling]
            if rtype == "llama3" and missing:
                fail("model.rope_scaling", m.rope_scaling,
                     f"llama3 scaling with all of {', '.join(LLAMA3_ROPE_KEYS)} "
                     f"(missing: {', '.join(missing)})")
        return m


@dataclass
class ParallelConfig:
    """How the policy is laid out over ranks. DP is world size / (TP * PP)."""

    tensor_parallel: int = 1
    """Tensor-parallel size: splits heads, MLP width and the vocabulary."""

    pipeline_parallel: int = 1
    """Pipeline-parallel size: splits the layers into stages (1F1B schedule)."""

    virtual_pipeline: int = 1
    """Model chunks per pipeline stage (megatron's virtual pipeline, the interleaved 1F1B
    schedule): the layers split into pipeline_parallel x virtual_pipeline chunks dealt round
    robin to the stages, which cuts the pipeline bubble by this factor for more P2P traffic and
    more activations in flight. Needs pipeline_parallel > 1."""

    context_parallel: int = 1
    """Context-parallel size (sequence split over ranks, ring attention in Transformer Engine).
    Counted by `mgrpo plan`; training accepts only 1 for now."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1; with the local layer spec it needs apex)."""

    use_distributed_optimizer: bool = True
    """Shard optimizer state (and the momentum model's EMA) over data-parallel ranks."""

    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation in the backward: `selective` recomputes the attention core,
    `full` every layer from its input (least memory, about a third more compute)."""

    micro_batch_size: int = 4
    """Sequences per microbatch in the policy's forward/backward."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: `auto` is nccl with a GPU and gloo without."""

    num_gpus: int = 0
    """Training GPUs the job is laid out for (a slurm launcher's TRAIN_NODES x GPUS_PER_NODE):
    what `mgrpo plan` plans for without --gpus. A run itself takes its world size from
    torchrun and only checks it against TP x PP. 0: WORLD_SIZE, else TP x PP x CP."""

    def validate(self, model: ModelConfig, world_size: Optional[int] = None) -> None:
        """Check the layout against `model` (what `ModelConfig.validate()` returns) and, when
        given, the world size; ConfigError naming the field."""
        p, m = self, model
        one_of("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
        one_of("parallel.recompute", p.recompute, ("none", "selective", "full"))
        positive("parallel.tensor_parallel", p.tensor_parallel)
        positive("parallel.pipeline_parallel", p.pipeline_parallel)
        positive("parallel.micro_batch_size", p.micro_batch_size)
        kv = _kv_heads(m)
        if m.num_attention_heads % p.tensor_parallel:
            fail("parallel.tensor_parallel", p.tensor_parallel,
                 f"a divisor of model.num_attention_heads={m.num_attention_heads}")
        if kv % p.tensor_parallel and p.tensor_parallel % kv:
            fail("parallel.tensor_parallel", p.tensor_parallel,
                 f"a divisor or multiple of model.num_key_value_heads={kv}")
        if m.intermediate_size % p.tensor_parallel:
            fail("parallel.tensor_parallel", p.tensor_parallel,
                 f"a divisor of model.intermediate_size={m.intermediate_size}")
        if m.num_layers % p.pipeline_parallel:
            fail("parallel.pipeline_parallel", p.pipeline_parallel,
                 f"a divisor of model.num_layers={m.num_layers}")
        positive("parallel.virtual_pipeline", p.virtual_pipeline)
        positive("parallel.context_parallel", p.context_parallel)
        if p.virtual_pipeline > 1 and p.pipeline_parallel == 1:
            fail("parallel.virtual_pipeline", p.virtual_pipeline,
                 "1 when parallel.pipeline_parallel is 1 (model chunks interleave over stages)")
        chunks = p.pipeline_parallel * p.virtual_pipeline
        if p.virtual_pipeline > 1 and m.num_layers % chunks:
            fail("parallel.virtual_pipeline", p.virtual_pipeline,
                 f"a value with pipeline_parallel x virtual_pipeline dividing "
                 f"model.num_layers={m.num_layers}")
        if p.num_gpus < 0 or p.num_gpus % (p.tensor_parallel * p.pipeline_parallel
                                           * p.context_parallel):
            fail("parallel.num_gpus", p.num_gpus,
                 "0 (the world size) or a multiple of parallel.tensor_parallel x "
                 "pipeline_parallel x context_parallel = "
                 f"{p.tensor_parallel * p.pipeline_parallel * p.context_parallel}")
        if p.sequence_parallel and p.tensor_parallel == 1:
            fail("parallel.sequence_parallel", True, "false when parallel.tensor_parallel is 1")
        if world_size is not None:
            model_parallel = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
            what = "parallel.tensor_parallel * parallel.pipeline_parallel" + (
                " * parallel.context_parallel" if p.context_parallel > 1 else "")
            if world_size % model_parallel:
                fail(what, model_parallel, f"a divisor of the world size {world_size}")


def _kv_heads(m: ModelConfig) -> int:
    """KV heads, None (as many as the query heads) resolved."""
    return m.num_key_value_heads if m.num_key_value_heads is not None else m.num_attention_heads


# --------------------------------------------------------------------------------------------
# An HF config.json as a ModelConfig.

# HF `model_type` / `architectures` -> our family name.
_FAMILY_OF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# ModelConfig field <- HF config key, for the keys whose names differ or matter.
HF_KEYS = {
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


def read_hf_config(path: str, field: str = "model.hf_config") -> Dict[str, Any]:
    """Load an HF config.json (given the file or its directory) as a dict; a ConfigError naming
    `field` (the config field that gave `path`) when there is none."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        if field == "model.load":
            raise ConfigError(_no_base_message(path))
        raise ConfigError(f"{field}: no config.json at {path!r}")
    try:
        with open(file, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{field}: {file} is not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {file} ({e.strerror})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{field}: {file} is not a JSON object")
    return hf


TINY_BASE = "runs/tiny_base"


def _no_base_message(path: str) -> str:
    """model.load names nothing usable: say what is accepted, and where the demo's base comes
    from when the path looks like it."""
    what = ("no HF model directory or converted checkpoint" if not os.path.exists(path)
            else "no config.json in" if os.path.isdir(path)
            else "a file, not an HF model directory or converted checkpoint:")
    line = f"model.load: {what} at {path!r}" if what.startswith("no HF") else \
        f"model.load: {what} {path!r}"
    norm = os.path.normpath(path).replace(os.sep, "/")
    if norm.startswith("runs/") and \
            difflib.SequenceMatcher(None, norm, TINY_BASE).ratio() >= 0.75:
        line += f" (`make train` builds {TINY_BASE}"
        line += ")" if norm == TINY_BASE else f"; did you mean {TINY_BASE!r}?)"
    return line


def model_config_from_hf(hf: Dict[str, Any], base: ModelConfig | None = None,
                        field: str = "model.hf_config") -> ModelConfig:
    """Build a ModelConfig from an HF config dict (fields missing there keep `base`'s value);
    errors name `field`, the config field the dict came from."""
    model_type = hf.get("model_type")
    family = _FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise ConfigError(f"{field}: model_type {model_type!r} is not supported; "
                          f"accepted: {' | '.join(_FAMILY_OF_MODEL_TYPE)}")
    values = dataclasses.asdict(base or ModelConfig())
    values["architecture"] = family
    for ours, theirs in HF_KEYS.items():
        if theirs in hf and (hf[theirs] is not None or ours in ("head_dim", "rope_scaling")):
            values[ours] = hf[theirs]
    # HF nests rope_theta inside rope_parameters in newer transformers releases.
    rope_params = hf.get("rope_parameters")
    if isinstance(rope_params, dict):
        if "rope_theta" in rope_params:
            values["rope_theta"] = rope_params["rope_theta"]
        if rope_params.get("rope_type", "default") != "default":  # rope_theta is a field
            values["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if family == "qwen3":
        values["qk_norm"] = True
    return _fill_defaults(ModelConfig(**values))


def complete(m: ModelConfig) -> ModelConfig:
    """The full architecture: from `hf_config`, else from the config.json of `load`, else from
    the fields themselves; then the family defaults (kv heads, head_dim, QKV bias, QK-norm)."""
    if m.hf_config or m.load:
        field = "model.hf_config" if m.hf_config else "model.load"
        m = model_config_from_hf(read_hf_config(m.hf_config or m.load, field),
                                 dataclasses.replace(m, hf_config=None), field)
    return _fill_defaults(m)


# The fields a base's config.json sets (the rest, like params_dtype, stay the run's own).
ARCHITECTURE_FIELDS = ("architecture", *HF_KEYS, "qk_norm")


def resolve(m: ModelConfig, given: Iterable[str] = ()) -> ModelConfig:
    """The model section as the run builds it. Where `hf_config` or `load` names a base, its
    architecture fields (ARCHITECTURE_FIELDS) are the base's config.json, completed with the
    family defaults; `given` names the fields the user wrote (in the file or as overrides), and
    each of those must agree with the base: a ConfigError names the field and both values.
    Without a base the section is returned as written."""
    if not (m.hf_config or m.load):
        return m
    base = complete(m)
    field = "model.hf_config" if m.hf_config else "model.load"
    for name in ARCHITECTURE_FIELDS:
        mine, theirs = getattr(m, name), getattr(base, name)
        if name in given and mine is not None and mine != theirs:
            raise ConfigError(
                f"model.{name}: got {mine!r}, but the config.json of {field} "
                f"{m.hf_config or m.load!r} has {theirs!r}; drop model.{name} (the base's "
                f"architecture is used) or make it {theirs!r}")
    return dataclasses.replace(base, hf_config=m.hf_config)


def _fill_defaults(m: ModelConfig) -> ModelConfig:
    kv = m.num_key_value_heads or m.num_attention_heads
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    attention_bias = m.attention_bias if m.attention_bias is not None else (
        m.architecture == "qwen2")
    qk_norm = m.qk_norm if m.qk_norm is not None else (m.architecture == "qwen3")
    return dataclasses.replace(m, num_key_value_heads=kv, head_dim=head_dim,
                               attention_bias=attention_bias, qk_norm=qk_norm)
