"""The embedded engine's decoder (`rollout.fast_decode`) against transformers' forward, in one
run.

    python benchmarks/decode.py [--repeats 5]

About 30 s on 2 cores, one torch thread. The same engine, the same weights and the same calls,
once through `fast_decode.Decoder` and once through transformers' forward with its
`DynamicCache` (the engine's path for architectures the decoder does not cover), interleaved,
medians over `--repeats` calls each. Two shapes:
  tiny   the step_vs_trl model: a random Qwen2 of 626,560 parameters (hidden 128, 2 layers,
         4 / 2 heads of 32, SwiGLU 600, vocab 259), 4 prompts of ~25 tokens x 8 completions;
  small  a random Llama of 25M parameters (hidden 512, 8 layers, 8 / 4 heads of 64, SwiGLU
         1408, vocab 8192, tied), 8 prompts of ~40 tokens x 4 completions.
Both: temperature 1, 32 new tokens, no stop token (every row decodes all 32), fp32.

Figures (one JSON object per line, names prefixed `decode.`):
  {shape}_fast_s, {shape}_transformers_s   seconds per generate call
  {shape}_fast_over_transformers           the ratio (< 1: the decoder is faster)
  {shape}_max_logprob_diff                 largest |log-prob| difference between the two
                                           paths' completions (the same tokens are drawn)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    "tiny": (dict(architecture="qwen2", vocab_size=259, hidden_size=128, intermediate_size=600,
                  num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
             4, 25, 8),
    "small": (dict(architecture="llama", vocab_size=8192, hidden_size=512,
                   intermediate_size=1408, num_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, tie_word_embeddings=True), 8, 40, 4),
}


def emit(name, value, unit, **extra):
    value = round(float(value), 6 if "diff" in name else 4)
    print(json.dumps({"name": "decode." + name, "value": value, "unit": unit, **extra}),
          flush=True)


def run_shape(name, kw, num_prompts, prompt_len, n, repeats):
    import torch

    from megatron_mgrpo.config.schema import ModelConfig
    from megatron_mgrpo.models.architecture import hf_config_dict
    from megatron_mgrpo.rollout.base import SamplingParams
    from megatron_mgrpo.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine(hf_config_dict(ModelConfig(**kw)), sets=("policy",))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, kw["vocab_size"], (prompt_len - i % 3,), generator=g).tolist()
               for i in range(num_prompts)]
    params = SamplingParams(temperature=1.0, max_new_tokens=32, seed=3)
    ws = engine._sets["policy"]
    paths = {"fast": ws.fused, "transformers": None}
    outs, times = {}, {k: [] for k in paths}
    for i in range(repeats + 1):
        for path, fused in paths.items():
            ws.fused = fused
            t = time.perf_counter()
            outs[path] = engine.generate(prompts, n, params)
            if i:  # the first call of each is a warm-up
                times[path].append(time.perf_counter() - t)
    ws.fused = paths["fast"]
    pairs = [(a, b) for ga, gb in zip(outs["fast"], outs["transformers"]) for a, b in zip(ga, gb)]
    if any(a.token_ids != b.token_ids for a, b in pairs):
        raise SystemExit(f"decode: the two paths drew different tokens ({name})")
    diff = max(abs(x - y) for a, b in pairs for x, y in zip(a.logprobs, b.logprobs))
    fast, slow = statistics.median(times["fast"]), statistics.median(times["transformers"])
    extra = dict(parameters=sum(p.numel() for p in ws.params.values()),
                 rows=num_prompts * n, new_tokens=32, repeats=repeats)
    emit(f"{name}_fast_s", fast, "s", **extra)
    emit(f"{name}_transformers_s", slow, "s")
    emit(f"{name}_fast_over_transformers", fast / slow, "x")
    emit(f"{name}_max_logprob_diff", diff, "nats")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    for name in args.shapes.split(","):
        kw, num_prompts, prompt_len, n = SHAPES[name]
        run_shape(name, kw, num_prompts, prompt_len, n, args.repeats)


if __name__ == "__main__":
    main()
