"""Process groups: torch.distributed plus megatron-core's TP x PP x DP layout.

`init_parallel` is the one place that touches megatron's global `parallel_state`; everything
downstream takes the returned `ParallelContext` (and its groups) as an argument.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mgrpo.config.schema import ConfigError, ParallelConfig
from megatron_mgrpo.platform import apply_cpu_platform, cuda_available


@dataclass
class ParallelContext:
    """This rank's place in the layout and the groups it talks over."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    vp_size: int
    """Model chunks per pipeline stage (1 without a virtual pipeline)."""
    dp_rank: int
    dp_size: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    pg_collection: object  # megatron.core.process_groups_config.ProcessGroupCollection
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` (default loopback) that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_parallel(parallel: ParallelConfig, seed: int = 1234,
                  timeout_minutes: int = 30) -> ParallelContext:
    """Initialise torch.distributed (from torchrun's env, or a single local process) and
    megatron's model-parallel groups. Idempotent for the same layout."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel.context_parallel != 1:
        raise ConfigError(
            f"parallel.context_parallel: got {parallel.context_parallel}; accepted here: 1 "
            "(context parallelism is counted by `mgrpo plan` but not wired into training: it "
            "needs Transformer Engine's ring attention and a CP-aware log-prob gather)")
    apply_cpu_platform()
    has_gpu = cuda_available()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if has_gpu else "gloo")
    if backend == "nccl" and not has_gpu:
        raise ConfigError("parallel.backend: got 'nccl' but no CUDA device is present; "
                          "accepted here: auto | gloo")

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python` run: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if has_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend,
                                timeout=datetime.timedelta(minutes=timeout_minutes))

    world = dist.get_world_size()
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    vp = parallel.virtual_pipeline if pp > 1 else 1
    if world % (tp * pp):
        raise ConfigError(
            f"parallel.tensor_parallel * parallel.pipeline_parallel: got {tp * pp}; accepted: "
            f"a divisor of the world size {world}")

    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() != tp
                or parallel_state.get_pipeline_model_parallel_world_size() != pp
                or (parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1) != vp):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
            create_gloo_process_groups=not has_gpu or backend == "gloo",
            distributed_timeout_minutes=timeout_minutes)
    model_parallel_cuda_manual_seed(seed)

    return ParallelContext(
        rank=dist.get_rank(), world_size=world,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(), pp_size=pp, vp_size=vp,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        device=torch.device("cuda", torch.cuda.current_device()) if has_gpu
        else torch.device("cpu"),
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups and torch.distributed (tests, and clean exits)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
