"""benchmarks/train_throughput.py: its FLOPs formula against a hand count, and a short run of
the tiny shape that prints clean JSON figures (FP8 a clean skip on a machine without it)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_mgrpo.config.schema import ModelConfig
from tests import DEADLOCK_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_throughput.py")


def _module():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_flops_per_token_matches_a_hand_count():
    # head_dim 32 x 4 heads = 128 != hidden 96, so the attention width is not the hidden size.
    m = ModelConfig(vocab_size=1000, hidden_size=96, intermediate_size=200, num_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    tie_word_embeddings=True, attention_bias=True)
    # Per layer: Q 96x128, K and V 96x64 each, O 128x96, SwiGLU 3 x 96x200.
    per_layer = 96 * 128 + 2 * 96 * 64 + 128 * 96 + 3 * 96 * 200
    assert per_layer == 94464
    n = 3 * per_layer + 1000 * 96  # + the LM head (a matmul even when tied); no embedding
    attention = 12 * 3 * 128 * 50  # QK^T and AV, fwd + bwd, full 50 x 50, per token
    assert 6 * n + attention == 2506752
    assert _module().model_flops_per_token(m, 50) == 2506752


def test_datasheet_peaks_pick_the_specific_name_first():
    peak = _module().datasheet_peak
    assert peak("NVIDIA H100 80GB HBM3") == (989.0, 1979.0)
    assert peak("NVIDIA H100 PCIe") == (756.0, 1513.0)
    assert peak("NVIDIA H200") == (989.0, 1979.0)
    assert peak("Some Other GPU") is None


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_tokens(monkeypatch):
    mod = _module()
    tried = []

    def fake(cfg, ctx, seq_len, micro_batches, steps, warmup):
        tried.append((cfg.parallel.micro_batch_size, micro_batches))
        if cfg.parallel.micro_batch_size > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"tokens_per_s": 1.0}

    monkeypatch.setattr(mod, "time_train_steps", fake)
    cfg = mod.make_config(mod.SHAPES["tiny"]["model"], 4)
    assert mod.run_variant(cfg, None, 64, 1, 1, 0) == {"tokens_per_s": 1.0, "micro_batch": 1,
                                                        "micro_batches": 4}
    assert tried == [(4, 1), (2, 2), (1, 4)]


def test_tiny_run_prints_clean_json_figures():
    run = subprocess.run([sys.executable, SCRIPT, "--shape", "tiny", "--steps", "2", "--warmup",
                          "1", "--seq-len", "64"], capture_output=True, text=True, timeout=DEADLOCK_GUARD_S,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    fig = {d["name"].removeprefix("train_throughput."): d for d in lines}
    assert all({"name", "value", "unit"} <= set(d) for d in lines)
    # A CPU without native bf16 times fp32 instead (bf16 would time torch's emulation).
    mod = _module()
    dtype = "bf16" if torch.cuda.is_available() or mod.cpu_has_bf16() else "fp32"
    assert fig["gemm_tflops_measured"]["dtype"] == dtype
    if dtype == "fp32":
        assert fig["bf16_tokens_per_s"]["value"] is None
        assert "no native bf16" in fig["bf16_tokens_per_s"]["skipped"]
    units = {"parameters": "parameters", "model_flops_per_token": "FLOP/token",
             "gemm_tflops_measured": "TFLOP/s", f"{dtype}_tokens_per_s": "tokens/s",
             f"{dtype}_model_tflops": "TFLOP/s", "fp8_tokens_per_s": "tokens/s"}
    for name, unit in units.items():
        assert fig[name]["unit"] == unit, name
    assert lines[0]["name"] == "train_throughput.parameters"
    assert lines[0]["shape"] == "tiny" and lines[0]["seq_len"] == 64

    flops = mod.model_flops_per_token(mod.SHAPES["tiny"]["model"], 64)
    assert fig["model_flops_per_token"]["value"] == flops
    tps = fig[f"{dtype}_tokens_per_s"]["value"]
    assert tps > 0
    assert fig[f"{dtype}_tokens_per_s"]["tokens_per_step"] == 4 * 64
    assert fig[f"{dtype}_model_tflops"]["value"] == pytest.approx(tps * flops / 1e12,
                                                                  rel=1e-3, abs=1e-4)
    if torch.cuda.is_available():
        assert 0 < fig["bf16_mfu"]["value"] < 1
        return
    gemm = fig["gemm_tflops_measured"]["value"]
    assert gemm > 0
    assert fig[f"{dtype}_mfu_vs_measured_gemm"]["value"] == pytest.approx(
        fig[f"{dtype}_model_tflops"]["value"] / gemm, rel=1e-2, abs=1e-4)
    fp8 = fig["fp8_tokens_per_s"]
    assert fp8["value"] is None
    assert fp8["skipped"].startswith("model.fp8: got 'hybrid'; accepted here: null")
    assert "fp8_speedup" not in fig and "fp8_mfu" not in fig
