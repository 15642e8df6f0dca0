"""pass@1 / maj@k arithmetic against hand-computed values."""

import pytest

from megatron_mgrpo.algorithm.vote import exact_match
from megatron_mgrpo.eval_metrics import sample_accuracy
from megatron_mgrpo.rewards import math_equivalent


def test_sample_accuracy_by_hand():
    answers = [
        ["3", "3", "5", None],      # pass 2/4; vote 3 (2 of 4) right; parsed 3/4; wrong {5}: 1/1
        ["7", "8", "8", "9"],       # pass 1/4; vote 8 wrong; parsed 1; wrong {8, 9} of 3: 2/3
    ]
    got = sample_accuracy(answers, ["3", "7"], exact_match)
    assert got["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert got["maj@k"] == pytest.approx(1 / 2)
    assert got["parsed"] == pytest.approx((3 / 4 + 1) / 2)
    assert got["agreement"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert got["distinct_wrong_share"] == pytest.approx((1 + 2 / 3) / 2)


def test_sample_accuracy_uses_the_equivalence():
    got = sample_accuracy([["\\frac{1}{2}", "0.5", "1/3"]], ["1/2"], math_equivalent)
    assert got["pass@1"] == pytest.approx(2 / 3) and got["maj@k"] == 1.0


def test_sample_accuracy_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one truth per prompt"):
        sample_accuracy([["1"]], [], exact_match)
