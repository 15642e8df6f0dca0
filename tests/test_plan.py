"""`mgrpo plan`: exact parameter counts (published totals, transformers' own models) and the
per-GPU memory parts against hand-computed bytes; the example configs' layouts fit."""

import json
import os
import subprocess
import sys

import pytest

from megatron_mgrpo.config import load_config
from megatron_mgrpo.config.schema import ModelConfig
from megatron_mgrpo.plan import GIB, OVERHEAD_GIB, count_parameters, plan_memory
from tests import DEADLOCK_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAMA3_8B = dict(architecture="llama", vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_layers=32, num_attention_heads=32,
                 num_key_value_heads=8)
LLAMA3_70B = dict(architecture="llama", vocab_size=128256, hidden_size=8192,
                  intermediate_size=28672, num_layers=80, num_attention_heads=64,
                  num_key_value_heads=8)
QWEN3_4B = dict(architecture="qwen3", vocab_size=151936, hidden_size=2560,
                intermediate_size=9728, num_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)


@pytest.mark.parametrize("kw, published", [
    (LLAMA3_8B, 8_030_261_248),    # meta-llama/Meta-Llama-3-8B safetensors total
    (LLAMA3_70B, 70_553_706_496),  # meta-llama/Meta-Llama-3-70B
    (QWEN3_4B, 4_022_468_096),     # Qwen/Qwen3-4B-Base
], ids=["llama3-8b", "llama3-70b", "qwen3-4b"])
def test_parameter_counts_match_the_published_totals(kw, published):
    got = count_parameters(ModelConfig(**kw))["total"]
    assert abs(got - published) / published < 0.005
    assert got == published


@pytest.mark.parametrize("kw", [
    dict(architecture="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128,
         num_layers=3, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    dict(architecture="qwen3", vocab_size=101, hidden_size=64, intermediate_size=96,
         num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    dict(architecture="llama", vocab_size=80, hidden_size=32, intermediate_size=64,
         num_layers=2, num_attention_heads=4),
], ids=["qwen2-tied-bias", "qwen3-qknorm-headdim", "llama-mha"])
def test_parameter_counts_equal_transformers_models(kw):
    from tests.test_hf_reference import hf_model

    model = hf_model(kw)
    assert count_parameters(ModelConfig(**kw))["total"] == sum(p.numel()
                                                               for p in model.parameters())


def test_memory_parts_by_hand():
    """A 2-layer model, TP 1 x PP 2 x DP 2, bf16, distributed optimizer, mgrpo."""
    kw = dict(architecture="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
              num_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = [x for k, v in kw.items() for x in (f"--model.{k}", str(v))]
    cfg = load_config(None, [*model, "--model.params_dtype", "bf16",
                             "--parallel.pipeline_parallel", "2", "--parallel.micro_batch_size",
                             "2", "--data.max_prompt_length", "100",
                             "--rollout.max_new_tokens", "28"], world_size=4)
    plan = plan_memory(cfg, num_gpus=4)
    h, inter, v, s, b = 64, 128, 1000, 128, 2
    kv = 2 * (h // 4)  # 2 KV heads of width 16
    layer = h * h + 2 * h * kv + h * h + 3 * h * inter + 2 * h  # q, k+v, o, SwiGLU, 2 norms
    first = layer + v * h          # stage 0: one layer and the embedding
    last = layer + h + v * h       # stage 1: one layer, the final norm, the LM head
    n = max(first, last)
    assert plan.layout == {"tp": 1, "pp": 2, "vpp": 1, "cp": 1, "dp": 2, "gpus": 4,
                           "micro_batch_size": 2, "seq_len": 128, "microbatches": 16,
                           "pipeline_bubble": round(1 / 16, 4), "rollout_servers": 1,
                           "server_tp": 1, "rollout_weights": "bf16"}
    gib = plan.per_gpu
    assert gib["params"] * GIB == pytest.approx(2 * n)
    assert gib["grads"] * GIB == pytest.approx(4 * n)
    assert gib["optimizer"] * GIB == pytest.approx(12 * n / 2)  # fp32 main + m + v, / DP
    assert gib["ema"] * GIB == pytest.approx(4 * n / 2)
    # Stage 1 (last): one microbatch in flight; the logits and their gradient in fp32.
    per_layer = 2 * s * b * (4 * h + (h + 2 * kv) + 3 * inter + h)
    assert gib["activations"] * GIB == pytest.approx(per_layer)
    assert gib["logits"] * GIB == pytest.approx(2 * 4 * s * b * v)
    assert gib["overhead"] == OVERHEAD_GIB
    assert plan.per_gpu_peak_gib == pytest.approx(sum(gib.values()))
    srt = plan_memory(load_config(None, [*model, "--algorithm.mode", "srt",
                                         "--rollout.num_momentum_rollouts", "0"]), 1)
    assert srt.per_gpu["ema"] == 0.0  # no momentum model outside mgrpo
    assert gib["reference"] == 0.0  # kl_coef 0: no reference model
    kl = plan_memory(load_config(None, [*model, "--model.params_dtype", "bf16",
                                        "--algorithm.kl_coef", "0.01"]), 1)
    n1 = 2 * layer + h + 2 * v * h  # both layers, the final norm, the embedding, the LM head
    assert kl.per_gpu["reference"] * GIB == pytest.approx(2 * n1)  # the weights again, bf16
    anchored = plan_memory(load_config(None, [*model, "--algorithm.kl_coef", "0.01",
                                              "--algorithm.kl_reference", "momentum"]), 1)
    assert anchored.per_gpu["reference"] == 0.0  # the momentum model: no copy kept


def test_virtual_pipeline_and_context_parallel_by_hand():
    """4 layers, PP 2 x 2 model chunks (stage 0: layers 0, 2; stage 1: 1, 3) x CP 2 x DP 2 on
    8 GPUs; 4 prompts x 8 rollouts = 16 sequences per DP rank = 8 microbatches of 2."""
    kw = dict(architecture="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
              num_layers=4, num_attention_heads=4, num_key_value_heads=2)
    model = [x for k, v in kw.items() for x in (f"--model.{k}", str(v))]
    common = [*model, "--model.params_dtype", "bf16", "--parallel.pipeline_parallel", "2",
              "--parallel.micro_batch_size", "2", "--data.max_prompt_length", "100",
              "--rollout.max_new_tokens", "28", "--data.prompts_per_step", "4",
              "--rollout.num_policy_rollouts", "4", "--rollout.num_momentum_rollouts", "4"]
    cfg = load_config(None, [*common, "--parallel.virtual_pipeline", "2",
                             "--parallel.context_parallel", "2"])
    plan = plan_memory(cfg, num_gpus=8)
    assert {k: plan.layout[k] for k in ("tp", "pp", "vpp", "cp", "dp", "microbatches")} == \
        {"tp": 1, "pp": 2, "vpp": 2, "cp": 2, "dp": 2, "microbatches": 8}
    assert plan.layout["pipeline_bubble"] == pytest.approx(1 / (2 * 8))  # (PP-1) / (V m)
    h, inter, v, b = 64, 128, 1000, 2
    s = 128 // 2  # CP 2: each rank keeps half of every sequence
    kv = 2 * (h // 4)
    layer = h * h + 2 * h * kv + h * h + 3 * h * inter + 2 * h
    per_layer = 2 * s * b * (4 * h + (h + 2 * kv) + 3 * inter + h)
    # Interleaved warm-up on stage i: 2 (PP - i - 1) + (V - 1) PP chunk forwards, plus the one
    # running; one layer per chunk. Stage 0: 5 = megatron's (1 + 1/4) x 4 layers.
    stages = [dict(n=2 * layer + v * h, acts=5 * per_layer, logits=0),
              dict(n=2 * layer + h + v * h, acts=3 * per_layer, logits=2 * 4 * s * b * v)]
    for st in stages:
        st["total"] = (2 + 4 + 12 / 4 + 4 / 4) * st["n"] + st["acts"] + st["logits"]
    worst = max(stages, key=lambda st: st["total"])
    gib = plan.per_gpu
    assert gib["params"] * GIB == pytest.approx(2 * worst["n"])
    assert gib["optimizer"] * GIB == pytest.approx(12 * worst["n"] / 4)  # / (DP x CP)
    assert gib["ema"] * GIB == pytest.approx(4 * worst["n"] / 4)
    assert gib["activations"] * GIB == pytest.approx(worst["acts"])
    assert gib["logits"] * GIB == pytest.approx(worst["logits"])
    # Without the virtual pipeline stage 0 holds 2 microbatches of its 2 layers: 4, not 5.
    plain = plan_memory(load_config(None, [*common, "--parallel.context_parallel", "2"]), 8)
    assert plain.layout["pipeline_bubble"] == pytest.approx(1 / 8)
    assert plan.per_gpu["activations"] > plain.per_gpu["activations"]
    with pytest.raises(ValueError, match="CP=2"):
        plan_memory(cfg, num_gpus=6)


def plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "plan", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=DEADLOCK_GUARD_S)


def test_fp8_rollout_weights_by_hand():
    """Llama-3-8B: per layer q, o 4096 x 4096, k, v 1024 x 4096, gate, up, down 14336 x 4096
    in FP8 (218,103,808 bytes) with 128 x 128 tile scales (32*32*2 + 8*32*2 + 112*32*3 =
    13,312 fp32); the rest (1,050,939,392 parameters) in bf16."""
    from megatron_mgrpo.plan import rollout_weight_bytes

    m = ModelConfig(**LLAMA3_8B)
    assert rollout_weight_bytes(m) == 2 * 8_030_261_248
    assert rollout_weight_bytes(m, "fp8", 128) == \
        32 * 218_103_808 + 4 * 32 * 13_312 + 2 * 1_050_939_392
    assert rollout_weight_bytes(m, "fp8", 0) == 32 * 218_103_808 + 4 * 32 * 7 + \
        2 * 1_050_939_392
    cfg = load_config(None, ["--rollout.weight_format", "fp8"])
    plain = load_config(None, [])
    assert plan_memory(cfg, 1).rollout["weights_gib"] < plan_memory(plain, 1).rollout[
        "weights_gib"]


LAUNCHERS = [
    ("examples/llama3_70b.yaml", 64, 4, 8),   # slurm/mgrpo_70b.sh: 8 nodes x 8, 4 servers
    ("examples/llama3_8b.yaml", 16, 8, 1),    # slurm/mgrpo_8b.sh
    ("examples/qwen3_4b_base.yaml", 8, 8, 1),  # slurm/mgrpo_smoke.sh
]


@pytest.mark.parametrize("config, gpus, servers, server_tp", LAUNCHERS)
def test_the_launchers_layouts_fit_on_h100_80gb(config, gpus, servers, server_tp):
    """With no flags: the layout is the config's own (parallel.num_gpus, sglang.num_servers,
    sglang.server_tp), the one its launcher starts."""
    run = plan_cli(config, "--json")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["per_gpu_peak_gib"] < 75 and plan["fits"]
    assert set(plan["per_gpu_gib"]) == {"params", "grads", "optimizer", "ema", "reference",
                                        "activations", "logits", "overhead"}
    # kl_coef 0.005 as the paper's script: the frozen base again, in bf16 like the weights.
    assert plan["per_gpu_gib"]["reference"] == plan["per_gpu_gib"]["params"] > 0
    layout = plan["layout"]
    assert (layout["gpus"], layout["rollout_servers"], layout["server_tp"]) == \
        (gpus, servers, server_tp)
    # The flags plan another layout; given as the config has it, the same plan.
    flags = plan_cli(config, "--gpus", str(gpus), "--rollout-servers", str(servers),
                     "--server-tp", str(server_tp), "--json")
    assert json.loads(flags.stdout) == plan


def test_every_shipped_config_plans_and_fits_with_no_flags(tmp_path):
    """`mgrpo plan CONFIG` as the README and the headers write it, for every example (the sweep
    file is a grid over tiny/config.yaml, not a config; the tiny run's base is written here
    as its config.json, the shape prepare_tiny gives it)."""
    import glob

    from megatron_mgrpo.models.architecture import hf_config_dict

    base = tmp_path / "tiny_base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(hf_config_dict(ModelConfig(
        architecture="qwen3", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True))))
    # SmolLM2-135M-Instruct's shape (tools/fetch_smollm2.py), which runs/smollm2 holds.
    smollm2 = tmp_path / "smollm2"
    smollm2.mkdir()
    (smollm2 / "config.json").write_text(json.dumps(hf_config_dict(ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
        tie_word_embeddings=True))))
    shipped = sorted(os.path.relpath(p, ROOT) for p in
                     glob.glob(os.path.join(ROOT, "examples", "**", "*.yaml"), recursive=True))
    assert len(shipped) == 10
    for config in shipped:
        if config in ("examples/sweep_tiny.yaml", "examples/experiments/collapse.yaml"):
            continue  # sweep files: their cells are tiny/config.yaml (tests/test_examples.py)
        extra = (["--model.load", str(base)] if config == "examples/tiny/config.yaml" else
                 ["--model.load", str(smollm2)] if config.startswith("examples/smollm2/") else
                 [])
        run = plan_cli(config, *extra)
        assert run.returncode == 0 and run.stdout.endswith("fits\n"), (config, run.stderr)


def test_a_config_that_does_not_fit_is_refused_with_what_to_change():
    run = plan_cli("examples/llama3_70b.yaml", "--gpus", "8", "--parallel.pipeline_parallel",
                   "1")
    assert run.returncode == 1
    assert "DOES NOT FIT" in run.stdout
    assert "mgrpo plan: does not fit: training:" in run.stderr
    assert "parallel.recompute" in run.stderr and "Traceback" not in run.stderr
    run = plan_cli("examples/llama3_70b.yaml", "--gpus", "60")
    assert run.returncode == 2 and "config error" in run.stderr
