"""metrics.jsonl / TensorBoard / plots, and lazy HF safetensors reading."""

import json
import os

import pytest
import torch

from megatron_mgrpo.config.schema import ConfigError
from megatron_mgrpo.metrics import MetricsLogger, plot_metrics, read_metrics
from megatron_mgrpo.weights.hf_io import HFCheckpoint


def test_logger_writes_jsonl_and_resume_drops_redone_steps(tmp_path):
    run = str(tmp_path)
    log = MetricsLogger(run, total_steps=4, progress_bar=False)
    for s in range(1, 5):
        log.log({"step": s, "reward_mean": s / 10, "entropy_mean": 1.0, "entropy_q1": 0.5,
                 "entropy_q3": 1.5, "val_accuracy": float("nan")})
    log.close()
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["val_accuracy"] is None  # NaN is not valid JSON: written as null
    assert os.listdir(os.path.join(run, "tensorboard"))
    # A run resumed from the step-2 checkpoint redoes steps 3 and 4.
    log = MetricsLogger(run, total_steps=4, start_step=2, progress_bar=False, tensorboard=False)
    log.log({"step": 3, "reward_mean": 0.9})
    log.close()
    assert [(r["step"], r["reward_mean"]) for r in read_metrics(run)] == [(1, 0.1), (2, 0.2),
                                                                         (3, 0.9)]
    written = plot_metrics(run)
    assert {os.path.basename(p) for p in written} == {"reward.png", "entropy.png"}
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in written)


def test_hf_checkpoint_reads_single_and_sharded(tmp_path):
    from safetensors.torch import save_file

    a, b = torch.randn(3, 4), torch.randn(5)
    single = tmp_path / "single"
    single.mkdir()
    save_file({"a": a, "b": b}, str(single / "model.safetensors"))
    ck = HFCheckpoint(str(single))
    assert sorted(ck) == ["a", "b"] and torch.equal(ck["a"], a)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": a}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(sharded / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    ck = HFCheckpoint(str(sharded))
    assert len(ck) == 2 and torch.equal(ck["b"], b)

    os.remove(sharded / "model-00002-of-00002.safetensors")
    with pytest.raises(ConfigError, match="model-00002-of-00002.safetensors.*missing"):
        HFCheckpoint(str(sharded))
    with pytest.raises(ConfigError, match="no model.safetensors"):
        HFCheckpoint(str(tmp_path))
