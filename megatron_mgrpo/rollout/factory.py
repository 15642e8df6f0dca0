"""The rollout engine of a config: the embedded engine, or SGLang servers (launched or attached).

The one place that picks the engine: training and evaluation (of a checkpoint or of an HF
directory) all build theirs here.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from megatron_mgrpo.rollout.base import RolloutEngine


def make_engine(cfg, model_dir: Optional[str], hf_config: dict,
                sets: Sequence[str] = ("policy", "momentum"), weights_from_dir: bool = False,
                log: Callable[[str], None] = print) -> RolloutEngine:
    """The engine `cfg.rollout.backend` names, serving a model of `hf_config`.

    model_dir: the HF directory launched servers start from (model.load); attached servers are
    assumed to serve it. weights_from_dir: the embedded engine loads model_dir's weights (else
    it starts from a random init and waits for the first push). sets: the weight sets the
    embedded engine holds."""
    r = cfg.rollout
    if r.backend == "sglang":
        from megatron_mgrpo.rollout.sglang_engine import make_sglang_engine

        if r.weight_format == "fp8" and cfg.sglang.launch:
            model_dir = fp8_base(model_dir, r.fp8_block_size, cfg.training.run_dir, log)
        if not cfg.sglang.launch and weights_from_dir:
            log(f"rollout: attached SGLang servers are assumed to serve {model_dir}")
        return make_sglang_engine(cfg.sglang, model_dir, r.weight_bucket_mb * 2 ** 20,
                                  cfg.training.run_dir, hf_config, log=log)
    from megatron_mgrpo.rollout.embedded import EmbeddedEngine

    if weights_from_dir:
        return EmbeddedEngine.from_pretrained(model_dir, sets=tuple(sets))
    return EmbeddedEngine(hf_config, sets=tuple(sets))


def fp8_base(model_dir: Optional[str], block_size: int, run_dir: str,
             log: Callable[[str], None]) -> str:
    """The FP8 copy of model_dir that launched servers start from (made once per run): SGLang
    only takes FP8 weight updates into a model it loaded as FP8."""
    from megatron_mgrpo.config import ConfigError
    from megatron_mgrpo.weights.fp8 import quantize_hf_dir

    if not model_dir or not os.path.isdir(model_dir):
        raise ConfigError("rollout.weight_format fp8 with sglang.launch: the servers start "
                          f"from an FP8 copy of model.load, an HF directory; got {model_dir!r}")
    out = os.path.join(run_dir, f"rollout_base_fp8_b{block_size}")
    if not os.path.isdir(out):
        log(f"rollout: writing the FP8 copy of {model_dir} that servers start from -> {out}")
        quantize_hf_dir(model_dir, out, block_size, log=log)
    return out
