"""FP8 through Transformer Engine: the options are checked wherever the config is read, the
hardware where the model is built (a clear error on CPU), and on a GPU with FP8 a small model's
FP8 forward/backward tracks its BF16 one."""

import os
import subprocess
import sys

import pytest

from megatron_mgrpo.config import ConfigError, load_config
from tests import DEADLOCK_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args, message", [
    (["--model.fp8", "e5m2"], "model.fp8: got 'e5m2'"),
    (["--model.fp8", "e4m3"], "model.params_dtype: got 'fp32'; accepted: bf16"),
    (["--model.fp8", "hybrid", "--model.params_dtype", "bf16", "--model.fp8_recipe", "nvfp4"],
     "model.fp8_recipe: got 'nvfp4'"),
    (["--model.fp8_param_gather", "true"], "model.fp8_param_gather: got True"),
    (["--model.fp8", "e4m3", "--model.params_dtype", "bf16", "--model.fp8_param_gather", "true",
      "--parallel.use_distributed_optimizer", "false"], "model.fp8_param_gather: got True"),
])
def test_fp8_options_are_checked_with_the_config(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, args)


def test_fp8_settings_reach_megatron_and_pass_the_plan():
    cfg = load_config(None, ["--model.fp8", "hybrid", "--model.params_dtype", "bf16",
                             "--model.fp8_recipe", "blockwise", "--model.fp8_param_gather",
                             "true"])
    from megatron_mgrpo.plan import plan_memory

    plain = load_config(None, ["--model.params_dtype", "bf16"])
    assert plan_memory(cfg, 1).per_gpu["params"] == pytest.approx(
        plan_memory(plain, 1).per_gpu["params"] / 2)  # FP8 weights: one byte each


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU error path")
def test_fp8_on_a_machine_without_fp8_is_one_clear_line():
    run = subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "smoke",
                          os.path.join(ROOT, "examples/tiny/smoke.yaml"), "--model.fp8", "e4m3",
                          "--model.params_dtype", "bf16", "--training.steps", "1"],
                         capture_output=True, text=True, timeout=DEADLOCK_GUARD_S, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert "config error: model.fp8: got 'e4m3'; accepted here: null (FP8 needs a CUDA GPU" \
        in run.stderr
    assert "Traceback" not in run.stderr


def fp8_worker(fp8):
    import torch

    from megatron_mgrpo.config.schema import Config, ModelConfig, ParallelConfig
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.parallel import init_parallel

    cfg = Config(model=ModelConfig(architecture="llama", vocab_size=1024, hidden_size=512,
                                   intermediate_size=1536, num_layers=2, num_attention_heads=8,
                                   params_dtype="bf16", fp8=fp8),
                 parallel=ParallelConfig(micro_batch_size=4))
    ctx = init_parallel(cfg.parallel, seed=3)
    policy = MegatronPolicy(cfg, ctx, total_steps=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (4, 128), generator=g)
    lp, _ = policy.logprobs({"input_ids": ids}, with_entropy=False)

    def loss(lp, ent, micro):
        return -(lp * micro["loss_mask"]).sum(), micro["loss_mask"].sum(), {}

    batch = {"input_ids": ids, "loss_mask": torch.ones(4, 128)}
    value, _, _ = policy.compute_grads(batch, loss)
    return lp.float().cpu(), float(value), policy.full_state_dict(grads=True)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", ["e4m3", "hybrid"])
def test_fp8_forward_backward_tracks_bf16_on_the_gpu(fp8):
    import torch

    from tests.distributed import run_workers

    (ref,) = run_workers(fp8_worker, 1, None)
    (got,) = run_workers(fp8_worker, 1, fp8)
    torch.testing.assert_close(got[0], ref[0], atol=0.15, rtol=0.05)
    assert got[1] == pytest.approx(ref[1], rel=0.02)
    for name, grad in ref[2].items():
        cos = torch.nn.functional.cosine_similarity(got[2][name].flatten().float(),
                                                    grad.flatten().float(), dim=0)
        assert cos > 0.95, (name, float(cos))
