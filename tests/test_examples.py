"""Every config in examples/ (and so every slurm launcher's config) stepped through the code
path it is shipped for: training configs through `trainer.run_training`, the smoke config
through `mgrpo smoke`, the eval config through `mgrpo eval --model`.

Overridden, and only these: the architecture's sizes (its family kept), the layout (one CPU
process: TP = PP = 1, no sequence parallelism, which the local layer spec refuses), the rollout
backend (the embedded engine; the SGLang client runs against `mgrpo serve` in test_trainer and
against SGLang's own types in test_sglang_backend), lengths, batch and step counts, and the
data paths (small files in the shipped formats and schemas), and for configs with
data.chat_template the tokenizer (the same one as an HF directory with a chat template, as
SmolLM2's). Every algorithm, optimizer,
rollout-sampling, data-handling and evaluation field runs as shipped, the KL to a reference
model among them.
"""

import glob
import math
import os

import pytest

from tests.distributed import run_workers
from tests.test_eval_harness import MATH500, data_dir, model_dir, tokenizer  # noqa: F401 fixtures
from tests import DEADLOCK_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING = ["examples/qwen3_4b_base.yaml", "examples/llama3_8b.yaml",
            "examples/llama3_70b.yaml", "examples/tiny/config.yaml",
            "examples/smollm2/config.yaml", "examples/smollm2/srt.yaml"]
SMOKE = ["examples/tiny/smoke.yaml"]
EVAL = ["examples/eval/benchmarks.yaml"]
SWEEPS = ["examples/sweep_tiny.yaml",  # grids over tiny/config.yaml, each cell's config below
          "examples/experiments/collapse.yaml"]


def test_every_example_is_covered_here():
    shipped = {os.path.relpath(p, ROOT)
               for p in glob.glob(os.path.join(ROOT, "examples", "**", "*.yaml"), recursive=True)}
    assert shipped == set(TRAINING + SMOKE + EVAL + SWEEPS)


@pytest.fixture(scope="module")
def prompts(data_dir, tmp_path_factory):  # noqa: F811
    """Training prompts as a parquet file and validation prompts as jsonl, as the configs name
    them, in MATH's schema (problem, answer) with the prompt again under the tiny configs' key
    (prompt)."""
    import datasets

    from tests.test_eval_harness import write_jsonl

    out = tmp_path_factory.mktemp("prompts")
    rows = [{"problem": r["problem"], "prompt": r["problem"], "answer": r["answer"]}
            for r in MATH500]
    datasets.Dataset.from_list(rows).to_parquet(str(out / "train.parquet"))
    write_jsonl(str(out / "val.jsonl"), rows)
    return str(out / "train.parquet"), str(out / "val.jsonl")


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer, tmp_path_factory):  # noqa: F811
    """The fixture tokenizer as an HF directory with a chat template that opens each turn with
    its BOS, as SmolLM2's does with `<|im_start|>`."""
    hf = tokenizer.to_hf()
    hf.chat_template = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}\n"
                        "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
                        "{{ bos_token }}assistant\n{% endif %}")
    out = str(tmp_path_factory.mktemp("chat_tokenizer"))
    hf.save_pretrained(out)
    return out


def tiny(cfg_path, model_dir, data_dir, prompts, run_dir, chat_tokenizer=None):  # noqa: F811
    from megatron_mgrpo.config import load_config

    shipped = load_config(os.path.join(ROOT, cfg_path), validate=False)
    if shipped.model.load == "runs/tiny_base":
        # The tiny run's base is a warm-up of its own (test_trainer steps the real one); here
        # a random model of the same shape family, with the same kind of tokenizer.
        base = ["--model.architecture", "qwen3", "--model.tie_word_embeddings", "true"]
    elif shipped.model.load == "runs/smollm2":
        # SmolLM2-135M-Instruct (tests/test_smollm2.py steps the real one): a random Llama
        # with tied embeddings.
        base = ["--model.architecture", "llama", "--model.tie_word_embeddings", "true"]
    else:
        base = []
    tokenizer = chat_tokenizer if shipped.data.chat_template else model_dir
    return shipped, [
        "--model.load", "null", "--model.hf_config", "null", *base,
        "--model.vocab_size", "320", "--model.hidden_size", "64",
        "--model.intermediate_size", "128", "--model.num_layers", "2",
        "--model.num_attention_heads", "4", "--model.num_key_value_heads", "2",
        # 1024 positions: the shipped 512-token prompts plus completions must fit.
        "--model.head_dim", "16", "--model.max_position_embeddings", "1024",
        "--parallel.tensor_parallel", "1", "--parallel.pipeline_parallel", "1",
        "--parallel.sequence_parallel", "false",
        "--rollout.backend", "embedded", "--rollout.max_new_tokens", "12",
        "--data.tokenizer", tokenizer, "--data.train_path", prompts[0],
        "--data.val_path", prompts[1],
        "--data.prompts_per_step", "2", "--training.steps", "1", "--training.run_dir", run_dir,
        "--eval.data_dir", data_dir, "--eval.max_new_tokens", "12"]


def train_worker(cfg_path, args):
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.session import Session
    from megatron_mgrpo.trainer import run_training

    cfg = load_config(os.path.join(ROOT, cfg_path), args, world_size=1)
    with Session(cfg, "train") as session:
        built = {"reference": session.reference_model is not None,
                 "momentum": session.momentum is not None}
        return cfg, built, run_training(session)


@pytest.mark.parametrize("cfg_path", TRAINING)
def test_each_training_config_takes_a_step(cfg_path, model_dir, data_dir, prompts,  # noqa: F811
                                           chat_tokenizer, tmp_path):
    shipped, args = tiny(cfg_path, model_dir, data_dir, prompts, str(tmp_path), chat_tokenizer)
    (cfg, built, history), = run_workers(train_worker, 1, cfg_path, args)
    for section in ("algorithm", "optimizer"):
        assert getattr(cfg, section) == getattr(shipped, section), section
    for field in ("num_policy_rollouts", "num_momentum_rollouts", "temperature", "top_p",
                  "weight_format", "momentum_push_interval"):
        assert getattr(cfg.rollout, field) == getattr(shipped.rollout, field), field
    assert built == {"reference": shipped.algorithm.kl_coef > 0,
                     "momentum": shipped.algorithm.mode == "mgrpo"}
    step = history[-1]
    assert step["step"] == 1 and math.isfinite(step["loss"])
    if shipped.algorithm.kl_coef > 0:
        # Step 1 scores with the weights the reference was copied from: KL 0, not missing.
        assert step["kl"] == pytest.approx(0.0, abs=1e-9)
    for name in shipped.eval.benchmarks if shipped.eval.interval else []:
        assert f"{name}/pass@1" in history[0] and f"{name}/pass@1" in step, name
    if shipped.training.eval_interval:
        assert "val_accuracy" in step
    assert os.listdir(os.path.join(str(tmp_path), "checkpoints")) == ["latest", "step_0000001"]


def smoke_worker(cfg_path, run_dir):
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.smoke import run_smoke

    cfg = load_config(os.path.join(ROOT, cfg_path),
                      ["--training.steps", "2", "--training.run_dir", run_dir], world_size=1)
    return run_smoke(cfg, log=lambda *_: None)


@pytest.mark.parametrize("sweep_path", SWEEPS)
def test_every_sweep_cell_is_a_valid_config(sweep_path, model_dir, tmp_path):  # noqa: F811
    """Each cell's config (the sweep's config file, the cell's overrides) passes the config
    check on a model dir standing in for the base it names; the experiment's arms are the
    modes and vote sizes its docs say."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from sweep import load_sweep, make_cells, override_args
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))
    from megatron_mgrpo.config import load_config

    sweep = load_sweep(os.path.join(ROOT, sweep_path))
    modes = {}
    for cell in make_cells(sweep):
        cfg = load_config(os.path.join(ROOT, sweep["config"]),
                          [*override_args(cell), "--model.load", model_dir,
                           "--training.run_dir", str(tmp_path / cell["name"])])
        cfg.validate(world_size=1)
        modes[cell["values"].get("arm")] = (cfg.algorithm.mode, cfg.rollout.num_policy_rollouts,
                                            cfg.rollout.num_momentum_rollouts,
                                            cfg.algorithm.iqr_filter)
    if sweep_path.endswith("collapse.yaml"):
        assert modes == {"srt_g4": ("srt", 4, 0, False), "srt_g8": ("srt", 8, 0, False),
                         "srt_g16": ("srt", 16, 0, False), "mgrpo_m0.99": ("mgrpo", 6, 2, False),
                         "mgrpo_m0.9": ("mgrpo", 6, 2, False), "mgrpo_iqr": ("mgrpo", 6, 2, True),
                         "rlvr": ("rlvr", 8, 0, False)}


@pytest.mark.parametrize("cfg_path", SMOKE)
def test_the_smoke_config_runs(cfg_path, tmp_path):
    (history,) = run_workers(smoke_worker, 1, cfg_path, str(tmp_path))
    assert [m["step"] for m in history] == [1, 2]
    assert history[1]["logp_agree"] > history[0]["logp_agree"]


@pytest.mark.parametrize("cfg_path", EVAL)
def test_the_eval_config_scores_an_hf_model(cfg_path, model_dir, data_dir, tmp_path):  # noqa
    """The header's command, `mgrpo eval examples/eval/benchmarks.yaml --model DIR`, with the
    benchmark files of a fixture directory (gpqa reads the diamond file: the main one is
    gated) and short completions."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "megatron_mgrpo.cli", "eval", cfg_path, "--model", model_dir,
         "--eval.data_dir", data_dir, "--eval.paths",
         "{gpqa: " + os.path.join(data_dir, "gpqa_diamond.csv") + "}",
         "--eval.max_new_tokens", "8", "--eval.output_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=DEADLOCK_GUARD_S)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(str(tmp_path), os.path.basename(model_dir) + ".json")) as f:
        scored = json.load(f)["benchmarks"]
    assert sorted(scored) == sorted(["math500", "aime24", "aime25", "gpqa", "gpqa_diamond",
                                     "livecodebench"])
    assert "math500" in done.stdout and "pass@1" in done.stdout  # the table, on stdout
