"""step.build_batch: how engine completions become the step's tensors and answers."""

import torch

from megatron_mgrpo.rewards import get_grader
from megatron_mgrpo.rollout.base import Completion
from megatron_mgrpo.step import build_batch

TEXT = {5: "The answer is 12.", 6: "There are 3 boxes, so", 7: "3 x 4 = 12"}


def decode(ids):
    return " ".join(TEXT[i] for i in ids)


def completions():
    # One prompt, three completions: finished, cut off at max_new_tokens, finished.
    return [[Completion([5], [-0.5], "stop"), Completion([6], [-1.0], "length"),
             Completion([7, 5], [-0.25, -0.75], "stop")]]


def test_a_truncated_completion_has_no_answer_unless_graded():
    extract = get_grader("final_number").extract
    graded = build_batch([[1, 2]], completions(), extract, decode, pad_id=0)
    assert graded.answers == [["12", "3", "12"]]  # the cut-off one's last number
    ungraded = build_batch([[1, 2]], completions(), extract, decode, pad_id=0,
                           grade_truncated=False)
    assert ungraded.answers == [["12", None, "12"]]
    for b in (graded, ungraded):
        assert b.truncated.tolist() == [False, True, False]
        assert b.completion_lengths.tolist() == [1.0, 1.0, 2.0]
        assert b.input_ids.tolist() == [[1, 2, 5, 0], [1, 2, 6, 0], [1, 2, 7, 5]]
        assert b.completion_mask.tolist() == [[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
        assert torch.equal(b.behaviour_logprobs[2], torch.tensor([0, 0, -0.25, -0.75]))
