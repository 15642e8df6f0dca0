"""Fixes for megatron-core 0.16.1 defects that this project hits, each narrow and idempotent.

- Loading a 'fully_reshardable' distributed-optimizer checkpoint into torch's Adam (the
  optimizer used without apex / Transformer Engine) fails with KeyError 'step': megatron
  restores Adam's step from the param groups, skips it when collecting the loaded tensors, then
  copies every key of the live Adam state, 'step' included. We hand it the step it already
  restored, so that copy is a no-op.
- The same load gives every parameter's Adam state one shared `step` tensor; torch's foreach
  Adam then increments it once per parameter in a single update (step 2 -> 21 for 19
  parameters), corrupting the bias correction. `unshare_adam_steps` gives each its own copy.
- Every checkpoint save starts a `multiprocessing.Manager` server that outlives the trainer
  (`sync_checkpoint_writes`).
"""

from __future__ import annotations

import torch

_APPLIED = False


def apply_megatron_compat() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states_keeping_step(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group, order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group]["params"][order]
            step = self.optimizer.state.get(main_param, {}).get("step")
            if step is not None:
                tensors = dict(tensors, step=step.clone())
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_keeping_step
    _APPLIED = True


def unshare_adam_steps(optimizer) -> None:
    """After loading optimizer state: one `step` tensor per parameter (see module docstring)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.clone()


def sync_checkpoint_writes() -> None:
    """megatron's checkpoint writer hands its results through a queue kept by a
    `multiprocessing.Manager`: a spawned server process (about 280 MB) that lives until
    interpreter exit and outlives a killed trainer, keeping its resource tracker alive too.
    Our saves are synchronous (the writer runs in this process), so a plain in-process queue
    carries the results and no such process is started."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
