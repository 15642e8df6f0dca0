"""Collapse diagnostics against hand-computed cases: the vote's margin, all-identical share and
policy-vs-momentum agreement, entropy quartiles, the collapse step on scripted validation
curves, the alarms firing and not firing, and a tiny run writing them to metrics.jsonl."""

import json
import math
import os

import pytest
import torch

from megatron_mgrpo.algorithm import (all_identical, entropy_quartiles, iqr_entropy_filter,
                                      majority_vote, plan_for_mode, policy_momentum_agreement,
                                      pseudo_labels, vote_diagnostics, vote_margin)
from megatron_mgrpo.collapse import CollapseTracker, CollapseWatch, find_collapse_step
from megatron_mgrpo.config import ConfigError, DiagnosticsConfig, load_config


def numeric(a: str, b: str) -> bool:
    return float(a) == float(b)


# ------------------------------------------------------------------------------ the vote

@pytest.mark.parametrize("answers, margin", [
    (["1", "1", "1", "2", "2", None], (3 - 2) / 6),  # None: in G, no cluster
    (["3", "3", "3", "3"], 1.0),
    (["1", "2"], 0.0),                               # a tie for first
    (["1", "1", None, None], 2 / 4),                 # one cluster: runner-up 0
    ([None, None], 0.0),                             # nothing voted for
    ([], 0.0),
])
def test_vote_margin(answers, margin):
    assert vote_margin(majority_vote(answers)) == pytest.approx(margin)


@pytest.mark.parametrize("answers, identical", [
    (["4", "4", "4"], True),
    (["4", "4.0", "4"], True),     # under the grader's equivalence
    (["4", "4", None], False),     # an unparseable answer breaks it
    ([None, None], False),
    (["4", "5", "4"], False),
])
def test_all_identical(answers, identical):
    assert all_identical(majority_vote(answers, numeric)) is identical


# M = 3 policy answers, then N = 3 momentum answers, per prompt.
GROUPS = [
    ["1", "1", "2", "1", "3", "3"],      # policy "1", momentum "3": differ
    ["5", "5", "5", "5.0", "6", "5"],    # "5" vs "5.0": equivalent
    [None, None, None, "7", "7", "7"],   # the policy parsed nothing: differ
    ["2", "3", "9", "3", "2", "2"],      # policy tie -> "2" (first), momentum "2": agree
]


def test_policy_momentum_agreement():
    assert policy_momentum_agreement(GROUPS, 3, numeric) == pytest.approx(2 / 4)
    # Under string equality "5" and "5.0" differ.
    assert policy_momentum_agreement(GROUPS, 3) == pytest.approx(1 / 4)
    # No momentum answers (srt, ttrl, rlvr): absent, not 0.
    assert policy_momentum_agreement([g[:3] for g in GROUPS], 3, numeric) is None


def test_vote_diagnostics_over_a_step():
    votes = pseudo_labels(GROUPS, numeric)
    d = vote_diagnostics(votes, GROUPS, 3, numeric)
    # Clusters over all G = 6: [3, 1, 2], [5, 1], [3], [3, 2, 1].
    assert d["vote_margin"] == pytest.approx((1 / 6 + 4 / 6 + 3 / 6 + 1 / 6) / 4)
    assert d["distinct_answers"] == pytest.approx((3 + 2 + 1 + 3) / 4)
    assert d["all_identical_frac"] == 0.0
    assert d["policy_momentum_agreement"] == pytest.approx(0.5)
    same = [["8"] * 6, ["8"] * 5 + [None]]
    d = vote_diagnostics(pseudo_labels(same), same, 6)  # M = 6, N = 0
    assert d["all_identical_frac"] == 0.5 and d["vote_margin"] == pytest.approx((1 + 5 / 6) / 2)
    assert "policy_momentum_agreement" not in d


def test_score_groups_logs_agreement_only_with_a_momentum_model():
    from megatron_mgrpo.update import score_groups

    mgrpo = score_groups(GROUPS, plan_for_mode("mgrpo", 3, 3), numeric)
    assert mgrpo.metrics["policy_momentum_agreement"] == pytest.approx(0.5)
    assert mgrpo.metrics["vote_margin"] == pytest.approx(0.375)
    srt = score_groups([g[:3] for g in GROUPS], plan_for_mode("srt", 3, 0), numeric)
    assert "policy_momentum_agreement" not in srt.metrics
    assert srt.metrics["distinct_answers"] == pytest.approx((2 + 1 + 0 + 3) / 4)


# ---------------------------------------------------------------------------- entropy

def test_entropy_quartiles_are_the_filters_q1_and_q3():
    h = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    assert entropy_quartiles(h) == pytest.approx((2.0, 3.0, 4.0))
    valid = torch.tensor([True, True, True, True, False])
    # [1, 2, 3, 4]: positions 0.75, 1.5, 2.25 of the sorted values.
    q = entropy_quartiles(h, valid)
    assert q == pytest.approx((1.75, 2.5, 3.25))
    f = iqr_entropy_filter(h, valid=valid)
    assert (q[0], q[2]) == (f.q1, f.q3)
    assert all(math.isnan(x) for x in entropy_quartiles(h, torch.zeros(5, dtype=torch.bool)))


def test_plan_update_logs_the_median_and_the_fence():
    from megatron_mgrpo.config import AlgorithmConfig
    from megatron_mgrpo.update import plan_update, score_groups, trained_columns

    mode = plan_for_mode("mgrpo", 2, 1, iqr_filter=True)
    scored = score_groups([["1", "1", "2"], ["3", "4", "3"]], mode, numeric)
    # Trajectory entropies 1, 2 | -, - (momentum rows, not trained) | 3, 4 | -, -.
    tokens = torch.tensor([[1.0, 1.0], [2.0, 2.0], [9.0, 9.0], [3.0, 3.0], [4.0, 4.0],
                           [9.0, 9.0]])
    mask = torch.ones(6, 2)
    plan = plan_update(scored, mode, AlgorithmConfig(iqr_filter=True), tokens, mask,
                       trained_columns(mode, 2))
    m = plan.metrics
    assert (m["entropy_q1"], m["entropy_median"], m["entropy_q3"]) == pytest.approx(
        (1.75, 2.5, 3.25))
    assert m["entropy_fence"] == pytest.approx(1.75 - 0.75 * 1.5)
    # Without the filter the same quartiles come from entropy_quartiles alone, and no fence.
    unfiltered = plan_for_mode("mgrpo", 2, 1, iqr_filter=False)
    m = plan_update(scored, unfiltered, AlgorithmConfig(iqr_filter=False), tokens, mask,
                    trained_columns(unfiltered, 2)).metrics
    assert (m["entropy_q1"], m["entropy_median"], m["entropy_q3"]) == pytest.approx(
        (1.75, 2.5, 3.25))
    assert "entropy_fence" not in m and m["iqr_dropped_frac"] == 0.0


# ---------------------------------------------------------------------- the collapse step

CURVE = [(0, 0.50), (2, 0.60), (4, 0.52), (6, 0.58), (8, 0.50), (10, 0.51), (12, 0.40)]


def test_collapse_step_on_a_scripted_curve():
    # Best 0.60 at step 2, threshold 0.55: step 4 dips, step 6 recovers inside the window;
    # from step 8 on the curve stays below.
    assert find_collapse_step(CURVE, 0.05, 2) == 8
    assert find_collapse_step(CURVE, 0.05, 3) == 8
    assert find_collapse_step(CURVE, 0.05, 4) is None
    assert find_collapse_step(CURVE, 0.15, 2) is None    # never below 0.45 twice in a row
    assert find_collapse_step(CURVE, 0.05, 0) is None    # window 0: off
    assert find_collapse_step(CURVE[:6], 0.05, 3) is None


def test_a_new_best_starts_over_and_ties_keep_the_earlier_best():
    assert find_collapse_step([(0, .5), (2, .4), (4, .6), (6, .4), (8, .4)], 0.05, 2) == 6
    t = CollapseTracker(0.1, 2)
    for step, acc in [(0, .5), (2, .5), (4, .3)]:
        t.add(step, acc)
    assert t.best_step == 0 and t.run == [4]
    assert t.add(6, .3) == 4
    assert t.add(8, .2) is None and t.collapse_step == 4   # found once, then fixed
    # Exactly best - margin is not below it.
    assert find_collapse_step([(0, .5), (1, .25), (2, .25)], 0.25, 2) is None


# --------------------------------------------------------------------------- the alarms

FLOORS = DiagnosticsConfig(min_pseudo_label_accuracy=0.4, min_entropy=0.2,
                           min_distinct_answers=1.5, agreement_alarm=0.95)


def row(step, **m):
    return {"step": step, **m}


def test_floors_fire_once_and_clear():
    w = CollapseWatch(FLOORS)
    ok = dict(pseudo_label_acc=0.5, entropy_mean=0.3, distinct_answers=2.0, vote_agreement=0.9)
    out, lines = w.observe(row(1, **ok))
    assert out == {"alarm_pseudo_label_acc": 0.0, "alarm_entropy_mean": 0.0,
                   "alarm_distinct_answers": 0.0, "alarm_vote_agreement": 0.0}
    assert lines == []
    low = dict(ok, pseudo_label_acc=0.3)
    out, lines = w.observe(row(2, **low))
    assert out["alarm_pseudo_label_acc"] == 1.0 and out["alarm_entropy_mean"] == 0.0
    assert lines == ["step 2: alarm: pseudo_label_acc 0.3 below "
                     "diagnostics.min_pseudo_label_accuracy 0.4"]
    out, lines = w.observe(row(3, **low))   # still firing: the flag, no second line
    assert out["alarm_pseudo_label_acc"] == 1.0 and lines == []
    out, lines = w.observe(row(4, **dict(ok, entropy_mean=0.1, distinct_answers=1.0)))
    assert out["alarm_pseudo_label_acc"] == 0.0
    assert out["alarm_entropy_mean"] == 1.0 and out["alarm_distinct_answers"] == 1.0
    assert len(lines) == 2


def test_no_thresholds_no_alarms_and_unknown_answers_no_accuracy_alarm():
    out, lines = CollapseWatch(DiagnosticsConfig()).observe(
        row(1, pseudo_label_acc=0.0, entropy_mean=0.0, distinct_answers=0.0, vote_agreement=1.0))
    assert out == {} and lines == []
    out, _ = CollapseWatch(FLOORS).observe(row(1, entropy_mean=0.3))   # no answer key
    assert "alarm_pseudo_label_acc" not in out and out["alarm_entropy_mean"] == 0.0


def test_agreement_alarm_needs_falling_validation_accuracy():
    w = CollapseWatch(DiagnosticsConfig(agreement_alarm=0.95))
    flags = []
    for r in [row(0, val_accuracy=0.6),
              row(1, vote_agreement=0.97),                     # no fall yet
              row(2, vote_agreement=0.97, val_accuracy=0.7),   # rising
              row(3, vote_agreement=0.97, val_accuracy=0.5),   # falls: fires
              row(4, vote_agreement=0.97),                     # the newest point still fell
              row(5, vote_agreement=0.80),                     # agreement not near 1
              row(6, vote_agreement=0.99, val_accuracy=0.65),  # still below the best 0.7
              row(7, vote_agreement=0.99, val_accuracy=0.72)]: # a new best
        out, lines = w.observe(r)
        flags.append((out.get("alarm_vote_agreement"), len(lines)))
    assert flags == [(None, 0), (0.0, 0), (0.0, 0), (1.0, 1), (1.0, 0), (0.0, 0), (1.0, 1),
                     (0.0, 0)]


def test_collapse_step_is_logged_once_and_a_resumed_watch_goes_on_alike():
    cfg = DiagnosticsConfig(collapse_margin=0.05, collapse_window=2, min_entropy=0.2)
    rows = [row(s, val_accuracy=a, entropy_mean=0.1 if s >= 6 else 0.3) for s, a in CURVE]
    whole = CollapseWatch(cfg)
    outs = [whole.observe(r) for r in rows]
    assert [o.get("collapse_step") for o, _ in outs] == [None] * 5 + [8, None]
    assert "collapse" in outs[5][1][0] and "since step 8" in outs[5][1][0]
    first = CollapseWatch(cfg)
    for r in rows[:4]:
        first.observe(r)
    resumed = CollapseWatch(cfg)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.observe(r) for r in rows[4:]] == outs[4:]
    fresh = CollapseWatch(cfg)
    fresh.load_state_dict(None)   # a checkpoint from before the watch: starts over
    assert fresh.state_dict() == CollapseWatch(cfg).state_dict()


# ---------------------------------------------------------------------------- the config

@pytest.mark.parametrize("flag, value, field", [
    ("--diagnostics.min_entropy", "-1", "diagnostics.min_entropy"),
    ("--diagnostics.min_pseudo_label_accuracy", "1.5",
     "diagnostics.min_pseudo_label_accuracy"),
    ("--diagnostics.agreement_alarm", "0", "diagnostics.agreement_alarm"),
    ("--diagnostics.collapse_margin", "-0.1", "diagnostics.collapse_margin"),
    ("--diagnostics.collapse_window", "-1", "diagnostics.collapse_window"),
])
def test_bad_diagnostics_are_one_line_naming_the_field(flag, value, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, [flag, value])
    assert str(info.value).startswith(f"{field}: got ") and "\n" not in str(info.value)


def test_diagnostics_defaults_are_off_and_load():
    cfg = load_config(None, ["--diagnostics.agreement_alarm", "0.95",
                             "--diagnostics.min_distinct_answers", "1"])
    assert cfg.diagnostics.agreement_alarm == 0.95 and cfg.diagnostics.min_entropy is None


# ------------------------------------------------------------------------- a tiny run

def test_a_tiny_run_writes_the_diagnostics_and_phase_times_to_metrics_and_plots(
        tiny_base, tmp_path, capfd):
    from tests.distributed import run_workers
    from tests.test_trainer import train_worker
    from tests.tiny import overrides

    run_dir = str(tmp_path / "run")
    # An entropy floor no model reaches: its alarm fires at every step, said once.
    run_workers(train_worker, 1, overrides(tiny_base, run_dir, 2,
                                           "--diagnostics.min_entropy", "1000",
                                           "--diagnostics.agreement_alarm", "0.99",
                                           "--eval.interval", "0"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("vote_margin", "all_identical_frac", "distinct_answers",
                    "policy_momentum_agreement", "entropy_median", "entropy_fence"):
            assert isinstance(r.get(key), float), key
        assert 0 <= r["vote_margin"] <= 1 and 0 <= r["policy_momentum_agreement"] <= 1
        assert r["entropy_q1"] <= r["entropy_median"] <= r["entropy_q3"]
        assert r["alarm_entropy_mean"] == 1.0 and r["alarm_vote_agreement"] in (0.0, 1.0)
        # Phase times (step.rl_step): generation inside the rollout, the phases inside the step.
        phases = ("rollout", "score", "logprob", "reference", "train", "push")
        t = {k: r[f"{k}_time_s"] for k in phases + ("generate_policy", "generate_momentum")}
        assert all(v >= 0 for v in t.values()), t
        assert t["generate_policy"] + t["generate_momentum"] <= t["rollout"]
        assert sum(t[k] for k in phases) <= r["step_time_s"]
        assert r["trainer_wait_time_s"] == t["rollout"]
        assert r["engine_wait_time_s"] == pytest.approx(sum(t[k] for k in phases[1:]))
    assert "alarm_entropy_mean" not in rows[0]   # the base row has no step figures
    assert capfd.readouterr().out.count("alarm: entropy_mean") == 1
    for png in ("collapse.png", "distinct_answers.png", "time.png"):
        assert os.path.getsize(os.path.join(run_dir, png)) > 1000, png
    # The watch's state is in the checkpoint: a resumed run would not say the alarm again.
    from megatron_mgrpo.checkpoint import read_trainer_state, step_dir

    state = read_trainer_state(step_dir(run_dir, 2))["diagnostics"]
    assert state["firing"]["entropy_mean"] is True
    assert state["best_val"] == max(rows[0]["val_accuracy"], rows[2]["val_accuracy"])
