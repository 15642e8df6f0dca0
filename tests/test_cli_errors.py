"""`mgrpo` on bad configs: one line on stderr, exit code 2, no traceback, before any heavy
import; and the effective model (the base's architecture) in `mgrpo config` and config.yaml.

Every case goes through `cli.main([...])` as a user's command would, and asserts the whole line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing

import pytest
import yaml

from megatron_mgrpo import cli
from megatron_mgrpo.config import Config, ConfigError, dump_config, load_config
from tests import DEADLOCK_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples/tiny/config.yaml")
SMOKE = os.path.join(ROOT, "examples/tiny/smoke.yaml")

# The tiny demo's base as prepare_tiny writes it: Qwen3, not the dataclass defaults (llama,
# vocab 256, hidden 64, untied).
BASE = dict(architecture="qwen3", vocab_size=512, hidden_size=128, intermediate_size=256,
            num_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """An HF model directory as far as the config goes: its config.json."""
    from megatron_mgrpo.config import ModelConfig
    from megatron_mgrpo.models.architecture import hf_config_dict

    out = tmp_path_factory.mktemp("tiny_base")
    (out / "config.json").write_text(json.dumps(hf_config_dict(ModelConfig(**BASE))))
    return str(out)


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `mgrpo ARGV`."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *argv) -> str:
    """The one stderr line of a command refused as a config error (exit code 2)."""
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("mgrpo: config error: "), err
    return err[len("mgrpo: config error: "):].rstrip("\n")


# ------------------------------------------------------------------ the effective model

def test_config_shows_the_bases_architecture(capsys, base_dir):
    rc, out, err = run(capsys, "config", TINY, "--model.load", base_dir)
    assert rc == 0, err
    model = yaml.safe_load(out)["model"]
    assert model["load"] == base_dir and model["params_dtype"] == "fp32"  # the run's own
    want = dict(BASE, head_dim=32, attention_bias=False, qk_norm=True, rope_scaling=None)
    assert {k: model[k] for k in want} == want


def test_the_saved_config_yaml_is_the_effective_one_and_reads_back(base_dir, tmp_path):
    cfg = load_config(TINY, ["--model.load", base_dir])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))  # what the trainer writes into the run directory
    again = load_config(str(saved))  # every model field written, all agreeing with the base
    assert again == cfg
    assert again.model.vocab_size == 512 and again.model.tie_word_embeddings is True


@pytest.mark.parametrize("command", ["config", "train"])
def test_a_field_beside_model_load_that_disagrees_is_refused(capsys, base_dir, command):
    line = refused(capsys, command, TINY, "--model.load", base_dir,
                   "--model.num_attention_heads", "8")
    assert line == (f"model.num_attention_heads: got 8, but the config.json of model.load "
                    f"{base_dir!r} has 4; drop model.num_attention_heads (the base's "
                    "architecture is used) or make it 4")


def test_fields_written_in_the_file_count_too_and_agreeing_ones_pass(capsys, base_dir,
                                                                     tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model:\n  load: {base_dir}\n  architecture: qwen3\n  hidden_size: 128\n"
                    "  tie_word_embeddings: false\n")
    assert refused(capsys, "config", str(path)) == (
        f"model.tie_word_embeddings: got False, but the config.json of model.load "
        f"{base_dir!r} has True; drop model.tie_word_embeddings (the base's architecture is "
        "used) or make it True")
    path.write_text(f"model:\n  load: {base_dir}\n  architecture: qwen3\n  hidden_size: 128\n")
    assert run(capsys, "config", str(path))[0] == 0


# ------------------------------------------------------------------ non-finite numbers

def _float_fields(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _float_fields(tp, path + ".")
        elif float in (tp, *typing.get_args(tp)):
            yield path


FLOAT_FIELDS = sorted(_float_fields())


def test_there_are_float_fields_in_every_kind_of_section():
    assert {"optimizer.lr", "algorithm.momentum", "model.rope_theta", "eval.top_p",
            "sglang.request_timeout_s", "algorithm.entropy_floor"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value, shown", [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan")])
def test_every_float_field_must_be_finite(field, value, shown):
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, [f"--{field}", value])  # sglang's too, though the backend is not
    assert str(info.value) == f"{field}: got {shown}; accepted: a finite number"


def test_inf_learning_rate_and_nan_inside_a_mapping_on_the_command_line(capsys):
    assert refused(capsys, "train", SMOKE, "--optimizer.lr", ".inf") == \
        "optimizer.lr: got inf; accepted: a finite number"
    assert refused(capsys, "smoke", SMOKE, "--model.rope_scaling",
                   "{rope_type: llama3, factor: .nan}") == \
        "model.rope_scaling.factor: got nan; accepted: a finite number"


# ------------------------------------------------------------------ lengths and minibatches

def test_lengths_beyond_the_bases_context_are_refused(capsys, base_dir):
    assert refused(capsys, "train", TINY, "--model.load", base_dir,
                   "--rollout.max_new_tokens", "200") == (
        "data.max_prompt_length + rollout.max_new_tokens: got 64 + 200 = 264; accepted: at "
        f"most model.max_position_embeddings=256 (the config.json of {base_dir!r})")
    assert refused(capsys, "smoke", SMOKE, "--data.max_prompt_length", "250") == (
        "data.max_prompt_length + rollout.max_new_tokens: got 250 + 16 = 266; accepted: at "
        "most model.max_position_embeddings=256")
    assert refused(capsys, "eval", TINY, "--model.load", base_dir, "--benchmarks", "math500",
                   "--eval.max_new_tokens", "256") == (
        "eval.max_new_tokens: got 256; accepted: less than model.max_position_embeddings=256 "
        f"(the config.json of {base_dir!r}), leaving room for the prompt")


def test_more_ppo_minibatches_than_trained_rows_are_refused(capsys):
    # smoke.yaml: 8 prompts x (M = 6 policy completions; the N = 2 momentum ones only vote).
    assert run(capsys, "config", SMOKE, "--algorithm.ppo_minibatches", "48")[0] == 0
    assert refused(capsys, "smoke", SMOKE, "--algorithm.ppo_minibatches", "49") == (
        "algorithm.ppo_minibatches: got 49; accepted: at most the 48 rows a step trains "
        "(data.prompts_per_step=8 x 6 trained completions per prompt in mode mgrpo)")
    assert refused(capsys, "config", SMOKE, "--algorithm.ppo_minibatches", "65",
                   "--algorithm.train_on_momentum_rollouts", "true") == (
        "algorithm.ppo_minibatches: got 65; accepted: at most the 64 rows a step trains "
        "(data.prompts_per_step=8 x 8 trained completions per prompt in mode mgrpo)")


# ------------------------------------------------------------------ files and paths

NO_TOKENIZER = ("model.load and data.tokenizer: both null; mgrpo train needs one: model.load "
                "(an HF model directory or converted checkpoint, whose tokenizer is used) or "
                "data.tokenizer (an HF tokenizer directory or a sentencepiece .model file)")


def test_no_model_load_and_no_tokenizer(capsys, tmp_path):
    assert refused(capsys, "train", TINY, "--model.load", "null") == NO_TOKENIZER
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert refused(capsys, "train", str(empty)) == NO_TOKENIZER
    assert refused(capsys, "train", SMOKE, "--data.tokenizer", str(tmp_path / "tok")) == (
        f"data.tokenizer: got {str(tmp_path / 'tok')!r}; accepted: an HF tokenizer directory "
        "or a sentencepiece .model file (nothing is at this path)")


def test_a_model_load_that_does_not_exist(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ as a fresh clone has it: nothing built yet
    assert refused(capsys, "train", TINY, "--model.load", "runs/tiny_bse") == (
        "model.load: no HF model directory or converted checkpoint at 'runs/tiny_bse' "
        "(`make train` builds runs/tiny_base; did you mean 'runs/tiny_base'?)")
    assert refused(capsys, "train", TINY) == (
        "model.load: no HF model directory or converted checkpoint at 'runs/tiny_base' "
        "(`make train` builds runs/tiny_base)")
    assert refused(capsys, "config", TINY, "--model.load", "/models/nowhere") == \
        "model.load: no HF model directory or converted checkpoint at '/models/nowhere'"
    (tmp_path / "empty_dir").mkdir()
    assert refused(capsys, "config", TINY, "--model.load", "empty_dir") == \
        "model.load: no config.json in 'empty_dir'"
    assert refused(capsys, "config", SMOKE, "--model.hf_config", "nowhere.json") == \
        "model.hf_config: no config.json at 'nowhere.json'"
    assert refused(capsys, "eval", "--model", "nowhere", "--benchmarks", "math500") == \
        "--model: no HF model directory (config.json) at 'nowhere'"


def test_config_files_that_are_missing_not_utf8_or_not_a_mapping(capsys, tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert refused(capsys, "train", missing) == f"config file not found: {missing}"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"training:\n  run_dir: runs/caf\xe9\n")
    assert refused(capsys, "train", str(latin1)) == (
        f"config file {latin1}: not UTF-8 text (byte 0xe9 at line 2); save it as UTF-8")
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    assert refused(capsys, "smoke", str(listed)) == (
        f"config file {listed}: the top level must be a mapping of sections (model, parallel, "
        "rollout, sglang, algorithm, optimizer, data, training, eval, logging, diagnostics); "
        "got a list")


def test_a_run_dir_that_is_a_file(capsys, tmp_path):
    taken = tmp_path / "run"
    taken.write_text("not a directory")
    assert refused(capsys, "smoke", SMOKE, "--training.run_dir", str(taken)) == \
        f"training.run_dir: got {str(taken)!r}; accepted: a directory (this path is a file)"


def test_train_without_prompts_and_with_prompts_that_are_not_there(capsys, base_dir, tmp_path):
    assert refused(capsys, "train", SMOKE, "--data.tokenizer", base_dir) == (
        "data.train_path: got None; accepted: a jsonl or parquet file of training prompts "
        "(mgrpo train needs one)")
    gone = str(tmp_path / "train.jsonl")
    assert refused(capsys, "train", SMOKE, "--data.tokenizer", base_dir,
                   "--data.train_path", gone) == (
        f"data.train_path: got {gone!r}; accepted: a prompt file (.jsonl, .json, .parquet, "
        ".csv); nothing is at this path")


def test_eval_with_nothing_to_evaluate_or_a_missing_checkpoint(capsys, base_dir, tmp_path):
    assert refused(capsys, "eval", SMOKE, "--data.tokenizer", base_dir) == (
        "nothing to evaluate: set data.val_path (validation prompts) or eval.benchmarks "
        "(e.g. --benchmarks math500,aime24)")
    gone = str(tmp_path / "step_9")
    assert refused(capsys, "eval", SMOKE, "--checkpoint", gone, "--benchmarks", "math500",
                   "--data.tokenizer", base_dir) == \
        f"--checkpoint: no checkpoint directory at {gone!r}"


# ------------------------------------------------------------------ help

@pytest.mark.parametrize("command", ["train", "eval", "smoke", "config", "plan"])
def test_help_names_the_overrides(capsys, command):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--section.key VALUE" in out and "--help-fields" in out


def test_help_fields_prints_list_and_dict_defaults_as_values(capsys):
    rc, out, _ = run(capsys, "config", "--help-fields")
    assert rc == 0 and "'...'" not in out
    assert "  benchmarks = []\n" in out and "  paths = {}\n" in out and "  urls = []\n" in out


# ------------------------------------------------------------------ quick, before heavy imports

PROBE = """
import sys
from megatron_mgrpo import cli
rc = cli.main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "megatron.core", "transformers") if m in sys.modules)
print(rc, *heavy)
"""


@pytest.mark.parametrize("argv", [
    ["train", SMOKE, "--optimizer.lr", ".inf"],
    ["train", TINY],  # model.load runs/tiny_base, not built here
    ["train", TINY, "--model.load", "null"],
    ["train", SMOKE, "--algorithm.ppo_minibatches", "1000"],
    ["eval", TINY, "--model.load", "null", "--checkpoint", "nowhere"],
    ["smoke", SMOKE, "--rollout.max_new_tokens", "1000"],
])
def test_config_errors_come_before_torch_and_megatron_are_imported(argv, tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=DEADLOCK_GUARD_S,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.stdout.split() == ["2"], (done.stdout, done.stderr)
    assert done.stderr.startswith("mgrpo: config error: ") and done.stderr.count("\n") == 1


# ------------------------------------------------------------------ the shipped examples' bases

LLAMA31 = dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
               hidden_act="silu", max_position_embeddings=131072, mlp_bias=False,
               rms_norm_eps=1e-05, rope_theta=500000.0, tie_word_embeddings=False,
               rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               vocab_size=128256, torch_dtype="bfloat16")
PUBLISHED = {  # config.json of the models the README's and slurm/README's commands load
    "examples/llama3_70b.yaml": dict(LLAMA31, hidden_size=8192, intermediate_size=28672,
                                     num_hidden_layers=80, num_attention_heads=64,
                                     num_key_value_heads=8),  # Llama-3.3-70B(-Instruct)
    "examples/llama3_8b.yaml": dict(LLAMA31, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=8),  # Llama-3.1-8B
    "examples/qwen3_4b_base.yaml": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
        head_dim=128, hidden_size=2560, intermediate_size=9728, max_position_embeddings=32768,
        num_attention_heads=32, num_hidden_layers=36, num_key_value_heads=8,
        rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000, tie_word_embeddings=True,
        vocab_size=151936, torch_dtype="bfloat16"),  # Qwen3-4B-Base
}


@pytest.mark.parametrize("example", sorted(PUBLISHED))
def test_the_examples_model_fields_agree_with_the_model_they_are_run_with(example, tmp_path):
    """The slurm launchers pass --model.load MODEL beside the example's model fields (written
    for `mgrpo plan` without weights): they must not be refused, and must not change."""
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[example]))
    urls = ["--sglang.urls", "[http://rollout:30000]"]  # as the launchers pass them
    written = load_config(os.path.join(ROOT, example), urls)
    loaded = load_config(os.path.join(ROOT, example), [*urls, "--model.load", str(tmp_path)])
    assert dataclasses.replace(loaded.model, load=None) == dataclasses.replace(
        written.model, num_key_value_heads=8, head_dim=written.model.head_dim or 128,
        attention_bias=False, qk_norm=written.model.architecture == "qwen3")
