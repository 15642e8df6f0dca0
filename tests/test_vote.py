"""Majority vote (pseudo-label) and the binary rewards it induces."""

import pytest
import torch

from megatron_mgrpo.algorithm import (
    binary_rewards,
    group_binary_rewards,
    majority_vote,
    pseudo_labels,
)
from megatron_mgrpo.rewards import math_equivalent


def test_plain_majority():
    # clusters in order of first member: "1" x2, "2" x1, "3" x1 -> "1", agreement 2/4.
    v = majority_vote(["1", "2", "1", "3"])
    assert v.pseudo_label == "1"
    assert v.majority_answer == "1"
    assert v.agreement == 0.5
    assert v.has_signal
    assert v.num_samples == 4
    assert v.num_votes == 4
    assert v.cluster_sizes == (2, 1, 1)
    assert v.cluster_ids == (0, 1, 0, 2)
    assert v.majority_cluster == 0


@pytest.mark.parametrize("answers, winner", [
    (["7", "3", "3", "7"], "7"),             # 2-2 tie: "7" appears first
    (["3", "7", "7", "3"], "3"),             # same multiset, other order: "3" first
    ([None, "b", "a", "a", "b"], "b"),       # earliest first member, not alphabetical
    (["z", "y", "x"], "z"),                  # 1-1-1 tie
])
def test_ties_go_to_earliest_cluster(answers, winner):
    v = majority_vote(answers)
    assert v.pseudo_label == winner
    assert v.agreement == pytest.approx(max(v.cluster_sizes) / len(answers))


def test_unparseable_answers_count_in_denominator():
    # "5" x2 of G = 5 (two None, one "6"): agreement 2/5, three votes cast.
    v = majority_vote(["5", None, None, "5", "6"])
    assert v.pseudo_label == "5"
    assert v.agreement == pytest.approx(0.4)
    assert v.num_votes == 3
    assert v.num_samples == 5
    assert v.cluster_ids == (0, None, None, 0, 1)


@pytest.mark.parametrize("answers", [[None, None, None], []])
def test_all_unparseable_has_no_signal(answers):
    v = majority_vote(answers, min_agreement=0.0)
    assert v.pseudo_label is None
    assert v.majority_answer is None
    assert v.agreement == 0.0
    assert not v.has_signal
    assert v.num_votes == 0
    assert v.cluster_sizes == ()
    assert v.majority_cluster is None


def test_equivalent_but_different_strings_cluster():
    # \frac{1}{2}, 0.5, 1/2 are one cluster (3 votes) against "2" (1): label is the first member.
    v = majority_vote([r"\frac{1}{2}", "0.5", "2", "1/2"], math_equivalent)
    assert v.pseudo_label == r"\frac{1}{2}"
    assert v.cluster_sizes == (3, 1)
    assert v.agreement == 0.75
    # with string equality the same answers split into four singletons; the first wins the tie
    v = majority_vote([r"\frac{1}{2}", "0.5", "2", "1/2"])
    assert v.cluster_sizes == (1, 1, 1, 1)


def test_equivalence_overturns_string_majority():
    # strings: "2" x2 is the most frequent; by value 0.5 ~ \frac12 ~ 1/2 has 3 of 5 -> "0.5".
    v = majority_vote(["2", "0.5", "2", r"\frac12", "1/2"], math_equivalent)
    assert v.pseudo_label == "0.5"
    assert v.cluster_sizes == (2, 3)
    assert v.agreement == pytest.approx(0.6)


def test_min_agreement_threshold():
    answers = ["a", "a", "b", "c"]            # agreement 2/4 = 0.5
    at = majority_vote(answers, min_agreement=0.5)
    assert at.pseudo_label == "a" and at.has_signal          # >=: exactly at threshold passes
    above = majority_vote(answers, min_agreement=0.51)
    assert above.pseudo_label is None and not above.has_signal
    assert above.majority_answer == "a"                      # still reported for logging
    assert above.agreement == 0.5


@pytest.mark.parametrize("bad", [-0.1, 1.1])
def test_min_agreement_out_of_range(bad):
    with pytest.raises(ValueError):
        majority_vote(["a"], min_agreement=bad)


def test_representative_is_compared_first():
    calls = []

    def equivalent(a, b):
        calls.append((a, b))
        return a == b

    majority_vote(["x", "y", "x"], equivalent)
    # "y" vs rep "x"; then "x" vs rep "x" (joins cluster 0 and stops)
    assert calls == [("x", "y"), ("x", "x")]


def test_pseudo_labels_over_groups():
    votes = pseudo_labels([["1", "1", "2"], [None, None], ["3", "4", "4"]], min_agreement=0.5)
    assert [v.pseudo_label for v in votes] == ["1", None, "4"]
    assert [v.has_signal for v in votes] == [True, False, True]


# --- rewards ---------------------------------------------------------------------------------

def test_binary_rewards_against_label():
    r = binary_rewards(["1", None, "2", "1.0", r"\frac{2}{2}"], "1", math_equivalent)
    assert r.dtype == torch.float32
    assert r.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]


def test_binary_rewards_no_label_is_zero():
    assert binary_rewards(["1", "1"], None).tolist() == [0.0, 0.0]


def test_binary_rewards_ground_truth_for_rlvr():
    # RLVR: same function, the dataset's answer as the label; a wrong majority earns nothing.
    assert binary_rewards(["3", "3", "4"], "4").tolist() == [0.0, 0.0, 1.0]


def test_group_binary_rewards_from_votes():
    groups = [["1", "1", "2"], [None, None, None]]
    votes = pseudo_labels(groups)
    r = group_binary_rewards(groups, [v.pseudo_label for v in votes])
    assert r.shape == (2, 3)
    assert r.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_group_binary_rewards_errors():
    with pytest.raises(ValueError):
        group_binary_rewards([["1"], ["1", "2"]], ["1", "1"])
    with pytest.raises(ValueError):
        group_binary_rewards([["1"]], ["1", "2"])
