"""Let megatron-core run on a machine without a GPU.

megatron-core hard-codes CUDA in places that have nothing to do with the maths: device arguments
in RoPE, the pipeline schedules, DDP's grad buffers and P2P; `Tensor.type()` checks in the
optimizer and grad clipping; `torch.cuda` RNG and stream calls. On a machine with no CUDA device
`apply_cpu_platform()` routes all of those to the CPU, so the same training code runs on a
laptop, in CI and on a cluster. It does nothing when a CUDA device is present.

Call it once per process (in every spawned worker too) before building megatron modules.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_LOCK = threading.Lock()
_CPU = torch.device("cpu")


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def is_cpu_platform() -> bool:
    """True when this process runs megatron-core through the CPU shim."""
    return _APPLIED


def _route(device):
    """Map any CUDA device spelling (str, torch.device, int index) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str):
        return _CPU if device.startswith("cuda") else device
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _tensor_type_cuda(t: torch.Tensor) -> str:
    # The optimizer and clip_grads assert on 'torch.cuda.FloatTensor'-style names.
    name = torch.Tensor.type(t)
    return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites device arguments and `.cuda()` calls at the torch-function boundary."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _route(kwargs["device"])
        if func is torch.Tensor.cuda:
            kwargs.pop("device", None)
            kwargs.pop("non_blocking", None)
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _tensor_type_cuda(args[0])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0],) + tuple(_route(a) if isinstance(a, (str, int, torch.device)) and not isinstance(a, bool) else a for a in args[1:])
        return func(*args, **kwargs)


class _NoopStream:
    """Stands in for torch.cuda.Stream / Event: on CPU everything is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoopStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _stub_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    # torch.manual_seed calls manual_seed_all; on CPU there is no other generator to seed.
    cuda.manual_seed_all = lambda seed: None
    cuda.Stream = _NoopStream
    cuda.Event = _NoopStream
    cuda.current_stream = lambda *a, **k: _NoopStream()
    cuda.default_stream = lambda *a, **k: _NoopStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    if hasattr(cuda, "random"):
        cuda.random.get_rng_state = cuda.get_rng_state
        cuda.random.set_rng_state = cuda.set_rng_state


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_megatron_masks() -> None:
    # Activation recompute replays the forward inside autograd's backward, where the device
    # mode is not on the stack: the causal mask must be built on the CPU by itself.
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache(maxsize=None)
    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    utils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask


def apply_cpu_platform(force: bool = False) -> bool:
    """Install the CPU shim when no CUDA device is present (or when `force`).

    Returns True when the shim is active. Idempotent and thread-safe.
    """
    global _APPLIED
    with _LOCK:
        if _APPLIED:
            return True
        if cuda_available() and not force:
            return False
        _stub_torch_cuda()
        _patch_megatron_rng()
        _patch_megatron_masks()
        mode = _CudaToCpuMode()
        mode.__enter__()  # stays on the mode stack for the life of the process
        _APPLIED = True
        return True


@contextlib.contextmanager
def without_device_rewrites():
    """Plain CPU torch code (the embedded engine's transformers model) without the shim's
    mode on this thread's stack: the mode's Python dispatch of every torch call costs more
    than the call itself on a small model (a 626K-parameter decode, 0.24 s -> 0.35 s)."""
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if not isinstance(_get_current_function_mode(), _CudaToCpuMode):
        yield
        return
    with _pop_mode_temporarily():
        yield
