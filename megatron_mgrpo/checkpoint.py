"""Checkpoints through megatron-core's dist_checkpointing: policy, optimizer, momentum model,
LR schedule, RNG, the reference model where it cannot be rebuilt from model.load, and the
trainer's own state (step, data position), in one directory per step.

The policy and the momentum model are saved as sharded tensors keyed like the model, so a
checkpoint loads at another TP/PP/DP layout; the optimizer's state is sharded per parameter
for the same reason. A checkpoint directory is written under a temporary name and renamed when
complete, so a run killed mid-save never leaves a directory that looks finished, and `latest`
only ever names a complete one. Each directory carries a manifest of its files' sizes, so a
truncated or damaged one is recognised before loading; resume then falls back to the newest
checkpoint that loads (`resume_candidates`, `verify_checkpoint`).

A save that fails (a full disk, a read-only file system) removes what it half-wrote, so the
next save and a resume are not blocked by it, and raises `CheckpointError` saying why.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_mgrpo.errors import CheckpointError
from megatron_mgrpo.megatron_compat import apply_megatron_compat, unshare_adam_steps

_LATEST = "latest"
_MANIFEST = "manifest.json"
# Optimizer state in the canonical per-parameter layout, so it loads at another TP/PP/DP.
_OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:07d}")


def latest_step(run_dir: str) -> Optional[int]:
    """The step `latest` names, if it names a complete checkpoint directory; else None."""
    path = os.path.join(run_dir, "checkpoints", _LATEST)
    try:
        with open(path) as f:
            step = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return step if os.path.isdir(step_dir(run_dir, step)) else None


def saved_steps(run_dir: str) -> List[int]:
    """Steps of the complete checkpoint directories in run_dir, newest first."""
    steps = []
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")):
        name = os.path.basename(path)[len("step_"):]
        if name.isdigit() and os.path.isdir(path):
            steps.append(int(name))
    return sorted(steps, reverse=True)


def resume_candidates(run_dir: str) -> List[int]:
    """The checkpoints to try on resume, best first: the one `latest` names, then every other
    complete one, newest first (a damaged `latest` file is then no obstacle)."""
    first = latest_step(run_dir)
    rest = [s for s in saved_steps(run_dir) if s != first]
    return ([first] if first is not None else []) + rest


def verify_checkpoint(path: str) -> Optional[str]:
    """Why the checkpoint at `path` cannot be loaded (a missing or truncated file, unreadable
    metadata), or None when it looks whole. Reads sizes and the small metadata files only."""
    manifest = os.path.join(path, _MANIFEST)
    if os.path.exists(manifest):
        try:
            with open(manifest) as f:
                sizes = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"its {_MANIFEST} is unreadable ({type(e).__name__})"
        for name, size in sizes.items():
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                return f"{name} is missing"
            if os.path.getsize(file) != size:
                return f"{name} has {os.path.getsize(file)} bytes, {size} were written"
    try:
        read_trainer_state(path)
    except Exception as e:  # noqa: BLE001 (any failure to read it means: not loadable)
        return f"its metadata is unreadable ({type(e).__name__}: {_first_line(e)})"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _write_manifest(path: str) -> None:
    sizes = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, path)] = os.path.getsize(full)
    with open(os.path.join(path, _MANIFEST), "w") as f:
        json.dump({"files": sizes}, f, indent=1, sort_keys=True)


def _save_failure(e: BaseException, directory: str) -> str:
    """Why a save failed, in words: the OS error in the chain (disk full, read-only, ...), or
    a nearly full disk behind an error that does not say (torch's zip writer reports a full
    disk as 'unexpected pos')."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                    errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}
            return what.get(seen.errno, os.strerror(seen.errno))
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2 ** 20:
        return f"no space left on device ({free / 2 ** 20:.1f} MiB free)"
    return f"{type(e).__name__}: {_first_line(e)}"


def remove_partial_saves(run_dir: str) -> None:
    """Delete half-written checkpoint directories (a run killed mid-save, a failed save): they
    hold disk space the next save needs and are never loaded."""
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "*.tmp")):
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _sharded_params(chunks) -> Dict[str, Any]:
    """`chunk index/state-dict name` -> (its sharded entry, the parameter it holds), over the
    model chunks, for the entries that hold a parameter: the momentum model is saved and
    loaded through these. (The sharded key alone is not unique: megatron stacks the layers
    under one key, told apart by offset.)"""
    out = {}
    for i, chunk in enumerate(chunks):
        by_ptr = {p.data_ptr(): p for p in chunk.parameters()}
        for name, sh in chunk.sharded_state_dict().items():
            data = getattr(sh, "data", None)
            if isinstance(data, torch.Tensor) and data.data_ptr() in by_ptr:
                out[f"{i}/{name}"] = (sh, by_ptr[data.data_ptr()])
    return out


def _init_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state to load into; megatron fills it with
    placeholders (one zero-grad step) before a load, and so do we."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _reference_entries(reference) -> Dict[str, Any]:
    """The reference model's weights as sharded tensors keyed `reference.<model key>`."""
    return {k: dataclasses.replace(sh, key="reference." + sh.key)
            for k, (sh, _) in _sharded_params(reference.chunks).items()}


def _sharded_state(policy, momentum, is_loading: bool, trainer_state: Dict[str, Any],
                   with_rng: bool = True, with_optimizer: bool = True, reference=None):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # One sharded dict per model chunk; their keys are global (layer offsets applied), so the
    # files are the same with or without a virtual pipeline and load at any layout.
    # The optimizer maps its state onto these same entries, as megatron training passes it.
    chunks = policy.chunks
    state = {"model": [c.sharded_state_dict() for c in chunks], "trainer": trainer_state}
    if with_optimizer:
        state["optimizer"] = policy.optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata=_OPTIM_META)
        state["scheduler"] = policy.scheduler.state_dict()
    if with_rng:
        # Each rank's RNG state, keyed by global rank: restored only at the same world size
        # (sampling seeds derive from the step, so a resharded resume stays deterministic).
        state["rng"] = ShardedObject("rng_state", {"torch": torch.get_rng_state()},
                                     (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)
    if momentum is not None:
        state["momentum"] = momentum.sharded_state_dict(_sharded_params(chunks), is_loading)
    if reference is not None:
        state["reference"] = _reference_entries(reference)
    return state


def save_checkpoint(run_dir: str, step: int, policy, momentum=None,
                    trainer_state: Optional[Dict[str, Any]] = None, reference=None) -> str:
    """Save everything needed to resume after `step`; returns the directory. Collective.
    `reference`: a frozen model saved beside the policy (when nothing else can rebuild it)."""
    from megatron.core import dist_checkpointing

    from megatron_mgrpo.megatron_compat import sync_checkpoint_writes

    sync_checkpoint_writes()
    final = step_dir(run_dir, step)
    tmp = final + ".tmp"
    state = _sharded_state(policy, momentum, is_loading=False,
                           trainer_state=dict(trainer_state or {}, step=step,
                                              world_size=dist.get_world_size(),
                                              momentum=momentum.state() if momentum else {},
                                              has_reference=reference is not None),
                           reference=reference)
    rank0 = dist.get_rank() == 0
    failure = None
    try:
        if rank0:
            remove_partial_saves(run_dir)
            os.makedirs(tmp)
        dist.barrier()
        dist_checkpointing.save(state, tmp)
        dist.barrier()
        if rank0:
            _write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            latest = os.path.join(run_dir, "checkpoints", _LATEST)
            with open(latest + ".tmp", "w") as f:
                f.write(str(step))
            os.replace(latest + ".tmp", latest)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
            if rank0:  # interrupted (a second Ctrl-C): leave nothing half-written behind
                remove_partial_saves(run_dir)
            raise
        failure = f"saving step {step} to {final} failed: {_save_failure(e, os.path.dirname(tmp))}"
    # Every rank learns whether any rank failed, so they stop together.
    if _any_rank(failure is not None):
        if rank0:
            remove_partial_saves(run_dir)
        newest = latest_step(run_dir)
        raise CheckpointError(f"{failure or f'saving step {step} failed on another rank'}; "
                              f"the newest checkpoint is still "
                              f"{f'step {newest}' if newest is not None else 'none'}")
    return final


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item() > 0)


def load_checkpoint(path: str, policy, momentum=None, load_optimizer: bool = True,
                    reference=None) -> Dict[str, Any]:
    """Load a checkpoint directory into the policy (and optimizer, momentum model, schedule,
    RNG, and the reference model where one was saved); returns the trainer state saved with
    it. Collective."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    if load_optimizer:
        apply_megatron_compat()
        _init_optimizer_state(policy.optimizer)
    saved = read_trainer_state(path)
    if not saved.get("has_reference"):
        reference = None
    template = _sharded_state(policy, momentum, is_loading=True, trainer_state={},
                              with_rng=saved.get("world_size") == dist.get_world_size(),
                              with_optimizer=load_optimizer, reference=reference)
    if momentum is None:
        template.pop("momentum", None)
    loaded = dist_checkpointing.load(template, path)
    for chunk, sd in zip(policy.chunks, loaded["model"]):
        chunk.load_state_dict(sd)
    if load_optimizer:
        policy.optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(policy.optimizer)
        policy.scheduler.load_state_dict(loaded["scheduler"])
    else:
        policy.weights_changed()
    if momentum is not None:
        momentum.load_sharded(loaded["momentum"], _sharded_params(policy.chunks))
        momentum.load_state(saved.get("momentum", {}))
    if reference is not None:
        with torch.no_grad():
            for key, (_, param) in _sharded_params(reference.chunks).items():
                param.copy_(loaded["reference"][key])
    rng = loaded.get("rng")
    if isinstance(rng, dict) and "torch" in rng:
        torch.set_rng_state(rng["torch"])
    return loaded["trainer"]


def load_model_weights(policy, path: str) -> None:
    """Only the policy's weights from a dist checkpoint: an HF model converted by
    `tools/convert_hf_to_megatron.py` (or a training checkpoint, whose optimizer state and
    momentum model are left alone), at whatever TP/PP it was written. Collective."""
    from megatron.core import dist_checkpointing

    from megatron_mgrpo.weights.dist_checkpoint import stored_tensors

    params = _sharded_params(policy.chunks)
    stored = stored_tensors(path)
    missing = sorted({sh.key for sh, _ in params.values()} - set(stored))
    if missing:
        raise ValueError(f"{path}: the checkpoint has no tensor {missing[0]!r}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                         "was it written for another architecture?")
    loaded = dist_checkpointing.load({key: sh for key, (sh, _) in params.items()}, path)
    with torch.no_grad():
        for key, (_, param) in params.items():
            param.copy_(loaded[key])
    policy.weights_changed()


def read_trainer_state(path: str) -> Dict[str, Any]:
    """The trainer state of a checkpoint without loading tensors (for tools and logs)."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    return load_common_state_dict(path)["trainer"]



class SaveSchedule:
    """training.save_interval's rule: every `interval` steps (0: never) and at the last step."""

    def __init__(self, interval: int, last_step: int):
        self.interval, self.last_step = interval, last_step

    def due(self, step: int) -> bool:
        return bool(self.interval and step % self.interval == 0) or step == self.last_step
