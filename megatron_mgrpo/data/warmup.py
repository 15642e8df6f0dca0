"""Supervised warm-up of the tiny base policy, and its evaluation by sampling.

The base model for the CPU demo is an HF Qwen3-style model trained from scratch on the synthetic
task's worked solutions (`sft.jsonl`, see `synthetic.py`). The loss covers the completion only:
for each row the sequence is `encode_prompt(prompt) + encode(solution) + [EOS]` and the targets
are the solution's tokens and the EOS.

Why the warm-up is shaped as it is (docs/design.md, "When self-training can work at all"): the RL
reward is agreement with a majority vote, which only teaches the right thing where the vote is
right much more often than one sample (maj@k well above pass@1). The SFT data has a random wrong
boxed answer in a fraction of the solutions (`TaskSpec.noise`, 0.5), drawn uniformly from
[0, 199], so the base model's wrong answers scatter over many values while its right answers
agree; and the warm-up is short, so the arithmetic itself is only partly learnt. `evaluate`
measures what matters before any RL: greedy accuracy, pass@1 (mean over k samples at
temperature 1) and maj@k (majority vote over the k samples, answers compared with
`math_equivalent`).

Putting the noise into the last equation's result instead of only into the box spoils
learning that step and leaves almost no gap between maj@k and pass@1, so the equations stay
clean (the measured figures are in the README, "Why it can work here").

Sampling here is plain ancestral sampling (temperature, no top-k / top-p) with a KV cache,
prompts batched by token length so no padding is ever needed.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_mgrpo.config.schema import ModelConfig
from megatron_mgrpo.data.tokenizer import Tokenizer, encode_prompt
from megatron_mgrpo.rewards import extract_boxed, math_equivalent

__all__ = ["SFTConfig", "build_model", "sft_examples", "train_sft",
           "evaluate", "choose_threads", "THREADS_ENV"]

THREADS_ENV = "MGRPO_NUM_THREADS"


def choose_threads(requested: int = 0) -> Tuple[int, str]:
    """Torch threads for CPU work on a machine other work may share, and why.

    `requested` if > 0; else $MGRPO_NUM_THREADS, else $OMP_NUM_THREADS; else the CPUs this
    process may run on (`os.sched_getaffinity`) minus the 1-minute load average (rounded), at
    least 1. More threads than idle cores is much slower than fewer: the warm-up's step took
    several times longer with 2 threads than with 1 on a 2-core machine that was busy.
    """
    if requested > 0:
        return requested, "--threads"
    for var in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{var}: got {value!r}; accepted: a positive integer") from None
            if n < 1:
                raise ValueError(f"{var}: got {value!r}; accepted: a positive integer")
            return n, f"${var}"
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    n = max(1, cpus - int(load + 0.5))
    return n, (f"{cpus} CPUs available, load average {load:.2f}; "
               f"--threads or ${THREADS_ENV} to override")


@dataclass
class SFTConfig:
    """The warm-up's optimisation settings."""

    steps: int = 1200
    """Optimizer steps."""

    batch_size: int = 64
    """Sequences per step."""

    lr: float = 3e-3
    """Peak learning rate (AdamW), reached after `warmup_steps`, then cosine to 10%."""

    warmup_steps: int = 50
    """Linear learning-rate warm-up."""

    weight_decay: float = 0.01
    """AdamW weight decay (not on norms and biases)."""

    clip_grad: float = 1.0
    """Global grad-norm clip."""

    seed: int = 0
    """Order of the examples."""


def build_model(model_cfg: ModelConfig, seed: int = 0):
    """A freshly initialised transformers causal LM from `hf_config_dict(model_cfg)`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_mgrpo.models.architecture import hf_config_dict

    d = hf_config_dict(model_cfg)
    model_type = d.pop("model_type")
    d.pop("torch_dtype", None)
    config = AutoConfig.for_model(model_type, **d)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def sft_examples(rows: Sequence[Dict], tokenizer: Tokenizer, solution_key: str = "solution"
                 ) -> List[Tuple[List[int], int]]:
    """(ids, prompt_length) per row: ids = encode_prompt(prompt) + encode(solution) + [EOS]."""
    out = []
    for row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"])
        out.append((prompt + tokenizer.encode(row[solution_key]) + [tokenizer.eos_id],
                    len(prompt)))
    return out


def _batch(examples: Sequence[Tuple[List[int], int]], pad_id: int):
    """Right-padded input ids, attention mask, labels (-100 on prompt and padding)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (ids, plen) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, plen:len(ids)] = torch.tensor(ids[plen:])
        mask[i, :len(ids)] = 1
    return input_ids, mask, labels


def train_sft(model, examples: Sequence[Tuple[List[int], int]], cfg: SFTConfig, pad_id: int,
              log: Optional[Callable[[str], None]] = print, log_every: int = 100) -> List[float]:
    """Plain PyTorch SFT loop (completion tokens only). Returns the per-step losses."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    rng = random.Random(cfg.seed)
    order: List[int] = []
    losses: List[float] = []
    start = time.time()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        input_ids, mask, labels = _batch([examples[i] for i in idx], pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
            recent = losses[-log_every:]
            log(f"sft step {step + 1}/{cfg.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {lr_at(step):.2e}  {time.time() - start:.0f}s")
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, tokenizer: Tokenizer, rows: Sequence[Dict], k: int = 8,
             temperature: float = 1.0, max_new_tokens: int = 32, seed: int = 0,
             answer_key: str = "answer") -> Dict[str, float]:
    """Greedy accuracy, pass@1 (mean over k samples) and maj@k on `rows` (true answers),
    sampled through the same embedded engine the trainer uses."""
    from megatron_mgrpo.eval_metrics import sample_accuracy
    from megatron_mgrpo.rollout.base import SamplingParams
    from megatron_mgrpo.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine(model.config.to_dict())
    engine.update_weights("policy", [list(model.state_dict().items())], version=0)
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    truth = [str(r[answer_key]) for r in rows]
    start = time.time()

    def answers(n: int, temp: float):
        params = SamplingParams(temperature=temp, max_new_tokens=max_new_tokens,
                                stop_token_ids=list(tokenizer.stop_ids), seed=seed)
        return [[extract_boxed(tokenizer.decode(list(c.token_ids))) for c in group]
                for group in engine.generate(prompts, n, params)]

    greedy = sample_accuracy(answers(1, 0.0), truth, math_equivalent)["pass@1"]
    sampled = sample_accuracy(answers(k, temperature), truth, math_equivalent)
    return {"num_prompts": len(rows), "k": k, "temperature": temperature, "greedy": greedy,
            "pass@1": sampled["pass@1"], f"maj@{k}": sampled["maj@k"],
            "parsed": sampled["parsed"], "agreement": sampled["agreement"],
            "distinct_wrong_share": sampled["distinct_wrong_share"],
            "seconds": time.time() - start}
