"""`model.load`: initialise the policy from an HF directory or from a converted one."""

from __future__ import annotations

import os


def load_pretrained(policy, path: str) -> None:
    """An HF model directory (safetensors) is read and sharded tensor by tensor; the output of
    `tools/convert_hf_to_megatron.py` (config.json + dist_checkpoint/) is loaded through
    dist_checkpointing at whatever TP/PP this run uses. Collective."""
    from megatron_mgrpo.checkpoint import load_model_weights
    from megatron_mgrpo.weights.convert import DIST_SUBDIR
    from megatron_mgrpo.weights.hf_io import load_hf_into_policy

    dist_dir = os.path.join(path, DIST_SUBDIR)
    if os.path.isfile(os.path.join(dist_dir, "metadata.json")):
        load_model_weights(policy, dist_dir)
    else:
        load_hf_into_policy(policy, path)
