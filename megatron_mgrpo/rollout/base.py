"""The rollout engine's interface, whatever serves it (the embedded engine on CPU, SGLang later).

An engine holds two weight sets, `"policy"` and `"momentum"`, each a complete HF-layout model
with a version stamp. The trainer samples from either with `generate` and refreshes either with
`update_weights` after each optimizer step. Token ids in, token ids and log-probs out: no text
crosses this boundary, so the trainer's tokenizer is the only one.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable, List, Literal, Optional, Sequence, Tuple

import torch

from megatron_mgrpo.errors import RolloutError  # noqa: F401 (raised by the engines)

WEIGHT_SETS = ("policy", "momentum")
"""The weight sets every engine holds."""

Bucket = List[Tuple[str, torch.Tensor]]
"""A slice of a weight update: (HF parameter name, full tensor) pairs."""


class WeightsNotReadyError(RuntimeError):
    """generate() on a weight set whose last update did not complete."""


class WeightUpdateError(ValueError):
    """A weight update that does not fit the engine's model: an unknown name, a wrong shape,
    a tensor sent twice, or parameters left uncovered at the end."""


@dataclass
class SamplingParams:
    """How completions are drawn; one value for every request of a `generate` call."""

    temperature: float = 1.0
    """Logits are divided by this before the softmax. 0 means greedy decoding (argmax); the
    returned log-probs are then those of the untempered distribution (T = 1)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of most likely tokens whose probability
    reaches top_p (1.0: the full vocabulary). Does not change the returned log-probs."""
    top_k: int = -1
    """Draw from the k most likely tokens only (-1: all; 1: greedy). Applied before top_p.
    Does not change the returned log-probs."""
    max_new_tokens: int = 64
    """Most tokens generated per completion (the stop token included); a completion that
    reaches it ends with finish_reason "length"."""
    min_new_tokens: int = 0
    """Stop tokens cannot be drawn before this many tokens were generated (their logits are
    masked, and the returned log-probs are those of the masked distribution there)."""
    stop_token_ids: List[int] = field(default_factory=list)
    """A completion ends after generating any of these (the caller includes the EOS id)."""
    seed: Optional[int] = None
    """Seed of the sampling streams: the same seed, prompts and weights give the same
    completions. None: a fresh draw from the engine's own generator."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature: got {self.temperature}; "
                             "accepted: a number >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p: got {self.top_p}; accepted: (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens: got {self.max_new_tokens}; "
                             "accepted: an integer >= 1")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k: got {self.top_k}; accepted: -1 (all) or "
                             "an integer >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"SamplingParams.min_new_tokens: got {self.min_new_tokens}; "
                             f"accepted: 0 ... max_new_tokens ({self.max_new_tokens})")


@dataclass
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: List[int]
    """Generated tokens, the stop token included when one was hit."""
    logprobs: List[float]
    """log-prob of each generated token under softmax(logits / temperature) over the full
    vocabulary, before top-p truncation: the quantity megatron's
    `completion_logprobs(..., temperature=T)` computes (T = 1 when greedy)."""
    finish_reason: Literal["stop", "length", "abort"]
    """"stop": the last token is a stop token; "length": max_new_tokens was reached;
    "abort": cancelled part-way (only a server's cancelled request ends so)."""


class RolloutEngine(abc.ABC):
    """Samples completions from the policy or the momentum model; takes weight updates."""

    @abc.abstractmethod
    def generate(self, prompts: List[List[int]], n: int, params: SamplingParams,
                 model: str = "policy") -> List[List[Completion]]:
        """n completions of each prompt from weight set `model`; result[i][j] is prompt i's
        j-th. Raises WeightsNotReadyError if the set's last update did not complete."""

    @abc.abstractmethod
    def update_weights(self, model: str, buckets: Iterable[Bucket], version: int) -> None:
        """Replace weight set `model` with the HF-named tensors of `buckets`, consumed bucket
        by bucket (a lazy iterable: a producer never needs to hold the whole model). Every
        parameter must be covered; the version is stamped only after the last bucket. If the
        update fails midway the set's version becomes None and `generate` on it raises until
        a complete update succeeds."""

    def generation_order(self, models: Sequence[str]) -> List[str]:
        """The order to sample the weight sets of one step in that costs the fewest weight
        loads (an engine that holds both at once: as given)."""
        return list(models)

    def close(self) -> None:
        """Release servers and transfer state (an in-process engine has none)."""

    def release_memory(self) -> None:
        """Give the engine's accelerator memory back for training until the next weight load
        (servers colocated with training; others: nothing to do)."""

    @abc.abstractmethod
    def weight_version(self, model: str = "policy") -> Optional[int]:
        """The version of the last complete update of `model` (None: none yet, or the last one
        failed)."""


def check_weight_set(model: str) -> None:
    if model not in WEIGHT_SETS:
        raise ValueError(f"unknown weight set {model!r}; accepted: {' | '.join(WEIGHT_SETS)}")
