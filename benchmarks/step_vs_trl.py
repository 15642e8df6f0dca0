"""One training step, ours against TRL's GRPOTrainer on the same work, in one run.

    python benchmarks/step_vs_trl.py [--steps 12] [--warmup 2] [--repeats 2]
        [--sides trl,srt,mgrpo,srt_full,mgrpo_full] [--workdir DIR] [--keep]

About 2.5 minutes a repeat on 2 cores (most of it the processes' start-up). `python` is one with trl beside this
package's dependencies (`pip install -e '.[bench]'`); without trl it exits with one line
(`--sides srt,mgrpo` runs ours alone). The package imported is this checkout's (its root goes
first on PYTHONPATH).

The work, the same on both sides:
  model      a random Qwen2 (seed 0): hidden 128, 2 layers, 4 query / 2 KV heads of 32,
             SwiGLU 600, untied embeddings, vocab 259: 626,560 parameters, fp32. Written once
             as an HF dir (safetensors + config.json) that both sides load.
  tokenizer  byte level: a `tokenizers` BPE with the 256 bytes as its vocabulary and no
             merges (ByteLevel pre-tokenizer and decoder), plus <|bos|> 256, <|eos|> 257,
             <|pad|> 258; a post-processor puts BOS before a prompt, so TRL's
             `tokenizer(text)` and our `encode_prompt` give the same ids. Saved in the model
             dir (AutoTokenizer on TRL's side, megatron_mgrpo.data.tokenizer on ours).
  prompts    64 synthetic sums ("What is 23 + 15? Answer:"), jsonl with prompt / answer.
  a step     4 prompts x 8 completions sampled at temperature 1 (top-p 1, no top-k), at most
             32 new tokens: both sides stop a completion at EOS (a random model emits it about
             once per 259 tokens; `completion_len` on each side's line shows the work done);
             majority-vote reward per group of 8 (the last number of each completion; 1 where
             it equals the group's most common one); one PPO epoch, one minibatch, clip 0.2,
             no KL (TRL beta 0, ours algorithm.kl_coef 0), Adam lr 1e-4 constant, grad clip 1.
Sides, run interleaved (TRL, then ours in --sides order) `--repeats` times, each in its own process
with one torch thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)):
  trl    GRPOTrainer (transformers `generate`), per_device_train_batch_size 32,
         num_generations 8, gradient accumulation 1, num_iterations 1, fp32 (bf16 False),
         no gradient checkpointing (TRL defaults both on); a callback times each optimizer step
         (on_step_begin -> on_step_end: generation, reward, loss, backward, Adam), and TRL's
         own profiling timer of `transformers.generate` gives its generation time.
  srt    `mgrpo train` with algorithm.mode srt, 8 policy rollouts, no momentum, IQR filter off.
  mgrpo  `mgrpo train` with algorithm.mode mgrpo, 8 policy + 2 momentum rollouts (the
         momentum ones only vote), IQR filter on (the method's default).
  srt_full, mgrpo_full   the same with `rollout.overlap full`: the engine is a launched
         `mgrpo serve` process (one thread, beside the trainer's one: two processes, where
         TRL and the sequential sides have one), the next step's batch generated while this
         one trains, `algorithm.tis_cap 2`. Their generate/rest split is the engine's seconds
         for the step's completions, most of them hidden behind the previous step's training.
Ours run the embedded engine (rollout.backend embedded) and micro batch 64 (one microbatch, as
TRL's 32 rows in one forward); step_time_s, generate_*_time_s, logprob_time_s, train_time_s,
push_time_s come from the run's metrics.jsonl.

Figures (one JSON object per line; all names prefixed `step_vs_trl.`): medians over every
timed step of every repeat (the first `--warmup` steps of each run are dropped):
  parameters                         the model's parameter count
  {side}_step_time_s                 a step
  {side}_generate_time_s             sampling (ours: policy + momentum engine calls)
  {side}_rest_time_s                 the step minus sampling, step by step
  {side}_generate_share              sampling over the step, step by step
  {side}_completion_len              mean completion tokens (the work actually generated)
  step_time_ratio_{side}_vs_trl      ours / TRL, each of our sides (goal <= 0.7)
  rest_time_ratio_{side}_vs_trl      the same for the non-generation part
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PREFIX = "step_vs_trl."
PROMPTS_PER_STEP, GENERATIONS, MOMENTUM_ROLLOUTS = 4, 8, 2
MAX_NEW_TOKENS, LR = 32, 1e-4
SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, intermediate_size=600, max_position_embeddings=256,
             tie_word_embeddings=False)
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def emit(name: str, value, unit: str, **extra) -> None:
    if value is not None:
        value = round(float(value), 4) if isinstance(value, float) else value
    print(json.dumps({"name": PREFIX + name, "value": value, "unit": unit, **extra}),
          flush=True)


def one_thread_env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MGRPO_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "") if env.get(
        "PYTHONPATH") else ROOT
    return env


# ------------------------------------------------------------------------------------------
# The shared work: model dir (weights + tokenizer) and prompts.

def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel pre-tokenizes bytes into)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
          + list(range(0xAE, 0x100)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=EOS,
                                  pad_token=PAD, clean_up_tokenization_spaces=False)
    # BOS before every encoded text (add_special_tokens=True, TRL's call); ours prepends it
    # itself in encode_prompt, to the same ids.
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 256)])
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [256, 257, 258]
    return tok


def build_work(workdir: str, num_prompts: int = 64) -> dict:
    """The model dir and the prompts file; returns their paths and the parameter count."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_dir = os.path.join(workdir, "model")
    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      rms_norm_eps=1e-6, rope_theta=10000.0, **SHAPE)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(model_dir)
    model.generation_config = GenerationConfig(bos_token_id=256, eos_token_id=257,
                                               pad_token_id=258)
    model.generation_config.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())

    rng = random.Random(0)
    path = os.path.join(workdir, "prompts.jsonl")
    with open(path, "w") as f:
        for _ in range(num_prompts):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"prompt": f"What is {a} + {b}? Answer:",
                                "answer": str(a + b)}) + "\n")
    return {"model_dir": model_dir, "prompts": path, "parameters": params}


def check_same_ids(model_dir: str) -> None:
    """Our loader and AutoTokenizer (TRL's) give the same prompt ids."""
    from transformers import AutoTokenizer

    from megatron_mgrpo.data.tokenizer import encode_prompt, load_tokenizer

    text = "What is 23 + 15? Answer: é"
    ours = encode_prompt(load_tokenizer(model_dir), text)
    theirs = AutoTokenizer.from_pretrained(model_dir)(text=[text])["input_ids"][0]
    if ours != list(theirs) or ours[0] != 256:
        raise SystemExit(f"step_vs_trl: prompt ids differ: ours {ours} vs TRL's {theirs}")


# ------------------------------------------------------------------------------------------
# The reward both sides compute: majority vote over each group's last numbers.

def last_number(text: str) -> Optional[str]:
    import re

    found = re.findall(r"-?\d+(?:\.\d+)?", text)
    return found[-1] if found else None


def majority_vote_reward(prompts, completions, **kwargs) -> List[float]:
    """TRL reward function: per group of GENERATIONS consecutive completions (TRL lays each
    prompt's completions side by side), 1.0 where the completion's last number is the group's
    most common answer, else 0.0 (no answer: 0.0; no answer in the group: all 0.0)."""
    from collections import Counter

    rewards = []
    for start in range(0, len(completions), GENERATIONS):
        group = prompts[start:start + GENERATIONS]
        assert len(set(group)) == 1, "a reward group mixes prompts"
        answers = [last_number(c) for c in completions[start:start + GENERATIONS]]
        votes = Counter(a for a in answers if a is not None)
        top = votes.most_common(1)[0][0] if votes else None
        rewards += [1.0 if a is not None and a == top else 0.0 for a in answers]
    return rewards


# ------------------------------------------------------------------------------------------
# TRL's side (a worker process).

def trl_worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    import datasets
    import trl.extras.profiling as profiling
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    datasets.disable_progress_bars()
    rows = [json.loads(line) for line in open(args.prompts)]
    dataset = datasets.Dataset.from_list(rows)
    timings: Dict[str, float] = {}  # TRL's profiling timers, summed over the current step
    original = profiling.ProfilingContext._log_metrics

    def record(self, duration):
        timings[self.name] = timings.get(self.name, 0.0) + duration
        return original(self, duration)

    profiling.ProfilingContext._log_metrics = record
    steps: List[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            timings.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_s = time.perf_counter() - self.t0
            gen = timings.get("GRPOTrainer.transformers.generate")
            steps.append({"step_time_s": step_s, "generate_time_s": gen,
                          "timers": dict(timings)})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and steps and "completions/mean_length" in logs:
                steps[-1]["completion_len"] = logs["completions/mean_length"]
                steps[-1]["reward"] = logs.get("reward")

    config = GRPOConfig(
        output_dir=os.path.join(args.workdir, f"trl_{args.tag}"), max_steps=args.steps,
        per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS,
        num_generations=GENERATIONS, gradient_accumulation_steps=1, num_iterations=1,
        max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, seed=args.seed, data_seed=args.seed,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    trainer = GRPOTrainer(model=model, reward_funcs=majority_vote_reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[StepTimer()])
    trainer.train()
    with open(args.out, "w") as f:
        json.dump(steps, f)


def run_trl(work: dict, workdir: str, steps: int, seed: int, tag: str) -> List[dict]:
    out = os.path.join(workdir, f"trl_{tag}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "trl", "--workdir", workdir,
           "--model-dir", work["model_dir"], "--prompts", work["prompts"], "--steps", str(steps),
           "--seed", str(seed), "--tag", tag, "--out", out]
    _run(cmd, "trl")
    with open(out) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------
# Our side: `mgrpo train` in a process.

OURS = ("srt", "mgrpo", "srt_full", "mgrpo_full")


def our_config(work: dict, side: str, steps: int, seed: int, run_dir: str) -> str:
    mode, _, overlap = side.partition("_")
    momentum = MOMENTUM_ROLLOUTS if mode == "mgrpo" else 0
    cfg = {
        "model": {"load": work["model_dir"], "params_dtype": "fp32"},
        "parallel": {"micro_batch_size": 64},
        "rollout": {"backend": "embedded", "num_policy_rollouts": GENERATIONS,
                    "num_momentum_rollouts": momentum, "temperature": 1.0, "top_p": 1.0,
                    "max_new_tokens": MAX_NEW_TOKENS},
        "algorithm": {"mode": mode, "iqr_filter": mode == "mgrpo", "grader": "final_number",
                      "kl_coef": 0.0, "ppo_epochs": 1, "ppo_minibatches": 1,
                      "clip_low": 0.2, "clip_high": 0.2, "min_agreement": 0.0},
        "optimizer": {"lr": LR, "schedule": "constant", "clip_grad": 1.0},
        "data": {"train_path": work["prompts"], "val_path": None, "max_prompt_length": 64,
                 "prompts_per_step": PROMPTS_PER_STEP},
        "training": {"steps": steps, "seed": seed, "run_dir": run_dir, "eval_interval": 0,
                     "save_interval": 0, "overwrite": True},
        "logging": {"log_interval": 1000, "progress_bar": False, "tensorboard": False},
    }
    if overlap:  # the engine in its own process (`mgrpo serve`), the next batch made ahead
        cfg["rollout"].update(backend="sglang", overlap=overlap)
        cfg["algorithm"]["tis_cap"] = 2.0
        cfg["sglang"] = {"launch": 1, "launch_command": "{python} -m megatron_mgrpo.cli serve "
                                                        "--model {model} --port {port}"}
    path = run_dir + ".yaml"
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def run_ours(work: dict, workdir: str, side: str, steps: int, seed: int, tag: str) -> List[dict]:
    run_dir = os.path.join(workdir, f"{side}_{tag}")
    config = our_config(work, side, steps, seed, run_dir)
    _run([sys.executable, "-m", "megatron_mgrpo.cli", "train", config], side)
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "step_time_s" not in m:
                continue
            gen = m.get("generate_policy_time_s", 0.0) + m.get("generate_momentum_time_s", 0.0)
            rows.append({"step_time_s": m["step_time_s"], "generate_time_s": gen,
                         "completion_len": m.get("completion_len"),
                         **{k: m[k] for k in ("rollout_time_s", "logprob_time_s",
                                              "train_time_s", "push_time_s") if k in m}})
    return rows


def _run(cmd: List[str], what: str) -> None:
    p = subprocess.run(cmd, env=one_thread_env(), cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if p.returncode:
        sys.stderr.write(p.stdout[-6000:])
        raise SystemExit(f"step_vs_trl: the {what} run failed (exit {p.returncode}): "
                         f"{' '.join(cmd)}")


# ------------------------------------------------------------------------------------------

def summarize(runs: List[List[dict]], warmup: int) -> dict:
    """Medians over the timed steps of every run (each run's first `warmup` dropped)."""
    timed = [s for run in runs for s in run[warmup:]]
    out = {"steps": len(timed),
           "step_time_s": statistics.median(s["step_time_s"] for s in timed),
           "per_repeat_step_time_s": [round(statistics.median(s["step_time_s"]
                                                              for s in run[warmup:]), 4)
                                      for run in runs]}
    if all(s.get("generate_time_s") is not None for s in timed):
        out["generate_time_s"] = statistics.median(s["generate_time_s"] for s in timed)
        out["rest_time_s"] = statistics.median(s["step_time_s"] - s["generate_time_s"]
                                               for s in timed)
        out["generate_share"] = statistics.median(s["generate_time_s"] / s["step_time_s"]
                                                  for s in timed)
    lens = [s["completion_len"] for s in timed if s.get("completion_len") is not None]
    if lens:
        out["completion_len"] = statistics.mean(lens)
    for k in ("logprob_time_s", "train_time_s", "push_time_s"):
        if timed and all(k in s for s in timed):
            out[k] = statistics.median(s[k] for s in timed)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="steps per run (warm-up included)")
    ap.add_argument("--warmup", type=int, default=2, help="steps of each run not timed")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of TRL, srt, mgrpo")
    ap.add_argument("--sides", default="trl,srt,mgrpo,srt_full,mgrpo_full",
                    help=f"any of trl,{','.join(OURS)}")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workdir", help="where the model, prompts and runs go (default: a "
                    "temporary dir, removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the working dir")
    ap.add_argument("--worker", choices=("trl",), help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--prompts", "--tag", "--out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "trl":
        return trl_worker(args)
    sides = [s for s in args.sides.split(",") if s]
    if not sides or not set(sides) <= {"trl", *OURS}:
        ap.error(f"--sides: got {args.sides!r}; accepted: any of trl,{','.join(OURS)}")
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    if "trl" in sides and importlib.util.find_spec("trl") is None:
        raise SystemExit(f"step_vs_trl: trl is not installed in {sys.executable}; install it "
                         "beside this package (pip install -e '.[bench]') and rerun")

    import torch

    torch.set_num_threads(1)
    workdir = args.workdir or tempfile.mkdtemp(prefix="step_vs_trl_")
    os.makedirs(workdir, exist_ok=True)
    try:
        work = build_work(workdir)
        check_same_ids(work["model_dir"])
        emit("parameters", work["parameters"], "parameters", architecture="qwen2",
             **{k: v for k, v in SHAPE.items() if k != "max_position_embeddings"},
             vocab=259, dtype="fp32", prompts_per_step=PROMPTS_PER_STEP,
             completions_per_prompt=GENERATIONS, max_new_tokens=MAX_NEW_TOKENS,
             steps=args.steps, warmup=args.warmup, repeats=args.repeats, threads=1,
             torch=torch.__version__, trl=_version("trl"),
             transformers=_version("transformers"))
        runs: Dict[str, List[List[dict]]] = {s: [] for s in sides}
        for r in range(args.repeats):
            seed = args.seed + r
            for side in sides:
                t0 = time.time()
                if side == "trl":
                    steps = run_trl(work, workdir, args.steps, seed, str(r))
                else:
                    steps = run_ours(work, workdir, side, args.steps, seed, str(r))
                if len(steps) != args.steps:
                    raise SystemExit(f"step_vs_trl: the {side} run logged {len(steps)} steps, "
                                     f"expected {args.steps}")
                runs[side].append(steps)
                print(f"repeat {r + 1}/{args.repeats} {side}: {time.time() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        results = {s: summarize(runs[s], args.warmup) for s in sides}
        for side, res in results.items():
            extra = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                     if k not in ("step_time_s",)}
            emit(f"{side}_step_time_s", res["step_time_s"], "s", **extra)
            for k, unit in (("generate_time_s", "s"), ("rest_time_s", "s"),
                            ("generate_share", "fraction"), ("completion_len", "tokens")):
                if k in res:
                    emit(f"{side}_{k}", res[k], unit)
                elif k != "completion_len":
                    emit(f"{side}_{k}", None, unit, skipped="no generation timing")
        if "trl" in results:
            base = results["trl"]
            for side in OURS:
                if side not in results:
                    continue
                res = results[side]
                emit(f"step_time_ratio_{side}_vs_trl", res["step_time_s"] / base["step_time_s"],
                     "x", goal="<= 0.7")
                if "rest_time_s" in res and "rest_time_s" in base:
                    emit(f"rest_time_ratio_{side}_vs_trl",
                         res["rest_time_s"] / base["rest_time_s"], "x")
                if "generate_time_s" in res and "generate_time_s" in base:
                    emit(f"generate_time_ratio_{side}_vs_trl",
                         res["generate_time_s"] / base["generate_time_s"], "x")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
