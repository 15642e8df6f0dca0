"""Run a function in N real processes over gloo (megatron-core's process groups, no mocks).

Each worker gets torchrun's environment variables, runs `fn(*args)` and returns its result
through a file; a worker that raises fails the test with its traceback.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
import warnings

import torch
import torch.multiprocessing as mp

from megatron_mgrpo.parallel import free_port
from tests import DEADLOCK_GUARD_S


def _entry(fn, rank, world_size, port, out_dir, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)
    finally:
        from megatron_mgrpo.parallel import destroy_parallel

        destroy_parallel()


def run_workers(fn, world_size: int, *args, timeout_s: float = DEADLOCK_GUARD_S) -> list:
    """Run fn(*args) on `world_size` spawned ranks; return their results in rank order.
    `timeout_s` only catches a deadlock (all ranks together), not a slow machine."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, out_dir, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = []
        for r in range(world_size):
            err = os.path.join(out_dir, f"{r}.err")
            if os.path.exists(err):
                errors.append(f"--- rank {r} ---\n" + open(err).read())
        if hung or errors:
            raise AssertionError(f"workers failed (hung ranks: {hung})\n" + "\n".join(errors))
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)
                for r in range(world_size)]


def in_turn(fn, calls):
    """fn(*args) for each args of `calls`, one after another in the same process(es):
    run_workers(in_turn, n, fn, calls) pays n process start-ups for several runs (each run
    initialises the layout it needs; the results come back as one list per rank)."""
    return [fn(*args) for args in calls]
