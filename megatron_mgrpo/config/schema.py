"""The config tree: one dataclass per concern, a docstring under every field.

`Config.validate()` checks what can be checked without building anything and raises a
`ConfigError` whose message names the field and the accepted values, so a bad config never
surfaces as a trace from deep inside megatron-core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what it accepts."""


ARCHITECTURES = ("llama", "qwen2", "qwen3")
MODES = ("mgrpo", "srt", "ttrl", "rlvr")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    """The policy's architecture, in Hugging Face terms (config.json field names in comments)."""

    architecture: Literal["llama", "qwen2", "qwen3"] = "llama"
    """Model family: `llama` (Llama 3: GQA, RoPE with optional llama3 scaling, SwiGLU, RMSNorm),
    `qwen2` (Qwen2/2.5: as llama plus QKV bias), `qwen3` (Qwen3: as llama plus QK-norm)."""

    hf_config: Optional[str] = None
    """Path to an HF model directory or config.json. When set, the architecture fields below are
    read from it and take precedence over values written here (only `params_dtype`,
    `make_vocab_size_divisible_by`, `init_std` and `seed` are kept from this section)."""

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
    """HF model directory (safetensors) to initialise the policy and the momentum model from.
    Its config.json is used for the architecture when `hf_config` is not set. None: random
    init (tests, smoke runs)."""

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


@dataclass
class RolloutConfig:
    """Sampling of completions from the policy and the momentum model."""

    backend: Literal["embedded", "sglang"] = "embedded"
    """`embedded`: in-process engine (CPU, tests). `sglang`: SGLang servers."""

    num_policy_rollouts: int = 4
    """M: completions per prompt from the policy."""

    num_momentum_rollouts: int = 4
    """N: completions per prompt from the momentum model (0 for SRT)."""

    temperature: float = 1.0
    """Sampling temperature (> 0)."""

    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""

    max_new_tokens: int = 64
    """Longest completion, in tokens."""

    weight_bucket_mb: int = 512
    """Size bound of one weight-push bucket, in MiB (the push streams bucket by bucket)."""

    weight_format: Literal["native", "bf16", "fp8"] = "native"
    """Weights as the engine receives them: `native` (the training parameters' dtype: bf16
    with model.params_dtype bf16), `bf16`, or `fp8` (the layers' linear weights in E4M3 with
    scales, the rest bf16: SGLang's `quant_method: fp8` checkpoint format; launched servers
    start from an FP8 copy of model.load, attached ones must serve an FP8 checkpoint)."""

    fp8_block_size: int = 128
    """FP8 scaling granularity: one scale per N x N tile (`weight_scale_inv`), or 0 for one
    per tensor (`weight_scale`)."""

    momentum_push_interval: int = 1
    """Push momentum weights to the engine every this many steps (it moves slowly)."""


@dataclass
class SGLangConfig:
    """The SGLang rollout backend (rollout.backend: sglang): servers, placement, transport."""

    urls: List[str] = field(default_factory=list)
    """Running servers to attach to: all of them in the swap placement, the policy's group in
    the separate placement. Empty: launch `launch` servers per group instead."""

    momentum_urls: List[str] = field(default_factory=list)
    """Separate placement, attached: the momentum model's servers."""

    launch: int = 0
    """Servers to start per group (0: attach to `urls`). Each runs `launch_command`."""

    launch_command: str = ("{python} -m sglang.launch_server --model-path {model} "
                           "--host {host} --port {port} --skip-tokenizer-init")
    """Command of one server, with {python}, {model}, {host} and {port} filled in. On CPU:
    `{python} -m megatron_mgrpo.cli serve --model {model} --host {host} --port {port}`."""

    host: str = "127.0.0.1"
    """Address launched servers listen on."""

    base_port: int = 0
    """First port of launched servers (consecutive after it); 0: any free ports."""

    placement: Literal["swap", "separate"] = "swap"
    """`swap`: one group of servers loads the momentum and the policy weights in turn.
    `separate`: a group per weight set (twice the servers, no swaps)."""

    transport: Literal["tensor", "distributed", "disk"] = "disk"
    """How weights reach the servers: `tensor` (colocated: CUDA IPC / shared memory),
    `distributed` (an NCCL broadcast group with the servers), `disk` (safetensors files in
    `disk_dir`, which the servers must see)."""

    disk_dir: str = ""
    """Directory of the disk transport's files (empty: <training.run_dir>/pushed_weights)."""

    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Backend of the distributed transport's group: auto is nccl with a GPU, gloo without."""

    dist_master_address: str = "127.0.0.1"
    """Address of this process as the servers reach it (the distributed transport's rank 0)."""

    host_copy: bool = True
    """Keep each set's last update in host memory so that a restarted server gets it at once
    (always on in the swap placement, which needs it; costs the model's size per set)."""

    request_timeout_s: float = 600.0
    """A server that does not answer a request within this is taken as dead or hung."""

    launch_timeout_s: float = 900.0
    """Longest wait for a launched server to answer /health."""

    max_retries: int = 2
    """Times one request (or one weight push) is retried on another or a restarted server."""

    max_prompts_per_request: int = 64
    """Completions per /generate request (smaller: finer load balance and cheaper retries)."""


@dataclass
class AlgorithmConfig:
    """The M-GRPO method and its baselines. `mode` selects which parts run."""

    mode: Literal["mgrpo", "srt", "ttrl", "rlvr"] = "mgrpo"
    """`mgrpo`: vote over policy + momentum rollouts. `srt`: vote over the policy's own (N=0).
    `ttrl`: vote over a large sample, train on a subset. `rlvr`: ground-truth labels."""

    grader: Literal["math", "multiple_choice"] = "math"
    """How answers are extracted and compared (math: `\\boxed{}` + math-verify equivalence)."""

    momentum: float = 0.99
    """m in Eq. 1: theta_k <- m * theta_k + (1 - m) * theta_q. In [0, 1)."""

    momentum_update_interval: int = 1
    """Update the EMA every this many training steps (fused into the step's last optimizer
    update; with several PPO minibatches per step the EMA still moves once)."""

    momentum_warmup_updates: int = 0
    """Over the first this many EMA updates m rises linearly from `momentum_warmup_start` to
    `momentum` (0: m is constant)."""

    momentum_warmup_start: float = 0.0
    """m of the first EMA update while warming up. In [0, 1)."""

    min_agreement: float = 0.0
    """Prompts whose majority share is below this get no learning signal. In [0, 1]."""

    iqr_filter: bool = True
    """Drop low-entropy outlier trajectories (Eq. 2)."""

    iqr_k: float = 0.75
    """k in the IQR fence Q1 - k * IQR (>= 0)."""

    entropy_floor: Optional[float] = None
    """Optional absolute entropy floor beside the relative fence (catches whole-batch collapse)."""

    filter_before_normalization: bool = True
    """Compute group advantage statistics over kept trajectories only (else over all)."""

    train_on_momentum_rollouts: bool = False
    """Whether the momentum model's N completions also get gradient (importance-weighted);
    by default they only vote."""

    ttrl_num_train: Optional[int] = None
    """TTRL: how many of the policy's M completions per prompt are trained on."""

    advantage_eps: float = 1e-6
    """eps in (r - mean) / (std + eps)."""

    clip_low: float = 0.2
    """PPO ratio clip below 1 (ratio >= 1 - clip_low)."""

    clip_high: float = 0.2
    """PPO ratio clip above 1 (ratio <= 1 + clip_high)."""

    kl_coef: float = 0.0
    """Weight of the low-variance (k3) KL to the reference model (0: no reference is built
    and no KL is computed)."""

    kl_reference: Literal["base", "momentum"] = "base"
    """What the KL anchors to when kl_coef > 0: `base` (the frozen initial weights, a third
    copy of the model in the training dtype, one extra forward per step) or `momentum` (the
    momentum model itself: no extra copy, its log-probs from a forward with the EMA weights
    swapped in)."""

    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""

    ppo_epochs: int = 1
    """Passes over each step's rollouts."""

    ppo_minibatches: int = 1
    """Optimizer steps per epoch (the rollouts split into this many minibatches)."""


@dataclass
class OptimizerConfig:
    """Adam through megatron-core's optimizer."""

    lr: float = 1e-5
    """Peak learning rate."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warm-up."""

    warmup_fraction: float = 0.0
    """Share of the training steps spent warming up linearly, in [0, 1)."""

    weight_decay: float = 0.0
    """Decoupled weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.999
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Global grad-norm clip (0 disables)."""


@dataclass
class DataConfig:
    """Prompt data."""

    train_path: Optional[str] = None
    """jsonl or parquet file of training prompts."""

    val_path: Optional[str] = None
    """jsonl or parquet file of validation prompts (with answers)."""

    prompt_key: str = "prompt"
    """Column holding the prompt text."""

    answer_key: Optional[str] = "answer"
    """Column holding the true answer (used for RLVR and for reporting pseudo-label accuracy
    only, never for the self-supervised reward)."""

    tokenizer: Optional[str] = None
    """Tokenizer: an HF tokenizer directory or a sentencepiece `.model` file."""

    max_prompt_length: int = 128
    """Prompts longer than this (in tokens) are skipped and counted."""

    prompts_per_step: int = 8
    """Prompts per training step."""

    shuffle: bool = True
    """Shuffle the training prompts every epoch."""


@dataclass
class TrainingConfig:
    """The run."""

    steps: int = 10
    """Training steps (one rollout batch each)."""

    seed: int = 1234
    """Global seed (data order, sampling, dropout)."""

    run_dir: str = "runs/default"
    """Where metrics, plots and checkpoints go."""

    save_interval: int = 0
    """Checkpoint every this many steps (0: only at the end)."""

    eval_interval: int = 0
    """Validation every this many steps (0: never)."""

    eval_samples: int = 4
    """Completions per validation prompt: val_accuracy is their mean (pass@1), val_maj their
    majority vote's accuracy (maj@k)."""

    max_eval_prompts: int = 0
    """Evaluate on at most this many validation prompts (0: all)."""

    resume: bool = False
    """Continue from the newest checkpoint in run_dir."""

    stop_file: Optional[str] = None
    """When this file exists at the end of a step, save a checkpoint and stop (the slurm
    launchers create it on the time-limit signal and requeue the job, which resumes)."""


@dataclass
class EvalConfig:
    """Benchmark evaluation: `mgrpo eval`, and during training every `interval` steps."""

    benchmarks: List[str] = field(default_factory=list)
    """Benchmarks to run, any of math500 | aime24 | aime25 | gpqa | gpqa_diamond |
    livecodebench (README "Evaluation" says where each file comes from)."""

    data_dir: str = "data/eval"
    """Where benchmark files are looked up: `<data_dir>/<name>.jsonl` (or .parquet, .json, .csv),
    or a directory `<data_dir>/<name>/` whose data files are read together. Nothing is
    downloaded."""

    paths: Dict[str, str] = field(default_factory=dict)
    """Per-benchmark file or directory, overriding data_dir (e.g. {gpqa_diamond:
    /data/gpqa/gpqa_diamond.csv})."""

    samples: int = 8
    """Completions per problem (k): pass@1 is their mean, maj@k their vote."""

    samples_by_benchmark: Dict[str, int] = field(default_factory=dict)
    """Per-benchmark sample counts overriding `samples` (e.g. {aime24: 32}: few problems need
    more samples for a stable mean)."""

    pass_k: List[int] = field(default_factory=list)
    """Extra k of the unbiased pass@k estimator (each at most a benchmark's sample count;
    larger ones are left out of that benchmark)."""

    temperature: float = 0.6
    """Sampling temperature (0: greedy)."""

    top_p: float = 0.95
    """Nucleus sampling threshold."""

    max_new_tokens: int = 2048
    """Most tokens per completion; the share that hit it is reported as `truncated`."""

    max_prompt_length: int = 0
    """Problems whose prompt is longer (tokens) are skipped and counted in the report (0: the
    model's context minus max_new_tokens)."""

    max_problems: int = 0
    """Evaluate on at most this many problems per benchmark, in file order (0: all)."""

    interval: int = 0
    """During training: run the benchmarks every this many steps and at the last step (0:
    never)."""

    seed: int = 0
    """Seed of the sampling streams and of GPQA's option order."""

    chat_template: bool = False
    """Wrap each prompt as one user message in the tokenizer's chat template (instruct models)."""

    templates: Dict[str, str] = field(default_factory=dict)
    """Per-benchmark prompt templates replacing the defaults (str.format fields: {problem} for
    math benchmarks; {question} {A} {B} {C} {D} for GPQA; {question} {format} for
    LiveCodeBench)."""

    livecodebench_dates: Optional[str] = None
    """Keep LiveCodeBench problems whose contest_date lies in `START:END` (ISO dates, either may
    be empty), e.g. "2024-08-01:2025-02-01"; None keeps all."""

    code_timeout_s: float = 6.0
    """Seconds each LiveCodeBench test may run in the sandbox."""

    code_workers: int = 2
    """Sandboxed programs graded at once."""

    prompts_per_call: int = 64
    """Problems sent to the rollout engine per call (progress is reported after each)."""

    output_dir: Optional[str] = None
    """Where results go (None: `<training.run_dir>/eval`): `step_<N>.json` or `<model>.json`,
    and `*.completions.jsonl` with save_completions."""

    save_completions: bool = False
    """Also write every completion's text, answer and grade (jsonl) beside the results."""


@dataclass
class LoggingConfig:
    """What the run reports."""

    log_interval: int = 1
    """Print a line every this many steps."""

    tensorboard: bool = True
    """Write TensorBoard events beside metrics.jsonl."""

    progress_bar: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's architecture."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline/data parallel layout."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling from the policy and the momentum model."""

    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    """SGLang rollout servers (used when rollout.backend is sglang)."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The method (mode, vote, filter, loss, EMA)."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Adam settings and schedule."""

    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data and tokenizer."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Steps, seeds, checkpoints."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Benchmarks (MATH500, AIME, GPQA, LiveCodeBench) and how they are sampled and graded."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Check cross-field constraints; raise ConfigError naming the field. Returns self."""
        _validate(self, world_size)
        return self


def _fail(path: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"{path}: got {value!r}; accepted: {accepted}")


def _positive(path: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(path, value, "an integer >= 1")


def _one_of(path: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(path, value, " | ".join(choices))


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


def _validate(cfg: Config, world_size: Optional[int]) -> None:
    m, p, r, a, o, d, t = (cfg.model, cfg.parallel, cfg.rollout, cfg.algorithm, cfg.optimizer,
                           cfg.data, cfg.training)
    _one_of("model.architecture", m.architecture, ARCHITECTURES)
    _one_of("model.params_dtype", m.params_dtype, DTYPES)
    if m.fp8 is not None:
        _one_of("model.fp8", m.fp8, ("e4m3", "hybrid"))
        _one_of("model.fp8_recipe", m.fp8_recipe, ("delayed", "tensorwise", "blockwise", "mxfp8"))
        if m.params_dtype != "bf16":
            _fail("model.params_dtype", m.params_dtype, "bf16 (model.fp8 trains in bf16 with "
                  "FP8 GEMMs)")
    if m.fp8_param_gather and (m.fp8 is None or not p.use_distributed_optimizer):
        _fail("model.fp8_param_gather", True, "false, or true with model.fp8 set and "
              "parallel.use_distributed_optimizer true")
    _one_of("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
    _one_of("parallel.recompute", p.recompute, ("none", "selective", "full"))
    _one_of("rollout.backend", r.backend, ("embedded", "sglang"))
    _one_of("algorithm.mode", a.mode, MODES)
    _one_of("algorithm.grader", a.grader, ("math", "multiple_choice"))
    _one_of("optimizer.schedule", o.schedule, ("constant", "cosine", "linear"))
    if m.hf_config or m.load:
        # The architecture comes from the HF config, not from the placeholder defaults here:
        # check the parallel layout against the real head and layer counts.
        from megatron_mgrpo.models.architecture import complete
        m = complete(m)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_attention_heads", "max_position_embeddings", "make_vocab_size_divisible_by"):
        _positive(f"model.{name}", getattr(m, name))
    if m.head_dim is not None:
        _positive("model.head_dim", m.head_dim)
    kv = m.num_key_value_heads if m.num_key_value_heads is not None else m.num_attention_heads
    _positive("model.num_key_value_heads", kv)
    if m.num_attention_heads % kv:
        _fail("model.num_key_value_heads", kv,
              f"a divisor of model.num_attention_heads={m.num_attention_heads}")
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        _fail("model.hidden_size", m.hidden_size,
              f"a multiple of model.num_attention_heads={m.num_attention_heads} "
              "(or set model.head_dim)")
    if m.rope_scaling is not None:
        rtype = m.rope_scaling.get("rope_type", m.rope_scaling.get("type"))
        if rtype not in ("llama3", "default"):
            _fail("model.rope_scaling.rope_type", rtype, "llama3 | default | (no rope_scaling)")
        missing = [k for k in LLAMA3_ROPE_KEYS if k not in m.rope_scaling]
        if rtype == "llama3" and missing:
            _fail("model.rope_scaling", m.rope_scaling,
                  f"llama3 scaling with all of {', '.join(LLAMA3_ROPE_KEYS)} "
                  f"(missing: {', '.join(missing)})")

    _positive("parallel.tensor_parallel", p.tensor_parallel)
    _positive("parallel.pipeline_parallel", p.pipeline_parallel)
    _positive("parallel.micro_batch_size", p.micro_batch_size)
    if m.num_attention_heads % p.tensor_parallel:
        _fail("parallel.tensor_parallel", p.tensor_parallel,
              f"a divisor of model.num_attention_heads={m.num_attention_heads}")
    if kv % p.tensor_parallel and p.tensor_parallel % kv:
        _fail("parallel.tensor_parallel", p.tensor_parallel,
              f"a divisor or multiple of model.num_key_value_heads={kv}")
    if m.intermediate_size % p.tensor_parallel:
        _fail("parallel.tensor_parallel", p.tensor_parallel,
              f"a divisor of model.intermediate_size={m.intermediate_size}")
    if m.num_layers % p.pipeline_parallel:
        _fail("parallel.pipeline_parallel", p.pipeline_parallel,
              f"a divisor of model.num_layers={m.num_layers}")
    _positive("parallel.virtual_pipeline", p.virtual_pipeline)
    _positive("parallel.context_parallel", p.context_parallel)
    if p.virtual_pipeline > 1 and p.pipeline_parallel == 1:
        _fail("parallel.virtual_pipeline", p.virtual_pipeline,
              "1 when parallel.pipeline_parallel is 1 (model chunks interleave over stages)")
    chunks = p.pipeline_parallel * p.virtual_pipeline
    if p.virtual_pipeline > 1 and m.num_layers % chunks:
        _fail("parallel.virtual_pipeline", p.virtual_pipeline,
              f"a value with pipeline_parallel x virtual_pipeline dividing "
              f"model.num_layers={m.num_layers}")
    if p.sequence_parallel and p.tensor_parallel == 1:
        _fail("parallel.sequence_parallel", True, "false when parallel.tensor_parallel is 1")
    if world_size is not None:
        model_parallel = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
        what = "parallel.tensor_parallel * parallel.pipeline_parallel" + (
            " * parallel.context_parallel" if p.context_parallel > 1 else "")
        if world_size % model_parallel:
            _fail(what, model_parallel, f"a divisor of the world size {world_size}")

    if r.num_policy_rollouts < 1:
        _fail("rollout.num_policy_rollouts", r.num_policy_rollouts, "an integer >= 1")
    if r.num_momentum_rollouts < 0:
        _fail("rollout.num_momentum_rollouts", r.num_momentum_rollouts, "an integer >= 0")
    if a.mode in ("mgrpo", "srt", "ttrl") and r.num_policy_rollouts + r.num_momentum_rollouts < 2:
        _fail("rollout.num_policy_rollouts + rollout.num_momentum_rollouts",
              r.num_policy_rollouts + r.num_momentum_rollouts,
              f">= 2 (a vote needs at least two completions in mode {a.mode})")
    if a.mode == "srt" and r.num_momentum_rollouts != 0:
        _fail("rollout.num_momentum_rollouts", r.num_momentum_rollouts, "0 in mode srt")
    if a.mode == "mgrpo" and r.num_momentum_rollouts < 1:
        _fail("rollout.num_momentum_rollouts", r.num_momentum_rollouts,
              ">= 1 in mode mgrpo (use mode srt for N = 0)")
    if a.mode == "ttrl" and a.ttrl_num_train is not None and not (
            1 <= a.ttrl_num_train <= r.num_policy_rollouts):
        _fail("algorithm.ttrl_num_train", a.ttrl_num_train,
              f"an integer in [1, rollout.num_policy_rollouts={r.num_policy_rollouts}]")
    from megatron_mgrpo.update import mode_plan

    try:  # the mode rules live in one place; the checks above give the friendlier messages
        mode_plan(r, a)
    except ValueError as e:
        raise ConfigError(f"algorithm.mode {a.mode!r} with rollout.num_policy_rollouts="
                          f"{r.num_policy_rollouts}, rollout.num_momentum_rollouts="
                          f"{r.num_momentum_rollouts}: {e}") from None
    if not r.temperature > 0:
        _fail("rollout.temperature", r.temperature, "a number > 0")
    if not 0 < r.top_p <= 1:
        _fail("rollout.top_p", r.top_p, "a number in (0, 1]")
    _positive("rollout.max_new_tokens", r.max_new_tokens)
    _positive("rollout.momentum_push_interval", r.momentum_push_interval)

    if not 0 <= a.momentum < 1:
        _fail("algorithm.momentum", a.momentum, "a number in [0, 1)")
    _positive("algorithm.momentum_update_interval", a.momentum_update_interval)
    if a.momentum_warmup_updates < 0:
        _fail("algorithm.momentum_warmup_updates", a.momentum_warmup_updates, "an integer >= 0")
    if not 0 <= a.momentum_warmup_start < 1:
        _fail("algorithm.momentum_warmup_start", a.momentum_warmup_start, "a number in [0, 1)")
    if not 0 <= a.min_agreement <= 1:
        _fail("algorithm.min_agreement", a.min_agreement, "a number in [0, 1]")
    if a.iqr_k < 0:
        _fail("algorithm.iqr_k", a.iqr_k, "a number >= 0")
    if a.entropy_floor is not None and a.entropy_floor < 0:
        _fail("algorithm.entropy_floor", a.entropy_floor, "null or a number >= 0")
    if a.clip_low < 0 or a.clip_low >= 1:
        _fail("algorithm.clip_low", a.clip_low, "a number in [0, 1)")
    if a.clip_high < 0:
        _fail("algorithm.clip_high", a.clip_high, "a number >= 0")
    _one_of("algorithm.kl_reference", a.kl_reference, ("base", "momentum"))
    if a.kl_coef > 0 and a.kl_reference == "momentum" and a.mode != "mgrpo":
        _fail("algorithm.kl_reference", a.kl_reference,
              f"base in mode {a.mode} (no momentum model is kept there)")
    for name in ("kl_coef", "entropy_coef", "advantage_eps"):
        if getattr(a, name) < 0:
            _fail(f"algorithm.{name}", getattr(a, name), "a number >= 0")
    _positive("algorithm.ppo_epochs", a.ppo_epochs)
    _positive("algorithm.ppo_minibatches", a.ppo_minibatches)

    if not o.lr > 0:
        _fail("optimizer.lr", o.lr, "a number > 0")
    if o.min_lr < 0 or o.min_lr > o.lr:
        _fail("optimizer.min_lr", o.min_lr, f"a number in [0, optimizer.lr={o.lr}]")
    if not 0 <= o.warmup_fraction < 1:
        _fail("optimizer.warmup_fraction", o.warmup_fraction, "a number in [0, 1)")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, name) < 1:
            _fail(f"optimizer.{name}", getattr(o, name), "a number in [0, 1)")
    if o.clip_grad < 0:
        _fail("optimizer.clip_grad", o.clip_grad, "a number >= 0 (0 disables clipping)")

    _positive("data.max_prompt_length", d.max_prompt_length)
    _positive("data.prompts_per_step", d.prompts_per_step)
    if a.mode == "rlvr" and not d.answer_key:
        _fail("data.answer_key", d.answer_key, "a column name (mode rlvr needs true answers)")

    _positive("training.steps", t.steps)
    _positive("training.eval_samples", t.eval_samples)
    _positive("rollout.weight_bucket_mb", r.weight_bucket_mb)
    _one_of("rollout.weight_format", r.weight_format, ("native", "bf16", "fp8"))
    if r.fp8_block_size < 0:
        _fail("rollout.fp8_block_size", r.fp8_block_size,
              "an integer >= 0 (0: one scale per tensor)")
    if r.backend == "sglang":
        _validate_sglang(cfg.sglang)
    for name in ("save_interval", "eval_interval"):
        if getattr(t, name) < 0:
            _fail(f"training.{name}", getattr(t, name), "an integer >= 0")
    _validate_eval(cfg.eval)


def _validate_eval(e: EvalConfig) -> None:
    from megatron_mgrpo.evaluation.benchmarks import BENCHMARKS

    known = " | ".join(BENCHMARKS)
    for name in e.benchmarks:
        _one_of("eval.benchmarks", name, tuple(BENCHMARKS))
    if len(set(e.benchmarks)) != len(e.benchmarks):
        _fail("eval.benchmarks", e.benchmarks, "each benchmark once")
    for section in ("paths", "samples_by_benchmark", "templates"):
        for name in getattr(e, section):
            if name not in BENCHMARKS:
                _fail(f"eval.{section}", name, f"keys among {known}")
    _positive("eval.samples", e.samples)
    for name, n in e.samples_by_benchmark.items():
        _positive(f"eval.samples_by_benchmark.{name}", n)
    for k in e.pass_k:
        _positive("eval.pass_k", k)
    if e.temperature < 0:
        _fail("eval.temperature", e.temperature, "a number >= 0 (0 = greedy)")
    if not 0 < e.top_p <= 1:
        _fail("eval.top_p", e.top_p, "a number in (0, 1]")
    _positive("eval.max_new_tokens", e.max_new_tokens)
    for name in ("max_prompt_length", "max_problems", "interval"):
        if getattr(e, name) < 0:
            _fail(f"eval.{name}", getattr(e, name), "an integer >= 0")
    if not e.code_timeout_s > 0:
        _fail("eval.code_timeout_s", e.code_timeout_s, "a number > 0")
    _positive("eval.code_workers", e.code_workers)
    _positive("eval.prompts_per_call", e.prompts_per_call)
    if e.livecodebench_dates is not None:
        from megatron_mgrpo.evaluation.benchmarks import parse_date_range

        try:
            parse_date_range(e.livecodebench_dates)
        except ValueError:
            _fail("eval.livecodebench_dates", e.livecodebench_dates,
                  "START:END with ISO dates (YYYY-MM-DD), either may be empty")


def _validate_sglang(g: SGLangConfig) -> None:
    _one_of("sglang.placement", g.placement, ("swap", "separate"))
    _one_of("sglang.transport", g.transport, ("tensor", "distributed", "disk"))
    _one_of("sglang.dist_backend", g.dist_backend, ("auto", "nccl", "gloo"))
    if g.launch < 0:
        _fail("sglang.launch", g.launch, "an integer >= 0")
    if g.launch == 0 and not g.urls:
        raise ConfigError("sglang.urls: got []; accepted: the servers to attach to, or "
                          "sglang.launch >= 1 to start them")
    if g.launch and (g.urls or g.momentum_urls):
        raise ConfigError("sglang.launch and sglang.urls: give one or the other (launch "
                          "servers, or attach to running ones)")
    if g.placement == "separate" and g.launch == 0 and not g.momentum_urls:
        _fail("sglang.momentum_urls", g.momentum_urls,
              "the momentum model's servers (placement separate, attached)")
    if g.placement == "swap" and g.momentum_urls:
        _fail("sglang.momentum_urls", g.momentum_urls, "[] in placement swap (one group)")
    for name in ("urls", "momentum_urls"):
        for url in getattr(g, name):
            if not url.startswith(("http://", "https://")):
                _fail(f"sglang.{name}", url, "http://host:port URLs")
    if "{port}" not in g.launch_command and g.launch:
        _fail("sglang.launch_command", g.launch_command, "a command with {port} in it")
    for name in ("request_timeout_s", "launch_timeout_s"):
        if not getattr(g, name) > 0:
            _fail(f"sglang.{name}", getattr(g, name), "a number > 0")
    if g.max_retries < 0:
        _fail("sglang.max_retries", g.max_retries, "an integer >= 0")
    _positive("sglang.max_prompts_per_request", g.max_prompts_per_request)
    if not 0 <= g.base_port < 65536:
        _fail("sglang.base_port", g.base_port, "0 (free ports) or a port number")
