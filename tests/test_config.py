"""The config tree and its loader: exact values, precedence, round trip, docs, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

import pytest

from megatron_mgrpo.config import (AlgorithmConfig, Config, ConfigError, DataConfig,
                                   DiagnosticsConfig, LoggingConfig, ModelConfig,
                                   OptimizerConfig, ParallelConfig, RolloutConfig,
                                   TrainingConfig, config_to_dict, dump_config, field_docs,
                                   load_config)

SECTIONS = [ModelConfig, ParallelConfig, RolloutConfig, AlgorithmConfig, OptimizerConfig,
            DataConfig, TrainingConfig, LoggingConfig, DiagnosticsConfig]


def write(tmp_path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(path=None, overrides=(), **kw) -> str:
    """The one-line message of the ConfigError that loading raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, **kw)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------- values

def test_yaml_plus_overrides_give_exact_values_and_types(tmp_path):
    path = write(tmp_path, """
        model:
          num_layers: 4
          rope_theta: 500000        # an int where a float is due: widened
          rope_scaling: {rope_type: llama3, factor: 8, low_freq_factor: 1.0,
                         high_freq_factor: 4.0, original_max_position_embeddings: 8192}
        algorithm:
          momentum: 0.9
          iqr_k: 1                  # int -> float
        optimizer:
          lr: 1e-5                  # PyYAML's YAML 1.1 would read this as a string
        data:
          prompt_key: yes           # a string under YAML 1.2, not True
          answer_key: null
        training:
          seed: 010                 # decimal ten, not octal eight
    """)
    cfg = load_config(path, ["--algorithm.momentum", "0.995", "--model.num_layers=8",
                             "--model.rope_scaling.factor", "16",
                             "--logging.tensorboard", "false",
                             "--data.train_path=/data/train.jsonl",
                             "--algorithm.entropy_floor", "0.05",
                             "--algorithm.ttrl_num_train", "null"])
    assert isinstance(cfg, Config)
    assert cfg.model.num_layers == 8 and type(cfg.model.num_layers) is int
    assert cfg.model.rope_theta == 500000.0 and type(cfg.model.rope_theta) is float
    assert cfg.model.rope_scaling == {"rope_type": "llama3", "factor": 16, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    assert cfg.algorithm.momentum == 0.995 and type(cfg.algorithm.momentum) is float
    assert cfg.algorithm.iqr_k == 1.0 and type(cfg.algorithm.iqr_k) is float
    assert cfg.algorithm.entropy_floor == 0.05
    assert cfg.algorithm.ttrl_num_train is None
    assert cfg.optimizer.lr == 1e-5 and type(cfg.optimizer.lr) is float
    assert cfg.data.prompt_key == "yes"
    assert cfg.data.answer_key is None
    assert cfg.data.train_path == "/data/train.jsonl"
    assert cfg.training.seed == 10
    assert cfg.logging.tensorboard is False
    # Untouched fields keep their defaults, in their own sections too.
    assert cfg.model.hidden_size == ModelConfig().hidden_size
    assert cfg.parallel == ParallelConfig()


def test_precedence_override_beats_file_beats_default(tmp_path):
    path = write(tmp_path, "algorithm: {momentum: 0.9}\nrollout: {temperature: 0.7}\n")
    assert load_config().algorithm.momentum == 0.99
    assert load_config(path).algorithm.momentum == 0.9
    cfg = load_config(path, ["--algorithm.momentum=0.5"])
    assert cfg.algorithm.momentum == 0.5
    assert cfg.rollout.temperature == 0.7
    # The last of two overrides of one key wins.
    cfg = load_config(path, ["--algorithm.momentum", "0.5", "--algorithm.momentum", "0.6"])
    assert cfg.algorithm.momentum == 0.6


def test_override_of_a_section_merges_into_the_file(tmp_path):
    path = write(tmp_path, "model: {num_layers: 4, hidden_size: 32}\n")
    cfg = load_config(path, ["--model", "{num_layers: 6}"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (6, 32)


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == Config()
    assert load_config(write(tmp_path, "model:\n", "b.yaml")) == Config()


def test_world_size_and_validate_flags():
    overrides = ["--parallel.tensor_parallel", "2", "--parallel.pipeline_parallel", "2"]
    assert load_config(None, overrides, world_size=8).parallel.tensor_parallel == 2
    bad = ["--algorithm.momentum", "1.0"]
    assert load_config(None, bad, validate=False).algorithm.momentum == 1.0


def test_round_trip_dump_load_is_equal(tmp_path):
    cfg = Config(
        model=ModelConfig(architecture="qwen3", num_layers=4, num_key_value_heads=2,
                          head_dim=32, rope_theta=1e6,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1, "high_freq_factor": 4,
                                        "original_max_position_embeddings": 8192},
                          qk_norm=True, params_dtype="bf16", rms_norm_eps=1e-5),
        parallel=ParallelConfig(tensor_parallel=2, backend="gloo"),
        algorithm=AlgorithmConfig(mode="srt", momentum=0.995, entropy_floor=0.01),
        rollout=RolloutConfig(num_momentum_rollouts=0, num_policy_rollouts=8),
        optimizer=OptimizerConfig(lr=3e-7, schedule="cosine", warmup_fraction=0.1),
        # Strings that YAML would read as something else if written bare.
        data=DataConfig(prompt_key="yes", answer_key="1e5", tokenizer="null", train_path="010"),
        training=TrainingConfig(run_dir="runs/it's: #1", steps=3),
    ).validate()
    text = dump_config(cfg)
    loaded = load_config(write(tmp_path, text))
    assert loaded == cfg
    assert config_to_dict(loaded) == config_to_dict(cfg)
    assert config_to_dict(cfg)["model"]["rope_scaling"]["factor"] == 8.0
    assert load_config(write(tmp_path, dump_config(Config()), "d.yaml")) == Config()


def test_every_field_of_every_section_is_documented():
    assert set(field_docs(Config)) == {f.name for f in dataclasses.fields(Config)}
    for section in [Config] + SECTIONS:
        docs = field_docs(section)
        assert list(docs) == [f.name for f in dataclasses.fields(section)]
        undocumented = [name for name, doc in docs.items() if not doc.strip()]
        assert not undocumented, f"{section.__name__}: no docstring under {undocumented}"
    assert field_docs(AlgorithmConfig)["momentum"].startswith("m in Eq. 1")


# ------------------------------------------------------- a generic tree with List fields

@dataclass
class _Inner:
    sizes: List[int] = field(default_factory=lambda: [1, 2])
    """Sizes."""

    names: Optional[List[str]] = None
    """Names."""


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    """Inner section."""

    table: Dict[str, float] = field(default_factory=lambda: {"a": 1.0})
    """A mapping with typed values."""

    kind: Literal["x", "y"] = "x"
    """Kind."""

    undocumented: int = 0


def test_generic_dataclass_tree_lists_and_typed_mappings():
    cfg = load_config(None, ["--inner.sizes", "[3, 4, 5]", "--inner.names=[a, b]",
                             "--table.b", "2"], cls=_Outer)
    assert cfg == _Outer(inner=_Inner(sizes=[3, 4, 5], names=["a", "b"]),
                         table={"a": 1.0, "b": 2.0})
    assert type(cfg.table["b"]) is float
    assert error_of(None, ["--inner.sizes", "[1, x]"], cls=_Outer) == \
        "inner.sizes[1]: got 'x' (a string); accepted: an integer"
    assert error_of(None, ["--inner.sizes", "3"], cls=_Outer) == \
        "inner.sizes: got 3 (an integer); accepted: a list (items: an integer)"
    assert error_of(None, ["--table.c", "true"], cls=_Outer) == \
        "table.c: got True (a boolean); accepted: a number"
    assert error_of(None, ["--kind", "z"], cls=_Outer) == \
        "kind: got 'z' (a string); accepted: x | y"
    assert field_docs(_Outer) == {"inner": "Inner section.", "table": "A mapping with typed values.",
                                  "kind": "Kind.", "undocumented": ""}


# ---------------------------------------------------------------------- loader errors

def test_unknown_key_suggests_the_closest(tmp_path):
    assert error_of(None, ["--model.hiden_size", "32"]) == \
        "unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'?"
    path = write(tmp_path, "model:\n  hiden_size: 32\n")
    assert error_of(path) == \
        "unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'?"
    assert error_of(write(tmp_path, "modle: {}\n", "b.yaml")) == \
        "unknown config key 'modle'; did you mean 'model'?"


def test_unknown_key_in_the_wrong_section_points_to_the_right_one():
    assert error_of(None, ["--model.tensor_parallel", "2"]) == \
        "unknown config key 'model.tensor_parallel'; did you mean 'parallel.tensor_parallel'?"


def test_unknown_key_without_a_close_match_lists_the_section():
    message = error_of(None, ["--parallel.zzz", "1"])
    assert message.startswith("unknown config key 'parallel.zzz'; accepted keys in 'parallel': ")
    for name in ("tensor_parallel", "pipeline_parallel", "micro_batch_size", "backend"):
        assert name in message


@pytest.mark.parametrize("overrides, expected", [
    (["--model.num_layers", "four"], "model.num_layers: got 'four' (a string); "
                                     "accepted: an integer"),
    (["--model.num_layers", "2.5"], "model.num_layers: got 2.5 (a number); accepted: an integer"),
    (["--model.num_layers", "true"], "model.num_layers: got True (a boolean); "
                                     "accepted: an integer"),
    (["--optimizer.lr", "fast"], "optimizer.lr: got 'fast' (a string); accepted: a number"),
    (["--parallel.sequence_parallel", "1"], "parallel.sequence_parallel: got 1 (an integer); "
                                            "accepted: true or false"),
    (["--parallel.sequence_parallel", "yes"], "parallel.sequence_parallel: got 'yes' "
                                              "(a string); accepted: true or false"),
    (["--data.prompt_key", "3"], "data.prompt_key: got 3 (an integer); accepted: a string"),
    (["--data.train_path", "[a]"], "data.train_path: got a list; accepted: a string or null"),
    (["--model.num_key_value_heads", "x"], "model.num_key_value_heads: got 'x' (a string); "
                                           "accepted: an integer or null"),
    (["--model.rope_scaling", "[1, 2]"], "model.rope_scaling: got a list; "
                                         "accepted: a mapping or null"),
    (["--model.tie_word_embeddings", "null"], "model.tie_word_embeddings: got None; "
                                              "accepted: true or false"),
])
def test_wrong_type_names_field_and_accepted(overrides, expected):
    assert error_of(None, overrides) == expected


def test_wrong_type_in_yaml(tmp_path):
    path = write(tmp_path, "training:\n  resume: 0\n")
    assert error_of(path) == "training.resume: got 0 (an integer); accepted: true or false"


def test_bad_literal_lists_accepted_values():
    assert error_of(None, ["--model.architecture", "gpt2"]) == \
        "model.architecture: got 'gpt2' (a string); accepted: llama | qwen2 | qwen3"
    assert error_of(None, ["--algorithm.mode=grpo"]) == \
        "algorithm.mode: got 'grpo' (a string); accepted: mgrpo | srt | ttrl | rlvr"


def test_section_given_a_scalar(tmp_path):
    message = error_of(write(tmp_path, "model: 3\n"))
    assert message.startswith("model: got 3 (an integer); accepted: a mapping of ModelConfig "
                              "keys (architecture, hf_config, ")
    assert error_of(None, ["--model.num_layers.x", "1"]) == (
        "override --model.num_layers.x: 'model.num_layers' is a single value (an integer), "
        "not a section with keys")


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "- model\n- parallel\n")
    assert error_of(path) == (f"config file {path}: the top level must be a mapping of sections "
                              "(model, parallel, rollout, sglang, algorithm, optimizer, data, "
                              "training, eval, logging, diagnostics); got a list")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert error_of(path) == f"config file not found: {path}"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 2\n  hidden_size: [64\nparallel: {}\n")
    message = error_of(path)
    assert message.startswith(f"config file {path}: YAML error at line ")
    path = write(tmp_path, "model:\n  num_layers: 2\n bad: 1\n", "b.yaml")
    assert error_of(path).startswith(f"config file {path}: YAML error at line 3, column 2: ")


def test_duplicate_yaml_key(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 2\n  num_layers: 4\n")
    assert error_of(path) == (f"config file {path}: YAML error at line 3, column 3: "
                              "duplicate key 'num_layers'")


@pytest.mark.parametrize("overrides", [
    ["--model.num_layers"],
    ["--model.num_layers", "--model.hidden_size", "32"],
    ["--model.num_layers="],
])
def test_override_without_value(overrides):
    assert error_of(None, overrides) == \
        f"override {overrides[0]}: no value given (write null for None)"


def test_override_not_a_flag():
    assert error_of(None, ["model.num_layers=4"]) == (
        "override 'model.num_layers=4': expected --section.key VALUE or --section.key=VALUE")


def test_override_value_that_is_not_yaml():
    assert error_of(None, ["--model.num_layers=[1,"]).startswith(
        "override --model.num_layers=[1,: YAML error at line 1")


# ------------------------------------------------------------------- validate() errors

@pytest.mark.parametrize("overrides, world_size, expected", [
    (["--parallel.tensor_parallel", "3"], None,
     "parallel.tensor_parallel: got 3; accepted: a divisor of model.num_attention_heads=4"),
    (["--model.hidden_size", "96", "--model.num_attention_heads", "12",
      "--model.num_key_value_heads", "3", "--parallel.tensor_parallel", "2"], None,
     "parallel.tensor_parallel: got 2; accepted: a divisor or multiple of "
     "model.num_key_value_heads=3"),
    (["--model.num_key_value_heads", "3"], None,
     "model.num_key_value_heads: got 3; accepted: a divisor of model.num_attention_heads=4"),
    (["--model.num_layers", "3", "--parallel.pipeline_parallel", "2"], None,
     "parallel.pipeline_parallel: got 2; accepted: a divisor of model.num_layers=3"),
    (["--algorithm.mode", "ttrl", "--rollout.num_policy_rollouts", "1",
      "--rollout.num_momentum_rollouts", "0"], None,
     "rollout.num_policy_rollouts + rollout.num_momentum_rollouts: got 1; accepted: >= 2 "
     "(a vote needs at least two completions in mode ttrl)"),
    (["--algorithm.mode", "srt", "--rollout.num_momentum_rollouts", "4"], None,
     "rollout.num_momentum_rollouts: got 4; accepted: 0 in mode srt"),
    (["--rollout.num_momentum_rollouts", "0"], None,
     "rollout.num_momentum_rollouts: got 0; accepted: >= 1 in mode mgrpo "
     "(use mode srt for N = 0)"),
    (["--algorithm.iqr_k", "-0.5"], None, "algorithm.iqr_k: got -0.5; accepted: a number >= 0"),
    (["--algorithm.momentum", "1"], None,
     "algorithm.momentum: got 1.0; accepted: a number in [0, 1)"),
    (["--algorithm.momentum", "-0.1"], None,
     "algorithm.momentum: got -0.1; accepted: a number in [0, 1)"),
    (["--algorithm.momentum_warmup_updates", "-1"], None,
     "algorithm.momentum_warmup_updates: got -1; accepted: an integer >= 0"),
    (["--algorithm.momentum_warmup_start", "1"], None,
     "algorithm.momentum_warmup_start: got 1.0; accepted: a number in [0, 1)"),
    (["--algorithm.min_agreement", "1.5"], None,
     "algorithm.min_agreement: got 1.5; accepted: a number in [0, 1]"),
    (["--parallel.virtual_pipeline", "2"], None,
     "parallel.virtual_pipeline: got 2; accepted: 1 when parallel.pipeline_parallel is 1 "
     "(model chunks interleave over stages)"),
    (["--parallel.pipeline_parallel", "2", "--parallel.virtual_pipeline", "2"], None,
     "parallel.virtual_pipeline: got 2; accepted: a value with pipeline_parallel x "
     "virtual_pipeline dividing model.num_layers=2"),
    (["--parallel.virtual_pipeline", "0"], None,
     "parallel.virtual_pipeline: got 0; accepted: an integer >= 1"),
    (["--parallel.context_parallel", "2", "--parallel.tensor_parallel", "2"], 6,
     "parallel.tensor_parallel * parallel.pipeline_parallel * parallel.context_parallel: "
     "got 4; accepted: a divisor of the world size 6"),
    (["--parallel.tensor_parallel", "2", "--parallel.pipeline_parallel", "2"], 6,
     "parallel.tensor_parallel * parallel.pipeline_parallel: got 4; "
     "accepted: a divisor of the world size 6"),
    (["--optimizer.lr", "0"], None, "optimizer.lr: got 0.0; accepted: a number > 0"),
    (["--optimizer.lr", "-1e-5"], None, "optimizer.lr: got -1e-05; accepted: a number > 0"),
    (["--model.head_dim", "0"], None, "model.head_dim: got 0; accepted: an integer >= 1"),
    (["--model.rope_scaling.rope_type", "llama3", "--model.rope_scaling.factor", "8"], None,
     "model.rope_scaling: got {'rope_type': 'llama3', 'factor': 8}; accepted: llama3 scaling "
     "with all of factor, low_freq_factor, high_freq_factor, original_max_position_embeddings "
     "(missing: low_freq_factor, high_freq_factor, original_max_position_embeddings)"),
    (["--model.rope_scaling.rope_type", "yarn"], None,
     "model.rope_scaling.rope_type: got 'yarn'; accepted: llama3 | default | (no rope_scaling)"),
    (["--logging.log_interval", "0"], None,
     "logging.log_interval: got 0; accepted: an integer >= 1"),
])
def test_validation_errors_name_field_and_accepted(overrides, world_size, expected):
    assert error_of(None, overrides, world_size=world_size) == expected


def test_validate_catches_bad_literals_in_hand_built_configs():
    with pytest.raises(ConfigError, match=r"^optimizer.schedule: got 'step'; accepted: "
                                          r"constant \| cosine \| linear$"):
        Config(optimizer=OptimizerConfig(schedule="step")).validate()


def test_validate_checks_parallel_layout_against_the_hf_config(tmp_path):
    hf = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256,
          "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 16,
          "num_key_value_heads": 8, "max_position_embeddings": 4096, "rope_theta": 500000.0,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    layout = ["--parallel.tensor_parallel", "8", "--parallel.pipeline_parallel", "4"]
    # Against the placeholder defaults (4 heads, 2 layers) this layout is impossible ...
    assert error_of(None, layout).startswith("parallel.tensor_parallel: got 8;")
    # ... against the HF model it describes, it is fine.
    cfg = load_config(None, layout + [f"--model.hf_config={tmp_path}"], world_size=64)
    assert cfg.model.hf_config == str(tmp_path)
    assert error_of(None, ["--parallel.pipeline_parallel", "3", "--model.hf_config",
                           str(tmp_path)]) == \
        "parallel.pipeline_parallel: got 3; accepted: a divisor of model.num_layers=8"


def test_context_parallel_is_planned_but_training_refuses_it():
    from megatron_mgrpo.parallel import init_parallel

    cfg = load_config(None, ["--parallel.context_parallel", "2"], world_size=2)
    assert cfg.parallel.context_parallel == 2  # valid for `mgrpo plan`
    with pytest.raises(ConfigError, match=r"^parallel.context_parallel: got 2; accepted here: "
                                          r"1 \(context parallelism is counted by `mgrpo plan`"):
        init_parallel(cfg.parallel)


def test_the_layout_mgrpo_plan_plans_for_is_checked():
    assert error_of(None, ["--parallel.tensor_parallel", "2", "--parallel.num_gpus", "3"]) == (
        "parallel.num_gpus: got 3; accepted: 0 (the world size) or a multiple of "
        "parallel.tensor_parallel x pipeline_parallel x context_parallel = 2")
    assert error_of(None, ["--rollout.backend", "sglang", "--sglang.launch", "1",
                           "--sglang.server_tp", "0"]) == \
        "sglang.server_tp: got 0; accepted: an integer >= 1"
    assert error_of(None, ["--rollout.backend", "sglang", "--sglang.launch", "1",
                           "--sglang.num_servers", "-1"]) == \
        "sglang.num_servers: got -1; accepted: an integer >= 0 (0: as many as urls)"
    cfg = load_config(None, ["--parallel.tensor_parallel", "2", "--parallel.num_gpus", "8"])
    assert cfg.parallel.num_gpus == 8
