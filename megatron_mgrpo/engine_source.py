"""Completions from the session's rollout engine (`EngineSource`), now or ahead of time.

Rank 0 generates; every rank gets the same batch (a broadcast). With `rollout.overlap`
(`momentum` | `full`) the engine runs beside the trainer: right after step t's rollout,
`ahead(prompts of t+1, t+1)` starts generating step t+1's momentum completions (or its whole
batch) on a background thread, from the weights the engine holds, i.e. those pushed after step
t-1, while the trainer scores and trains step t; `settle()`, before step t's push, waits for it
(no weights change under a generation). The thread only waits on servers in other processes
(the config check refuses overlap with the in-process engine), so it costs the trainer nothing.

Every set's completions carry the weight version that made them (the SGLang engine refuses any
other); `sample` checks that the made-ahead ones are for its prompts and at most one step older
than a sequential run's (version step - 1), and reports each set's version and staleness.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Dict, List, Optional, Tuple

from megatron_mgrpo.step import RolloutBatch, build_batch, sampling
from megatron_mgrpo.timing import PhaseTimer

MADE_AHEAD = {"none": (), "momentum": ("momentum",), "full": ("policy", "momentum")}
"""The weight sets whose completions each overlap mode generates a step ahead."""


@dataclasses.dataclass
class _Failed:
    """Rank 0's generation failed: what the other ranks raise instead of waiting forever."""

    message: str


@dataclasses.dataclass
class _Ahead:
    """A generation for a later step, running (or done) on a background thread."""

    step: int
    prompt_ids: List[List[int]]
    thread: threading.Thread
    made: Dict[str, Tuple[list, Optional[int]]] = dataclasses.field(default_factory=dict)
    """model -> (completion groups, the weight version that made them)."""
    seconds: Dict[str, float] = dataclasses.field(default_factory=dict)
    error: Optional[BaseException] = None


class EngineSource:
    """The training loop's rollout source (module docstring)."""

    def __init__(self, session):
        self.session = session
        self.timer = PhaseTimer()
        self.overlap = session.cfg.rollout.overlap
        self._ahead: Optional[_Ahead] = None
        self._info: Dict[str, float] = {}

    # ---- the step's batch ---------------------------------------------------------------

    def sample(self, prompt_ids: List[List[int]], step: int) -> RolloutBatch:
        from megatron_mgrpo.rollout.base import RolloutError

        s = self.session
        groups, failure = None, None
        if s.is_main:
            try:
                groups = self._groups(prompt_ids, step)
                s.engine.release_memory()  # colocated servers: the memory is training's now
            except Exception as e:  # noqa: BLE001 (every rank must hear of it, below)
                failure = e
        groups = s.broadcast(groups if failure is None else _Failed(str(failure)))
        if isinstance(groups, _Failed):
            if failure is not None:
                raise failure
            raise RolloutError(groups.message)
        return build_batch(prompt_ids, groups, s.grader.extract, s.tokenizer.decode,
                           s.tokenizer.pad_id, s.cfg.algorithm.grade_truncated)

    def _groups(self, prompt_ids: List[List[int]], step: int) -> list:
        mode = self.session.mode
        wanted = [m for m, n in (("policy", mode.num_policy), ("momentum", mode.num_momentum))
                  if n]
        made = self._take(prompt_ids, step)
        for model, (_, version) in made.items():
            self._note_version(model, version, step)
        rest = self._generate(prompt_ids, step, [m for m in wanted if m not in made])
        for model, (_, version) in rest.items():
            self._note_version(model, version, step)
        made.update(rest)
        groups = made["policy"][0]
        if "momentum" in made:
            groups = [a + b for a, b in zip(groups, made["momentum"][0])]
        return groups

    def _generate(self, prompt_ids, step: int, models: List[str],
                  seconds: Optional[Dict[str, float]] = None):
        """{model: (groups, version)} for `models`, with the step's seeds (the same whether
        made now or ahead). Times go to `seconds`, else to this source's timer."""
        s = self.session
        seed = s.cfg.training.seed * 1_000_003 + step
        seeds = {"policy": seed, "momentum": seed + 500_009}
        made = {}
        # With one group of servers for both sets, the set it holds goes first (no swap).
        for model in s.engine.generation_order(models):
            version = s.engine.weight_version(model)
            n = s.mode.num_policy if model == "policy" else s.mode.num_momentum
            params = sampling(s.cfg, s.tokenizer, seeds[model])
            if seconds is None:
                with self.timer(f"generate_{model}"):
                    groups = s.engine.generate(prompt_ids, n, params, model=model)
            else:
                t0 = time.perf_counter()
                groups = s.engine.generate(prompt_ids, n, params, model=model)
                seconds[f"generate_{model}_time_s"] = time.perf_counter() - t0
            made[model] = (groups, version)
        return made

    def _note_version(self, model: str, version: Optional[int], step: int) -> None:
        """The version behind the step's completions of `model`, and how far behind a
        sequential run's (step - 1) it is; more than one step is a bug, never trained on."""
        if version is None:  # the base weights the servers started from: nothing pushed yet
            return
        stale = (step - 1) - version
        # Sequential runs push the momentum model every momentum_push_interval steps; with
        # overlap (interval 1, checked) nothing may be more than the one step behind.
        bound = 1 if self.overlap != "none" else self.session.cfg.rollout.momentum_push_interval
        if not 0 <= stale <= bound:
            raise RuntimeError(f"step {step}: {model} completions from weight version "
                               f"{version}; accepted: {step - 1 - bound} ... {step - 1}")
        self._info[f"{model}_version"] = float(version)
        self._info[f"{model}_staleness"] = float(stale)

    # ---- ahead of time ------------------------------------------------------------------

    def ahead(self, prompt_ids: List[List[int]], step: int) -> None:
        """Start generating step `step`'s completions of the overlap mode's sets (rank 0)."""
        models = [m for m in MADE_AHEAD[self.overlap]
                  if (self.session.mode.num_policy if m == "policy"
                      else self.session.mode.num_momentum)]
        if not models or not self.session.is_main:
            return
        job = _Ahead(step, [list(p) for p in prompt_ids], thread=None)  # type: ignore[arg-type]

        def run():
            try:
                job.made = self._generate(job.prompt_ids, step, models, job.seconds)
            except BaseException as e:  # noqa: BLE001 (raised by the step that takes it)
                job.error = e

        job.thread = threading.Thread(target=run, name=f"rollout-ahead-{step}", daemon=True)
        self._ahead = job
        job.thread.start()

    def settle(self) -> float:
        """Wait for the generation ahead (before weights change); its engine seconds."""
        job = self._ahead
        if job is None:
            return 0.0
        job.thread.join()
        return sum(job.seconds.values())

    def _take(self, prompt_ids, step: int) -> Dict[str, Tuple[list, Optional[int]]]:
        """What was made ahead for this step (its times into the timer); {} if nothing was,
        or it was for other prompts (the sampler was rewound after a failed step)."""
        self.settle()  # a no-op after the step's own settle(); not after a failed step
        job, self._ahead = self._ahead, None
        if job is None:
            return {}
        if job.step != step or job.prompt_ids != [list(p) for p in prompt_ids]:
            return {}
        if job.error is not None:
            raise job.error
        for key, value in job.seconds.items():
            self._info[key] = self._info.get(key, 0.0) + value
        self._info["made_ahead_sets"] = float(len(job.made))
        return job.made

    def pop_metrics(self) -> Dict[str, float]:
        """The last step's generation seconds per set, versions and staleness."""
        out = self.timer.pop()
        for key, value in self._info.items():
            out[key] = out.get(key, 0.0) + value if key.endswith("_time_s") else value
        self._info = {}
        return out
