"""Prepare the tiny CPU demo's data and base policy (the warm-up before any RL).

    python tools/prepare_tiny.py --out runs/tiny_base [--seed 1234] [--threads N]

1. Write the synthetic task (`sft.jsonl` noisy warm-up data, `train.jsonl` RL prompts,
   `val.jsonl`) under `<out>/data/`.
2. Train the sentencepiece tokenizer on the task's texts.
3. Build a tiny Qwen3-style HF model and warm it up by SFT on the noisy solutions (CPU).
4. Save `<out>` as a self-contained HF model dir (`config.json`, `model.safetensors`, tokenizer
   files): `AutoModelForCausalLM.from_pretrained(out)` and `load_tokenizer(out)` load it offline.
5. Measure the base on the val split: greedy accuracy, pass@1 and maj@k (k samples at
   temperature 1), written to `<out>/base_eval.json` and printed. Self-training needs
   maj@k well above pass@1 (docs/design.md, "When self-training can work at all"); the
   defaults are chosen for that.

Torch threads: `--threads`, else $MGRPO_NUM_THREADS or $OMP_NUM_THREADS, else the CPUs this
process may use minus the current load average, at least 1 (`data/warmup.py:choose_threads`),
so a busy machine is not oversubscribed; the choice is printed first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_mgrpo.config.schema import ModelConfig  # noqa: E402
from megatron_mgrpo.data.synthetic import TaskSpec, write_task  # noqa: E402
from megatron_mgrpo.data.tokenizer import train_sentencepiece  # noqa: E402
from megatron_mgrpo.data.warmup import (  # noqa: E402
    SFTConfig,
    build_model,
    choose_threads,
    evaluate,
    sft_examples,
    train_sft,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/tiny_base", help="output model dir")
    p.add_argument("--seed", type=int, default=1234, help="task, init and sampling seed")
    p.add_argument("--n-sft", type=int, default=20000, help="warm-up (noisy) problems")
    p.add_argument("--n-train", type=int, default=5000, help="RL prompts")
    p.add_argument("--n-val", type=int, default=200, help="validation prompts")
    p.add_argument("--noise", type=float, default=TaskSpec.noise,
                   help="share of warm-up solutions with a random wrong boxed answer")
    p.add_argument("--max-value", type=int, default=TaskSpec.max_value,
                   help="counts and answers lie in [0, max-value]")
    p.add_argument("--vocab-size", type=int, default=512, help="sentencepiece vocabulary")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--sft-steps", type=int, default=SFTConfig.steps)
    p.add_argument("--batch-size", type=int, default=SFTConfig.batch_size)
    p.add_argument("--lr", type=float, default=SFTConfig.lr)
    p.add_argument("--k", type=int, default=8, help="samples per val prompt for pass@1/maj@k")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: $MGRPO_NUM_THREADS, $OMP_NUM_THREADS, or the CPUs "
                        "available minus the load average)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        threads, why = choose_threads(args.threads)
    except ValueError as e:
        raise SystemExit(f"prepare_tiny: {e}") from None
    torch.set_num_threads(threads)
    print(f"threads: {threads} ({why})", flush=True)
    t0 = time.time()
    out = args.out
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)

    spec = dataclasses.replace(TaskSpec(), noise=args.noise, max_value=args.max_value)
    paths = write_task(data_dir, args.n_train, args.n_val, args.seed, n_sft=args.n_sft, spec=spec)
    splits = {}
    for name, path in paths.items():
        with open(path) as f:
            splits[name] = [json.loads(line) for line in f]
    print(f"task: {len(splits['sft'])} sft (noise {spec.noise}), {len(splits['train'])} train, "
          f"{len(splits['val'])} val -> {data_dir}")

    texts = [r["prompt"] + r["solution"] for r in splits["sft"] + splits["train"]]
    tokenizer = train_sentencepiece(texts, os.path.join(data_dir, "tokenizer"), args.vocab_size)
    print(f"tokenizer: {tokenizer.vocab_size} pieces")

    model_cfg = ModelConfig(
        architecture="qwen3", vocab_size=tokenizer.vocab_size, hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_layers=args.num_layers,
        num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=256, tie_word_embeddings=True, seed=args.seed)
    model = build_model(model_cfg, seed=args.seed)
    model.config.bos_token_id = tokenizer.bos_id
    model.config.eos_token_id = tokenizer.eos_id
    model.config.pad_token_id = tokenizer.pad_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: qwen3 {args.num_layers} layers, hidden {args.hidden_size}, "
          f"{n_params / 1e6:.2f}M params")

    sft_cfg = SFTConfig(steps=args.sft_steps, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed)
    examples = sft_examples(splits["sft"], tokenizer)
    t_sft = time.time()
    train_sft(model, examples, sft_cfg, tokenizer.pad_id)
    t_sft = time.time() - t_sft

    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    model.generation_config.top_k = None
    model.generation_config.top_p = None
    model.generation_config.bos_token_id = tokenizer.bos_id
    model.generation_config.eos_token_id = tokenizer.eos_id
    model.generation_config.pad_token_id = tokenizer.pad_id
    model.save_pretrained(out)
    tokenizer.save(out)

    metrics = evaluate(model, tokenizer, splits["val"], k=args.k,
                       max_new_tokens=args.max_new_tokens, seed=args.seed)
    report = {**metrics, "gap": metrics[f"maj@{args.k}"] - metrics["pass@1"],
              "params": n_params, "sft_seconds": t_sft, "total_seconds": time.time() - t0,
              "command": "python tools/prepare_tiny.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "args": vars(args)}
    with open(os.path.join(out, "base_eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    k = args.k
    print(f"base on val ({metrics['num_prompts']} prompts, k={k}, T=1.0): "
          f"greedy {metrics['greedy']:.3f}  pass@1 {metrics['pass@1']:.3f}  "
          f"maj@{k} {metrics[f'maj@{k}']:.3f}  (maj - pass@1 = {report['gap']:+.3f})  "
          f"[{report['total_seconds']:.0f}s total, sft {t_sft:.0f}s] -> {out}")
    print(f"config: model.hf_config={out} data.tokenizer={out} "
          f"data.train_path={paths['train']} data.val_path={paths['val']} "
          f"rollout.max_new_tokens={args.max_new_tokens}")
    return report


if __name__ == "__main__":
    main()
