"""Evaluations of a session's policy, each owning its interval rule: `Validator` (pass@1 and
maj@k on data.val_path every training.eval_interval steps) and `BenchmarkEval` (eval.benchmarks
every eval.interval steps). Both run at the last step too, and at step 0 for the base. Rank 0
samples through the session's engine; every rank gets the figures."""

from __future__ import annotations

import os
from typing import Dict

import torch

from megatron_mgrpo.eval_metrics import sample_accuracy


class _Periodic:
    """Runs every `interval` steps and at the last step, when there is something to run."""

    interval: int

    @property
    def enabled(self) -> bool:
        raise NotImplementedError

    def due(self, step: int, last_step: int) -> bool:
        return self.enabled and (step % self.interval == 0 or step == last_step)


class Validator(_Periodic):
    """Validation pass@1 (mean over training.eval_samples) and maj@k on data.val_path."""

    def __init__(self, session, interval: int):
        self.session, self.interval = session, interval
        d = session.cfg.data
        self.rows = []
        if d.val_path:
            from megatron_mgrpo.data.prompts import load_prompts

            val = load_prompts(d.val_path, d.prompt_key, d.answer_key, session.tokenizer,
                               d.max_prompt_length, log=session.say,
                               chat_template=d.chat_template)
            self.rows = [val[i] for i in range(len(val))]
            limit = session.cfg.training.max_eval_prompts
            self.rows = self.rows[:limit] if limit else self.rows

    @property
    def enabled(self) -> bool:
        return bool(self.rows) and self.interval > 0

    @torch.no_grad()
    def run(self) -> Dict[str, float]:
        from megatron_mgrpo.step import sampling

        s = self.session
        result = None
        if s.is_main:
            groups = s.engine.generate([r.prompt_ids for r in self.rows],
                                       s.cfg.training.eval_samples,
                                       sampling(s.cfg, s.tokenizer, seed=12345), model="policy")
            answers = [[s.grader.extract(s.tokenizer.decode(list(c.token_ids))) for c in comps]
                       for comps in groups]
            acc = sample_accuracy(answers, [r.answer for r in self.rows], s.grader.equivalent)
            logprobs = [lp for comps in groups for c in comps for lp in c.logprobs]
            # The completions' mean token log-prob: a continuous fingerprint of the weights.
            result = {"val_accuracy": acc["pass@1"], "val_maj": acc["maj@k"],
                      "val_token_logprob": sum(logprobs) / max(len(logprobs), 1)}
        return s.broadcast(result)


class BenchmarkEval(_Periodic):
    """eval.benchmarks, loaded once when constructed (when they are to run): every rank loads
    them (only rank 0 samples), so a missing or bad file stops all ranks with the same error,
    before step 1."""

    def __init__(self, session, interval: int):
        from megatron_mgrpo.evaluation.harness import load_configured

        self.session, self.interval = session, interval
        e = session.cfg.eval
        self.benchmarks = (load_configured(e, session.say) if e.benchmarks and interval > 0
                           else [])

    @property
    def enabled(self) -> bool:
        return bool(self.benchmarks) and self.interval > 0

    @torch.no_grad()
    def run(self, step: int) -> Dict[str, float]:
        """Scores as `<benchmark>/<metric>`; the full report goes to
        `<eval output dir>/step_<N>.json`, its table to the log."""
        from megatron_mgrpo.evaluation.harness import flat_metrics, run_benchmarks
        from megatron_mgrpo.evaluation.harness import output_dir, report

        s = self.session
        flat = None
        if s.is_main:
            doc = run_benchmarks(s.engine, s.tokenizer, self.benchmarks, s.cfg.eval,
                                 s.policy.model_cfg.max_position_embeddings,
                                 label=s.cfg.model.load or "random init", step=step, log=s.say)
            report(doc, os.path.join(output_dir(s.cfg), f"step_{step}.json"), s.say)
            flat = flat_metrics(doc)
        return s.broadcast(flat)
