"""tools/readme_figures.py: figures from a hand-written metrics.jsonl, and the README blocks
rewritten (and nothing else); the README itself carries each block exactly once."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location(
        "readme_figures", os.path.join(ROOT, "tools", "readme_figures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Step 0 is the base; steps 1-4 train; validation at 0, 2 and 4 (peak at 2).
METRICS = [
    {"step": 0, "val_accuracy": 0.25, "val_maj": 0.5, "val_token_logprob": -1.0},
    {"step": 1, "reward_mean": 0.4, "entropy_mean": 0.3, "pseudo_label_acc": 0.7},
    {"step": 2, "reward_mean": 0.5, "entropy_mean": 0.2, "pseudo_label_acc": 0.9,
     "val_accuracy": 0.6, "val_maj": 0.7},
    {"step": 3, "reward_mean": 0.6, "entropy_mean": 0.15, "pseudo_label_acc": 0.8},
    {"step": 4, "reward_mean": 0.75, "entropy_mean": 0.1, "pseudo_label_acc": 0.95,
     "val_accuracy": 0.5, "val_maj": 0.8},
]
BASE_EVAL = {"num_prompts": 200, "k": 8, "greedy": 0.865, "pass@1": 0.406, "maj@8": 0.78}
RUN = {"warmup_s": 225.4, "train_s": 170.0, "eval_samples": 4, "temperature": 1.0,
       "val_prompts": 200}

SNIPPET = """# Title

Intro that stays.

<!-- figures:demo -->
old demo text 0.359 -> 0.644
<!-- /figures:demo -->

- **Sweeps**: prose that stays. <!-- figures:sweep -->old sweep 0.36 -> 0.57<!-- /figures:sweep -->
  and after.
"""


def test_demo_figures_come_from_the_metrics_rows():
    fig = _module().demo_figures(METRICS, BASE_EVAL)
    assert fig["steps"] == 4 and fig["final_step"] == 4
    assert (fig["base_pass1"], fig["base_maj"]) == (0.25, 0.5)
    assert (fig["final_pass1"], fig["final_maj"]) == (0.5, 0.8)
    assert (fig["peak_pass1"], fig["peak_step"]) == (0.6, 2)
    assert (fig["reward_first"], fig["reward_last"]) == (0.4, 0.75)
    assert (fig["entropy_first"], fig["entropy_last"]) == (0.3, 0.1)
    assert fig["pseudo_label_range"] == "70-95%"
    assert (fig["warmup_pass1"], fig["warmup_maj"], fig["warmup_greedy"]) == (0.406, 0.78, 0.865)


def test_demo_figures_refuse_a_run_without_validation():
    mod = _module()
    with pytest.raises(mod.FiguresError, match="validation at step 0"):
        mod.demo_figures([r for r in METRICS if r["step"] > 0], BASE_EVAL)


def test_the_demo_block_is_rewritten_and_nothing_else(tmp_path):
    mod = _module()
    fig = mod.demo_figures(METRICS, BASE_EVAL)
    body = mod.render_demo(fig, RUN, "`python tools/readme_figures.py` at abc1234, 2026-12-01")
    text = mod.replace_block(SNIPPET, "demo", body)
    assert "0.359" not in text and "old demo" not in text
    assert text.startswith("# Title\n\nIntro that stays.\n\n<!-- figures:demo -->\nWhat it printed")
    block = text[:text.index("<!-- /figures:demo -->")].splitlines()
    assert all(len(line) <= 96 for line in block if not line.startswith("|")), block
    flat = " ".join(text.split())
    assert "the warm-up 3 min 45 s, the 4 RL steps 2 min 50 s, 6 min 35 s in all" in flat
    assert "at abc1234, 2026-12-01" in flat
    assert "| validation pass@1 (mean of 4 samples at T = 1, 200 prompts) | 0.250 | **0.500** " \
           "(peak 0.600 at step 2) |" in text
    assert "| validation maj@4 | 0.500 | 0.800 |" in text
    assert "| reward (agreement with the vote), step 1 -> 4 | 0.400 | 0.750 |" in text
    assert "| mean trajectory entropy, step 1 -> 4 | 0.300 | 0.100 |" in text
    assert "right on 70-95% of a step's prompts" in flat
    assert "pass@1 0.406 and maj@8 0.780 (greedy 0.865;" in flat
    assert text.endswith("<!-- /figures:demo -->\n\n- **Sweeps**: prose that stays. "
                         "<!-- figures:sweep -->old sweep 0.36 -> 0.57<!-- /figures:sweep -->"
                         "\n  and after.\n")
    # Rewriting again replaces the block, not appends to it.
    assert mod.replace_block(text, "demo", body) == text


def test_the_inline_sweep_block_stays_inline():
    mod = _module()
    cells = {"algorithm.momentum=0.9,training.seed=1": METRICS,
             "algorithm.momentum=0.99,training.seed=1": METRICS}
    per_cell = mod.sweep_figures(cells)
    body = mod.render_sweep("examples/sweep_tiny.yaml", {"algorithm.momentum": [0.9, 0.99],
                                                         "training.seed": [1]},
                            per_cell, {"sweep_s": 80, "skipped": 2}, "at abc1234, 2026-12-01")
    text = mod.replace_block(SNIPPET, "sweep", body)
    item = text[text.index("- **Sweeps**"):]
    lines = item.splitlines()
    assert all(len(line) <= 96 for line in lines), lines
    assert all(line.startswith("  ") for line in lines[1:]), lines  # still inside the item
    flat = " ".join(item.split())
    assert ("prose that stays. <!-- figures:sweep -->`examples/sweep_tiny.yaml` (2 cells: "
            "algorithm.momentum 0.9 / 0.99 x training.seed 1; 4 steps of the tiny run each) "
            "took 1 min 20 s (at abc1234, 2026-12-01); run again, it skipped all 2 cells;") in flat
    assert "`algorithm.momentum=0.9,training.seed=1` 0.250 -> 0.500" in flat
    assert text.endswith(".<!-- /figures:sweep -->\n  and after.\n")
    assert mod.replace_block(text, "sweep", body) == text
    assert "old demo text" in text


def test_a_missing_or_doubled_block_is_one_error():
    mod = _module()
    with pytest.raises(mod.FiguresError, match="figures:base"):
        mod.replace_block(SNIPPET, "base", "x")
    with pytest.raises(mod.FiguresError, match="found 2 start"):
        mod.replace_block(SNIPPET + "<!-- figures:demo -->", "demo", "x")


def test_the_readme_has_each_block_once():
    mod = _module()
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    for name in ("demo", "sweep"):
        mod.replace_block(text, name, "")


def test_durations_read_as_a_person_writes_them():
    fmt = _module().fmt_duration
    assert (fmt(426), fmt(45.2), fmt(60), fmt(59.6)) == ("7 min 6 s", "45 s", "1 min 0 s",
                                                          "1 min 0 s")


def test_a_foreign_out_directory_is_refused(tmp_path):
    mod = _module()
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(mod.FiguresError, match="not made by this script"):
        mod._fresh(str(tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "mine"
    own = tmp_path / "own"
    mod._fresh(str(own))
    (own / "old.log").write_text("x")
    mod._fresh(str(own))
    assert sorted(os.listdir(own)) == [mod.MARK]


def test_metrics_rows_round_trip_through_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in METRICS) + "\n")
    assert _module()._read_jsonl(str(path)) == METRICS
