"""The small warmed-up base and the overrides that the end-to-end tests train it with."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "examples/tiny/config.yaml")


def prepare_base(out, *extra):
    spec = importlib.util.spec_from_file_location("prepare_tiny",
                                                  os.path.join(ROOT, "tools/prepare_tiny.py"))
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    prepare.main(["--out", out, "--n-sft", "800", "--n-train", "64", "--n-val", "8",
                  "--sft-steps", "60", "--k", "2", "--hidden-size", "64",
                  "--intermediate-size", "128", "--threads", "1", *extra])
    # The validation prompts again as a benchmark file in MATH-500's schema.
    os.makedirs(os.path.join(out, "eval"))
    with open(os.path.join(out, "data", "val.jsonl")) as src, \
            open(os.path.join(out, "eval", "math500.jsonl"), "w") as dst:
        for i, line in enumerate(src):
            row = json.loads(line)
            dst.write(json.dumps({"problem": row["prompt"], "solution": "", "level": 1,
                                  "answer": row["answer"], "subject": "Arithmetic",
                                  "unique_id": f"test/arithmetic/{i}.json"}) + "\n")


def overrides(base, run_dir, steps, *extra):
    return ["--model.load", base,
            "--data.train_path", f"{base}/data/train.jsonl",
            "--data.val_path", f"{base}/data/val.jsonl",
            "--data.prompts_per_step", "4", "--parallel.micro_batch_size", "8",
            "--rollout.max_new_tokens", "24",
            "--training.run_dir", run_dir, "--training.steps", str(steps),
            "--training.eval_interval", "2", "--training.eval_samples", "2",
            "--training.save_interval", "2",
            "--eval.benchmarks", "[math500]", "--eval.interval", "2",
            "--eval.data_dir", f"{base}/eval", "--eval.samples", "2",
            "--eval.max_new_tokens", "24", "--eval.templates", '{math500: "{problem}"}',
            "--eval.temperature", "1.0", "--eval.top_p", "1.0", *extra]
