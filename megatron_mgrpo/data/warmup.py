"""Supervised warm-up of the tiny base policy, and its evaluation by sampling.

The base model for the CPU demo is an HF Qwen3-style model trained from scratch on the synthetic
task's worked solutions (`sft.jsonl`, see `synthetic.py`). The loss covers the completion only:
for each row the sequence is `encode_prompt(prompt) + encode(solution) + [EOS]` and the targets
are the solution's tokens and the EOS.

Why the warm-up is shaped as it is (DESIGN.md, "When self-training can work at all"): the RL
reward is agreement with a majority vote, which only teaches the right thing where the vote is
right much more often than one sample (maj@k well above pass@1). The SFT data has a random wrong
boxed answer in a fraction of the solutions (`TaskSpec.noise`, 0.5), drawn uniformly from
[0, 199], so the base model's wrong answers scatter over many values while its right answers
agree; and the warm-up is short, so the arithmetic itself is only partly learnt. `evaluate`
measures what matters before any RL: greedy accuracy, pass@1 (mean over k samples at
temperature 1) and maj@k (majority vote over the k samples, answers compared with
`math_equivalent`).

Measured with `tools/prepare_tiny.py` (2 layers, hidden 128, 1200 steps, seed 1234; val, 200
prompts, k = 8): greedy 0.815, pass@1 0.378, maj@8 0.725; seeds 1 and 2 give pass@1 0.28 / 0.28
and maj@8 0.62 / 0.56. Putting the noise into the last equation's result instead of only into
the box spoils learning that step (sampled accuracy of the last step 7% instead of 81%) and
leaves a gap of 4 points (greedy 0.245, pass@1 0.056, maj@8 0.100), so the equations stay clean.

Sampling here is plain ancestral sampling (temperature, no top-k / top-p) with a KV cache,
prompts batched by token length so no padding is ever needed.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_mgrpo.algorithm.vote import majority_vote
from megatron_mgrpo.config.schema import ModelConfig
from megatron_mgrpo.data.tokenizer import Tokenizer, encode_prompt
from megatron_mgrpo.rewards import extract_boxed, math_equivalent

__all__ = ["SFTConfig", "build_model", "sft_examples", "train_sft", "sample_completions",
           "evaluate"]


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


def _cache_kwarg(model) -> str:
    """The forward's KV-cache argument: `cache` (transformers >= 5.x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def sample_completions(model, tokenizer: Tokenizer, prompts: Sequence[str], num_samples: int = 1,
                       temperature: float = 1.0, greedy: bool = False, max_new_tokens: int = 32,
                       seed: int = 0, max_batch: int = 512) -> List[List[str]]:
    """`num_samples` completions per prompt (decoded, cut at the first stop id), as
    [prompt][sample]. Greedy when `greedy`, else ancestral sampling at `temperature`."""
    model.eval()
    cache_kw = _cache_kwarg(model)
    gen = torch.Generator().manual_seed(seed)
    stop = torch.tensor(tokenizer.stop_ids)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    by_length: Dict[int, List[Tuple[int, int]]] = {}
    for job in jobs:
        by_length.setdefault(len(encoded[job[0]]), []).append(job)
    out: List[List[str]] = [[""] * num_samples for _ in prompts]
    for length in sorted(by_length):
        group = by_length[length]
        for b in range(0, len(group), max_batch):
            chunk = group[b:b + max_batch]
            ids = torch.tensor([encoded[i] for i, _ in chunk])
            res = model(input_ids=ids, use_cache=True)
            past, logits = _cache_of(res), res.logits[:, -1]
            done = torch.zeros(len(chunk), dtype=torch.bool)
            new: List[torch.Tensor] = []
            for _ in range(max_new_tokens):
                if greedy:
                    nxt = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits.float() / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_id), nxt)
                new.append(nxt)
                done |= torch.isin(nxt, stop)
                if bool(done.all()):
                    break
                res = model(input_ids=nxt[:, None], use_cache=True, **{cache_kw: past})
                past, logits = _cache_of(res), res.logits[:, -1]
            tokens = torch.stack(new, 1).tolist()
            for (i, j), row in zip(chunk, tokens):
                cut = next((t for t, x in enumerate(row) if x in tokenizer.stop_ids), len(row))
                out[i][j] = tokenizer.decode(row[:cut])
    return out


def evaluate(model, tokenizer: Tokenizer, rows: Sequence[Dict], k: int = 8,
             temperature: float = 1.0, max_new_tokens: int = 32, seed: int = 0,
             answer_key: str = "answer") -> Dict[str, float]:
    """Greedy accuracy, pass@1 (mean over k samples) and maj@k on `rows` (true answers)."""
    prompts = [r["prompt"] for r in rows]
    truth = [str(r[answer_key]) for r in rows]
    start = time.time()
    greedy = sample_completions(model, tokenizer, prompts, 1, greedy=True,
                                max_new_tokens=max_new_tokens)
    samples = sample_completions(model, tokenizer, prompts, k, temperature=temperature,
                                 max_new_tokens=max_new_tokens, seed=seed)
    n = len(rows)
    greedy_acc = pass1 = maj = parsed = agreement = distinct_wrong = 0.0
    for g, s, y in zip(greedy, samples, truth):
        greedy_acc += math_equivalent(extract_boxed(g[0]), y)
        answers = [extract_boxed(c) for c in s]
        parsed += sum(a is not None for a in answers) / k
        pass1 += sum(math_equivalent(a, y) for a in answers) / k
        vote = majority_vote(answers, math_equivalent)
        maj += math_equivalent(vote.pseudo_label, y)
        agreement += vote.agreement
        wrong = [a for a in answers if a is not None and not math_equivalent(a, y)]
        distinct_wrong += (len(set(wrong)) / len(wrong)) if wrong else 1.0
    return {"num_prompts": n, "k": k, "temperature": temperature,
            "greedy": greedy_acc / n, "pass@1": pass1 / n, f"maj@{k}": maj / n,
            "parsed": parsed / n, "agreement": agreement / n,
            "distinct_wrong_share": distinct_wrong / n, "seconds": time.time() - start}
