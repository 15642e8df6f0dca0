"""The rollout and SGLang sections: how completions are sampled, and from which servers.

Each section checks its own fields (`validate()`); the SGLang section's rules are about its own
fields only, so they need nothing from `megatron_mgrpo.rollout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal

from megatron_mgrpo.config.checks import ConfigError, fail, one_of, positive

__all__ = ["RolloutConfig", "SGLangConfig"]


@dataclass
class RolloutConfig:
    """Sampling of completions from the policy and the momentum model."""

    backend: Literal["embedded", "sglang"] = "embedded"
    """`embedded`: in-process engine (CPU, tests). `sglang`: SGLang servers."""

    num_policy_rollouts: int = 4
    """M: completions per prompt from the policy."""

    num_momentum_rollouts: int = 4
    """N: completions per prompt from the momentum model (0 for SRT)."""

    temperature: float = 1.0
    """Sampling temperature (> 0)."""

    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""

    max_new_tokens: int = 64
    """Longest completion, in tokens."""

    weight_bucket_mb: int = 512
    """Size bound of one weight-push bucket, in MiB (the push streams bucket by bucket)."""

    weight_format: Literal["native", "bf16", "fp8"] = "native"
    """Weights as the engine receives them: `native` (the training parameters' dtype: bf16
    with model.params_dtype bf16), `bf16`, or `fp8` (the layers' linear weights in E4M3 with
    scales, the rest bf16: SGLang's `quant_method: fp8` checkpoint format; launched servers
    start from an FP8 copy of model.load, attached ones must serve an FP8 checkpoint)."""

    fp8_block_size: int = 128
    """FP8 scaling granularity: one scale per N x N tile (`weight_scale_inv`), or 0 for one
    per tensor (`weight_scale`)."""

    momentum_push_interval: int = 1
    """Push momentum weights to the engine every this many steps (it moves slowly)."""

    overlap: Literal["none", "momentum", "full"] = "none"
    """Generation beside training (`step.EngineSource`): `none`, each step generates then
    trains; `momentum`, the next step's momentum completions are generated while this step
    trains, from the momentum weights pushed after the previous step (one step stale);
    `full`, the whole next batch is, the policy's completions from the policy pushed after
    the previous step too (one step off-policy: needs algorithm.tis_cap). Needs servers in
    their own processes (rollout.backend sglang, `mgrpo serve` included)."""

    def validate(self) -> None:
        """Check this section; ConfigError naming the field. (How many rollouts a mode needs
        is the algorithm section's check.)"""
        one_of("rollout.backend", self.backend, ("embedded", "sglang"))
        if self.num_policy_rollouts < 1:
            fail("rollout.num_policy_rollouts", self.num_policy_rollouts, "an integer >= 1")
        if self.num_momentum_rollouts < 0:
            fail("rollout.num_momentum_rollouts", self.num_momentum_rollouts, "an integer >= 0")
        if not self.temperature > 0:
            fail("rollout.temperature", self.temperature, "a number > 0")
        if not 0 < self.top_p <= 1:
            fail("rollout.top_p", self.top_p, "a number in (0, 1]")
        positive("rollout.max_new_tokens", self.max_new_tokens)
        positive("rollout.momentum_push_interval", self.momentum_push_interval)
        one_of("rollout.overlap", self.overlap, ("none", "momentum", "full"))
        positive("rollout.weight_bucket_mb", self.weight_bucket_mb)
        one_of("rollout.weight_format", self.weight_format, ("native", "bf16", "fp8"))
        if self.fp8_block_size < 0:
            fail("rollout.fp8_block_size", self.fp8_block_size,
                 "an integer >= 0 (0: one scale per tensor)")


@dataclass
class SGLangConfig:
    """The SGLang rollout backend (rollout.backend: sglang): servers, placement, transport."""

    urls: List[str] = field(default_factory=list)
    """Running servers to attach to: all of them in the swap placement, the policy's group in
    the separate placement. Empty: launch `launch` servers per group instead."""

    momentum_urls: List[str] = field(default_factory=list)
    """Separate placement, attached: the momentum model's servers."""

    launch: int = 0
    """Servers to start per group (0: attach to `urls`). Each runs `launch_command`."""

    launch_command: str = ("{python} -m sglang.launch_server --model-path {model} "
                           "--host {host} --port {port} --skip-tokenizer-init")
    """Command of one server, with {python}, {model}, {host} and {port} filled in. On CPU:
    `{python} -m megatron_mgrpo.cli serve --model {model} --host {host} --port {port}`."""

    host: str = "127.0.0.1"
    """Address launched servers listen on."""

    base_port: int = 0
    """First port of launched servers (consecutive after it); 0: any free ports."""

    num_servers: int = 0
    """Servers per group a launcher starts and passes as `urls` (slurm: ROLLOUT_NODES x
    SERVERS_PER_NODE), for `mgrpo plan` before the urls exist. 0: len(urls), or launch, else 1.
    The run itself uses the servers in urls (or launches `launch`)."""

    server_tp: int = 1
    """GPUs per server (SGLang's --tp; slurm: SGLANG_TP), for `mgrpo plan`'s rollout memory.
    Launched servers get it only through `launch_command` (add `--tp N` there)."""

    placement: Literal["swap", "separate"] = "swap"
    """`swap`: one group of servers loads the momentum and the policy weights in turn.
    `separate`: a group per weight set (twice the servers, no swaps)."""

    release_memory: bool = False
    """Swap placement with the servers on the training GPUs: after each step's rollouts the
    servers release their weights and KV cache (`/release_memory_occupation`), so training
    gets the memory back; the next weight push resumes them first."""

    transport: Literal["tensor", "distributed", "disk"] = "disk"
    """How weights reach the servers: `tensor` (colocated: CUDA IPC / shared memory),
    `distributed` (an NCCL broadcast group with the servers), `disk` (safetensors files in
    `disk_dir`, which the servers must see)."""

    disk_dir: str = ""
    """Directory of the disk transport's files (empty: <training.run_dir>/pushed_weights)."""

    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Backend of the distributed transport's group: auto is nccl with a GPU, gloo without."""

    dist_master_address: str = "127.0.0.1"
    """Address of this process as the servers reach it (the distributed transport's rank 0)."""

    host_copy: bool = True
    """Keep each set's last update in host memory so that a restarted server gets it at once
    (always on in the swap placement, which needs it; costs the model's size per set)."""

    request_timeout_s: float = 600.0
    """A server that does not answer a request within this is taken as dead or hung."""

    launch_timeout_s: float = 900.0
    """Longest wait for a launched server to answer /health."""

    max_retries: int = 2
    """Times one request (or one weight push) is retried on another or a restarted server."""

    max_prompts_per_request: int = 64
    """Completions per /generate request (smaller: finer load balance and cheaper retries)."""

    def validate(self) -> None:
        """Check this section (only used with rollout.backend sglang); ConfigError naming the
        field."""
        g = self
        one_of("sglang.placement", g.placement, ("swap", "separate"))
        one_of("sglang.transport", g.transport, ("tensor", "distributed", "disk"))
        one_of("sglang.dist_backend", g.dist_backend, ("auto", "nccl", "gloo"))
        if g.num_servers < 0:
            fail("sglang.num_servers", g.num_servers, "an integer >= 0 (0: as many as urls)")
        positive("sglang.server_tp", g.server_tp)
        if g.launch < 0:
            fail("sglang.launch", g.launch, "an integer >= 0")
        if g.launch == 0 and not g.urls:
            raise ConfigError("sglang.urls: got []; accepted: the servers to attach to, or "
                              "sglang.launch >= 1 to start them")
        if g.launch and (g.urls or g.momentum_urls):
            raise ConfigError("sglang.launch and sglang.urls: give one or the other (launch "
                              "servers, or attach to running ones)")
        if g.placement == "separate" and g.launch == 0 and not g.momentum_urls:
            fail("sglang.momentum_urls", g.momentum_urls,
                 "the momentum model's servers (placement separate, attached)")
        if g.release_memory and g.placement != "swap":
            fail("sglang.release_memory", g.release_memory,
                 "false in placement separate (each group keeps its weights loaded)")
        if g.placement == "swap" and g.momentum_urls:
            fail("sglang.momentum_urls", g.momentum_urls, "[] in placement swap (one group)")
        for name in ("urls", "momentum_urls"):
            for url in getattr(g, name):
                if not url.startswith(("http://", "https://")):
                    fail(f"sglang.{name}", url, "http://host:port URLs")
        if "{port}" not in g.launch_command and g.launch:
            fail("sglang.launch_command", g.launch_command, "a command with {port} in it")
        for name in ("request_timeout_s", "launch_timeout_s"):
            if not getattr(g, name) > 0:
                fail(f"sglang.{name}", getattr(g, name), "a number > 0")
        if g.max_retries < 0:
            fail("sglang.max_retries", g.max_retries, "an integer >= 0")
        positive("sglang.max_prompts_per_request", g.max_prompts_per_request)
        if not 0 <= g.base_port < 65536:
            fail("sglang.base_port", g.base_port, "0 (free ports) or a port number")
