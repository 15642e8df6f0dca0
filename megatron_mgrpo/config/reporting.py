"""The eval, logging and diagnostics sections: what a run measures and reports.

The benchmark names and the date-window syntax are the evaluation component's; the eval section
reads them from `evaluation.catalog`, a leaf module (nothing else from this package).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_mgrpo.config.checks import fail, one_of, positive
from megatron_mgrpo.evaluation.catalog import BENCHMARK_NAMES, parse_date_range

__all__ = ["EvalConfig", "LoggingConfig", "DiagnosticsConfig"]


@dataclass
class EvalConfig:
    """Benchmark evaluation: `mgrpo eval`, and during training every `interval` steps."""

    benchmarks: List[str] = field(default_factory=list)
    """Benchmarks to run, any of math500 | aime24 | aime25 | gpqa | gpqa_diamond |
    livecodebench (README "Evaluation" says where each file comes from)."""

    data_dir: str = "data/eval"
    """Where benchmark files are looked up: `<data_dir>/<name>.jsonl` (or .parquet, .json, .csv),
    or a directory `<data_dir>/<name>/` whose data files are read together. Nothing is
    downloaded."""

    paths: Dict[str, str] = field(default_factory=dict)
    """Per-benchmark file or directory, overriding data_dir (e.g. {gpqa_diamond:
    /data/gpqa/gpqa_diamond.csv})."""

    samples: int = 8
    """Completions per problem (k): pass@1 is their mean, maj@k their vote."""

    samples_by_benchmark: Dict[str, int] = field(default_factory=dict)
    """Per-benchmark sample counts overriding `samples` (e.g. {aime24: 32}: few problems need
    more samples for a stable mean)."""

    pass_k: List[int] = field(default_factory=list)
    """Extra k of the unbiased pass@k estimator (each at most a benchmark's sample count;
    larger ones are left out of that benchmark)."""

    temperature: float = 0.6
    """Sampling temperature (0: greedy)."""

    top_p: float = 0.95
    """Nucleus sampling threshold."""

    max_new_tokens: int = 2048
    """Most tokens per completion; the share that hit it is reported as `truncated`."""

    max_prompt_length: int = 0
    """Problems whose prompt is longer (tokens) are skipped and counted in the report (0: the
    model's context minus max_new_tokens)."""

    max_problems: int = 0
    """Evaluate on at most this many problems per benchmark, in file order (0: all)."""

    interval: int = 0
    """During training: run the benchmarks every this many steps and at the last step (0:
    never)."""

    seed: int = 0
    """Seed of the sampling streams and of GPQA's option order."""

    chat_template: bool = False
    """Wrap each prompt as one user message in the tokenizer's chat template (instruct models)."""

    templates: Dict[str, str] = field(default_factory=dict)
    """Per-benchmark prompt templates replacing the defaults (str.format fields: {problem} for
    math benchmarks; {question} {A} {B} {C} {D} for GPQA; {question} {format} for
    LiveCodeBench)."""

    livecodebench_dates: Optional[str] = None
    """Keep LiveCodeBench problems whose contest_date lies in `START:END` (ISO dates, either may
    be empty), e.g. "2024-08-01:2025-02-01"; None keeps all."""

    code_timeout_s: float = 6.0
    """Seconds each LiveCodeBench test may run in the sandbox."""

    code_workers: int = 2
    """Sandboxed programs graded at once."""

    prompts_per_call: int = 64
    """Problems sent to the rollout engine per call (progress is reported after each)."""

    output_dir: Optional[str] = None
    """Where results go (None: `<training.run_dir>/eval`): `step_<N>.json` or `<model>.json`,
    and `*.completions.jsonl` with save_completions."""

    save_completions: bool = False
    """Also write every completion's text, answer and grade (jsonl) beside the results."""

    def validate(self) -> None:
        """Check this section; ConfigError naming the field."""
        e = self
        for name in e.benchmarks:
            one_of("eval.benchmarks", name, BENCHMARK_NAMES)
        if len(set(e.benchmarks)) != len(e.benchmarks):
            fail("eval.benchmarks", e.benchmarks, "each benchmark once")
        for section in ("paths", "samples_by_benchmark", "templates"):
            for name in getattr(e, section):
                if name not in BENCHMARK_NAMES:
                    fail(f"eval.{section}", name, f"keys among {' | '.join(BENCHMARK_NAMES)}")
        positive("eval.samples", e.samples)
        for name, n in e.samples_by_benchmark.items():
            positive(f"eval.samples_by_benchmark.{name}", n)
        for k in e.pass_k:
            positive("eval.pass_k", k)
        if e.temperature < 0:
            fail("eval.temperature", e.temperature, "a number >= 0 (0 = greedy)")
        if not 0 < e.top_p <= 1:
            fail("eval.top_p", e.top_p, "a number in (0, 1]")
        positive("eval.max_new_tokens", e.max_new_tokens)
        for name in ("max_prompt_length", "max_problems", "interval"):
            if getattr(e, name) < 0:
                fail(f"eval.{name}", getattr(e, name), "an integer >= 0")
        if not e.code_timeout_s > 0:
            fail("eval.code_timeout_s", e.code_timeout_s, "a number > 0")
        positive("eval.code_workers", e.code_workers)
        positive("eval.prompts_per_call", e.prompts_per_call)
        if e.livecodebench_dates is not None:
            try:
                parse_date_range(e.livecodebench_dates)
            except ValueError:
                fail("eval.livecodebench_dates", e.livecodebench_dates,
                     "START:END with ISO dates (YYYY-MM-DD), either may be empty")


@dataclass
class LoggingConfig:
    """What the run reports."""

    log_interval: int = 1
    """Print a line every this many steps."""

    tensorboard: bool = True
    """Write TensorBoard events beside metrics.jsonl."""

    progress_bar: bool = True
    """Show a progress bar on rank 0."""

    def validate(self) -> None:
        """Check this section; ConfigError naming the field."""
        positive("logging.log_interval", self.log_interval)  # the loops take step % it


@dataclass
class DiagnosticsConfig:
    """Collapse alarms and the collapse step (`collapse.CollapseWatch`). The per-step figures
    they read are always logged; each alarm is off (null) until given a threshold."""

    min_pseudo_label_accuracy: Optional[float] = None
    """Alarm when `pseudo_label_acc` (only where data.answer_key gives the answers) is below
    this, in [0, 1]."""

    min_entropy: Optional[float] = None
    """Alarm when `entropy_mean` (the trained trajectories' mean token entropy, nats) is below
    this."""

    min_distinct_answers: Optional[float] = None
    """Alarm when `distinct_answers` (answer clusters per prompt, the step's mean) is below
    this."""

    agreement_alarm: Optional[float] = None
    """Alarm when `vote_agreement` is at least this, in (0, 1], while validation accuracy
    falls (the newest validation point below the best one before it)."""

    collapse_margin: float = 0.05
    """The collapse step: validation accuracy below the best so far minus this margin ..."""

    collapse_window: int = 3
    """... at this many validation points in a row (0: no collapse step)."""

    def validate(self) -> None:
        """Check this section; ConfigError naming the field."""
        floor = self.min_pseudo_label_accuracy
        if floor is not None and not 0 <= floor <= 1:
            fail("diagnostics.min_pseudo_label_accuracy", floor, "null or a number in [0, 1]")
        limit = self.agreement_alarm  # 0 would fire whenever validation accuracy falls
        if limit is not None and not 0 < limit <= 1:
            fail("diagnostics.agreement_alarm", limit, "null or a number in (0, 1]")
        for name in ("min_entropy", "min_distinct_answers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                fail(f"diagnostics.{name}", value, "null or a number >= 0")
        if self.collapse_margin < 0:
            fail("diagnostics.collapse_margin", self.collapse_margin, "a number >= 0")
        if self.collapse_window < 0:
            fail("diagnostics.collapse_window", self.collapse_window, "an integer >= 0")
