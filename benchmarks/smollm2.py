"""SmolLM2-135M-Instruct on CPU (issue 19): the embedded engine's generation against transformers'
`generate`, and the policy's training step, on the real model.

    python benchmarks/smollm2.py [--model runs/smollm2] [--prompts 8] [--new-tokens 32]
        [--repeats 3] [--seq-len 256] [--micro-batch 4] [--steps 3] [--threads N]

Needs the fetched model (`make smollm2`). One process; torch threads as `tools/prepare_tiny.py`
chooses them (`--threads`, else $MGRPO_NUM_THREADS / $OMP_NUM_THREADS, else the idle CPUs).

Generation: the same `--prompts` chat prompts (the tokenizer's template, one user turn each),
greedy, `--new-tokens` at most, stopping at EOS; all prompts in one batch for both. The engine
(`rollout/embedded.py`: transformers' model in our own decode loop, left-padded, finished rows
dropped from the KV cache) against `model.generate` (left-padded batch, do_sample False) of the
same transformers model in the same dtype. Each side runs `--repeats` times, alternating; the
best time of each counts (a shared machine only ever slows a run down). Tokens/s is the
completions' tokens (EOS included, nothing after it) over that time.

Training: `MegatronPolicy.train_step` (forward, backward and Adam step through megatron's
forward_backward_func, the trainer's log-prob path, a token-sum loss; as
`benchmarks/train_throughput.py` times it) on the loaded model, `--micro-batch` sequences of
`--seq-len` tokens of real text (the chat prompts and their greedy completions, repeated). In
bf16 on a CPU with native bf16, else in fp32 (emulated bf16 would time the emulation; its line
says so). One untimed step, then `--steps` timed.

Figures (one JSON object per line; names prefixed `smollm2.`):
  engine_tokens_per_s, hf_generate_tokens_per_s   generation throughput
  engine_over_hf_generate    the ratio (no goal set; our loop adds exact log-probs and per-row
                             seeds, and should cost nothing over generate)
  greedy_completions_equal   whether both produced the same tokens (1 or 0)
  train_tokens_per_s         training throughput (step time beside)
  train_mfu_vs_measured_gemm model FLOP/s (6N + 12LqS per token) over a GEMM's measured rate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from benchmarks.train_throughput import (cpu_has_bf16, measured_gemm_tflops,  # noqa: E402
                                         model_flops_per_token, token_sum_loss)

PREFIX = "smollm2."
QUESTIONS = [
    "What is 23 + 15? Put the final answer in \\boxed{}.",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "If a train travels 60 km in 1.5 hours, what is its average speed?",
    "Explain in one sentence what a prime number is.",
    "What is the capital of France?",
    "Give me two tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Why is the sky blue?",
    "List the first five even numbers.",
    "Write a short greeting for a birthday card.",
]


def emit(name: str, value, unit: str, **extra) -> None:
    if isinstance(value, float):
        value = round(value, 4)
    print(json.dumps({"name": PREFIX + name, "value": value, "unit": unit, **extra}), flush=True)


def bench_generation(path, tokenizer, prompts, new_tokens, repeats):
    """(engine tokens, engine s, hf tokens, hf s, equal) with the best of `repeats` times."""
    from transformers import AutoModelForCausalLM

    from megatron_mgrpo.rollout.base import SamplingParams
    from megatron_mgrpo.rollout.embedded import EmbeddedEngine

    eos = tokenizer.eos_token_id
    engine = EmbeddedEngine.from_pretrained(path, sets=("policy",))
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, stop_token_ids=[eos])
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), eos, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # left padding, as the engine pads
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1

    def hf_completions():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos)
        rows = []
        for row in out[:, width:].tolist():
            rows.append(row[:row.index(eos) + 1] if eos in row else row)
        return rows

    best = {"engine": float("inf"), "hf": float("inf")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        mine = [g[0].token_ids for g in engine.generate(prompts, 1, params)]
        best["engine"] = min(best["engine"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = hf_completions()
        best["hf"] = min(best["hf"], time.perf_counter() - t0)
    return (sum(map(len, mine)), best["engine"], sum(map(len, theirs)), best["hf"],
            mine == theirs, mine)


def bench_training(path, token_rows, seq_len, micro_batch, steps, dtype):
    """Seconds per `MegatronPolicy.train_step` on `micro_batch` x `seq_len` tokens."""
    from megatron_mgrpo.config.schema import Config, ModelConfig, OptimizerConfig, ParallelConfig
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.parallel import destroy_parallel, init_parallel
    from megatron_mgrpo.weights.pretrained import load_pretrained

    cfg = Config(model=ModelConfig(load=path, params_dtype=dtype),
                 parallel=ParallelConfig(micro_batch_size=micro_batch),
                 optimizer=OptimizerConfig(lr=1e-6)).validate(world_size=1)
    stream = [t for row in token_rows for t in row]
    stream = (stream * (micro_batch * seq_len // len(stream) + 1))[:micro_batch * seq_len]
    batch = {"input_ids": torch.tensor(stream).view(micro_batch, seq_len),
             "loss_mask": torch.ones(micro_batch, seq_len)}
    batch["loss_mask"][:, 0] = 0  # position 0 has no prediction
    ctx = init_parallel(cfg.parallel, seed=0)
    try:
        policy = MegatronPolicy(cfg, ctx, total_steps=steps + 1)
        load_pretrained(policy, path)
        policy.train_step(batch, token_sum_loss)  # untimed: first-call allocations
        t0 = time.perf_counter()
        for _ in range(steps):
            result = policy.train_step(batch, token_sum_loss)
        return (time.perf_counter() - t0) / steps, result.loss
    finally:
        destroy_parallel()


def main(argv=None) -> None:
    from megatron_mgrpo.data.warmup import choose_threads
    from megatron_mgrpo.models.architecture import model_config_from_hf, read_hf_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "runs", "smollm2"),
                    help="the fetched HF directory (make smollm2)")
    ap.add_argument("--prompts", type=int, default=8, help=f"chat prompts (<= {len(QUESTIONS)})")
    ap.add_argument("--new-tokens", type=int, default=32, help="most tokens per completion")
    ap.add_argument("--repeats", type=int, default=3, help="generation runs of each side")
    ap.add_argument("--seq-len", type=int, default=256, help="training tokens per sequence")
    ap.add_argument("--micro-batch", type=int, default=4, help="training sequences per step")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: choose)")
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        ap.exit(2, f"smollm2: no model at {args.model!r} (make smollm2 fetches it)\n")
    if not 1 <= args.prompts <= len(QUESTIONS):
        ap.error(f"--prompts: got {args.prompts}; accepted: 1 to {len(QUESTIONS)}")
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
               for q in QUESTIONS[:args.prompts]]
    emit("setup", threads, "threads", why=why, prompts=len(prompts),
         prompt_tokens=sum(map(len, prompts)), new_tokens=args.new_tokens,
         repeats=args.repeats)

    n_mine, t_mine, n_hf, t_hf, equal, completions = bench_generation(
        args.model, tokenizer, prompts, args.new_tokens, args.repeats)
    emit("engine_tokens_per_s", n_mine / t_mine, "tokens/s", tokens=n_mine,
         seconds=round(t_mine, 3))
    emit("hf_generate_tokens_per_s", n_hf / t_hf, "tokens/s", tokens=n_hf,
         seconds=round(t_hf, 3))
    emit("engine_over_hf_generate", (n_mine / t_mine) / (n_hf / t_hf), "ratio")
    emit("greedy_completions_equal", int(equal), "bool")

    native = cpu_has_bf16() or torch.cuda.is_available()
    dtype = "bf16" if native else "fp32"
    if not native:
        emit("train_bf16_tokens_per_s", None, "tokens/s",
             skipped="this CPU has no native bf16: timing it would measure torch's emulation; "
                     "fp32 timed instead")
    m = model_config_from_hf(read_hf_config(args.model))
    text = [p + c for p, c in zip(prompts, completions)]
    step_s, loss = bench_training(args.model, text, args.seq_len, args.micro_batch, args.steps,
                                  dtype)
    tokens = args.micro_batch * args.seq_len
    emit("train_tokens_per_s", tokens / step_s, "tokens/s", dtype=dtype,
         step_s=round(step_s, 3), tokens_per_step=tokens, loss=round(loss, 4))
    gemm = measured_gemm_tflops(torch.cuda.is_available(),
                                dtype=torch.bfloat16 if native else torch.float32)
    achieved = tokens / step_s * model_flops_per_token(m, args.seq_len) / 1e12
    emit("train_mfu_vs_measured_gemm", achieved / gemm, "fraction",
         model_tflops=round(achieved, 4), gemm_tflops=round(gemm, 4))


if __name__ == "__main__":
    main()
