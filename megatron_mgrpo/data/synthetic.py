"""A synthetic reasoning task the project generates itself: short multi-step word problems.

Each problem starts a count, changes it a few times and asks for the result:

    prompt:    "Q: Ann has 23 pens. She buys 15 more. She gives away 7. How many pens now? A:"
    solution:  " 23+15=38, 38-7=31, \\boxed{31}"
    answer:    "31"

The prompt is plain text (no chat template); the completion is generated right after it, is the
worked steps one equation per operation, and ends with `\\boxed{N}` (then EOS). Its final answer is
`extract_boxed(completion)`. The operations are `+` (buys / finds / gets ... more), `-` (gives
away / loses / sells) and `*` (doubles / triples them: `38*2=76`); every intermediate count and
the answer stay within [0, `max_value`], so every problem has one non-negative integer answer.

Splits, all from one seed, disjoint by prompt text (`write_task`):

- `sft.jsonl`: warm-up data. Its `solution` is NOISY: in a fraction `noise` of the rows the
  boxed final answer is replaced by a uniformly random wrong value in [0, max_value] (the
  equations before it stay right). Such errors scatter, so a model trained on them answers each
  prompt with its own result or with one of many different wrong values; a majority vote over
  its samples is then right much more often than one sample is (maj@k well above pass@1),
  which is what self-training needs (docs/design.md, "When self-training can work at all").
  `answer` stays the true answer and `noisy` says which rows were corrupted.
- `train.jsonl`: the RL prompts. `answer` is the true answer, used only for reporting (and by
  mode rlvr); `solution` is the clean worked solution, never trained on by self-supervised RL.
- `val.jsonl`: held-out prompts with true answers and clean solutions.

`solve(prompt)` recomputes the answer from the prompt text alone (a tiny parser), which tests
use as an independent check of the generator.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["TaskSpec", "Problem", "generate_problem", "render_solution", "solve",
           "make_splits", "write_task", "BOXED"]

BOXED = "\\boxed{"

NAMES = [("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dan", "He"), ("Eve", "She"),
         ("Finn", "He"), ("Gina", "She"), ("Hugo", "He"), ("Ivy", "She"), ("Jack", "He"),
         ("Kate", "She"), ("Leo", "He"), ("Mia", "She"), ("Noah", "He"), ("Olga", "She"),
         ("Paul", "He")]
ITEMS = ["pens", "apples", "cards", "coins", "books", "shells", "stamps", "marbles", "beads",
         "stickers", "cookies", "flowers"]
ADD_VERBS = ["buys {n} more", "finds {n} more", "gets {n} more", "wins {n} more"]
SUB_VERBS = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"]
MUL_VERBS = {2: "doubles them", 3: "triples them"}
OPS = ("+", "-", "*")


@dataclass(frozen=True)
class TaskSpec:
    """Shape of the task. The defaults are what `tools/prepare_tiny.py` uses."""

    min_steps: int = 2
    """Fewest operations per problem."""

    max_steps: int = 2
    """Most operations per problem."""

    max_value: int = 199
    """Start value, every intermediate count and the answer lie in [0, max_value]; wrong
    answers of the noisy warm-up data are drawn uniformly from the same range."""

    max_operand: int = 99
    """Largest number added or subtracted in one step."""

    multiply_prob: float = 0.2
    """Chance that a step is a doubling / tripling (when the result stays in range)."""

    noise: float = 0.5
    """Fraction of `sft.jsonl` solutions whose boxed answer is a random wrong value."""


@dataclass(frozen=True)
class Problem:
    """One problem: a start count and a list of (op, operand) steps."""

    name: str
    pronoun: str
    item: str
    start: int
    steps: Tuple[Tuple[str, int], ...]
    phrasings: Tuple[int, ...] = field(default=())
    """Index of the verb phrase chosen for each step (for + and -)."""

    def values(self) -> List[int]:
        """The count after each step (the last one is the answer)."""
        out, v = [], self.start
        for op, n in self.steps:
            v = apply(op, v, n)
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def prompt(self) -> str:
        parts = [f"Q: {self.name} has {self.start} {self.item}."]
        for i, (op, n) in enumerate(self.steps):
            pron = self.pronoun
            if op == "*":
                phrase = MUL_VERBS[n]
            else:
                verbs = ADD_VERBS if op == "+" else SUB_VERBS
                phrase = verbs[self.phrasings[i] % len(verbs)].format(n=n)
            parts.append(f"{pron} {phrase}.")
        parts.append(f"How many {self.item} now? A:")
        return " ".join(parts)


def apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown op {op!r}")


def render_solution(problem: Problem, boxed: Optional[int] = None) -> str:
    """The worked solution, ` a+b=c, c-d=e, \\boxed{e}`; `boxed` overrides the final answer
    (the equations stay right)."""
    values = problem.values()
    eqs, prev = [], problem.start
    for (op, n), v in zip(problem.steps, values):
        eqs.append(f"{prev}{op}{n}={v}")
        prev = v
    final = values[-1] if boxed is None else boxed
    return " " + ", ".join(eqs) + f", {BOXED}{final}}}"


def generate_problem(rng: random.Random, spec: TaskSpec) -> Problem:
    """Draw one problem whose every count stays in [0, spec.max_value]."""
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    num_steps = rng.randint(spec.min_steps, spec.max_steps)
    v = start = rng.randint(1, min(spec.max_value, 99))
    steps, phrasings = [], []
    for _ in range(num_steps):
        candidates = []
        if rng.random() < spec.multiply_prob:
            candidates = [("*", k) for k in (2, 3) if v * k <= spec.max_value and v > 1]
        if not candidates:
            op = rng.choice(("+", "-"))
            if op == "-" and v < 2:
                op = "+"
            if op == "+" and v >= spec.max_value:
                op = "-"
            if op == "+":
                hi = min(spec.max_operand, spec.max_value - v)
            else:
                hi = min(spec.max_operand, v)
            candidates = [(op, rng.randint(1, hi))]
        op, n = rng.choice(candidates)
        steps.append((op, n))
        phrasings.append(rng.randrange(4))
        v = apply(op, v, n)
    return Problem(name, pronoun, item, start, tuple(steps), tuple(phrasings))


_START = re.compile(r"^Q: \w+ has (\d+) \w+\.")
_STEP = re.compile(r"(?:(buys|finds|gets|wins) (\d+) more|(gives away|loses|sells|uses) (\d+)|"
                   r"(doubles|triples) them)\.")


def solve(prompt: str) -> int:
    """The answer recomputed from the prompt text alone (independent of the generator)."""
    m = _START.match(prompt)
    if m is None:
        raise ValueError(f"not a task prompt: {prompt!r}")
    v = int(m.group(1))
    for s in _STEP.finditer(prompt[m.end():]):
        if s.group(1):
            v += int(s.group(2))
        elif s.group(3):
            v -= int(s.group(4))
        else:
            v *= 2 if s.group(5) == "doubles" else 3
    return v


def _row(problem: Problem, solution: str, noisy: Optional[bool] = None) -> Dict:
    row = {"prompt": problem.prompt, "answer": str(problem.answer), "solution": solution}
    if noisy is not None:
        row["noisy"] = noisy
    return row


def make_splits(n_train: int, n_val: int, seed: int, n_sft: int = 0,
                spec: TaskSpec = TaskSpec()) -> Dict[str, List[Dict]]:
    """Rows of each split, {"val", "train", "sft"}, disjoint by prompt and deterministic.

    Val is drawn first, so a given seed's val set does not change with n_train or n_sft.
    """
    rng = random.Random(seed)
    noise_rng = random.Random(seed * 1_000_003 + 17)
    seen: set = set()
    out: Dict[str, List[Dict]] = {"val": [], "train": [], "sft": []}
    for split, n in (("val", n_val), ("train", n_train), ("sft", n_sft)):
        tries = 0
        while len(out[split]) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct {split} problems from {spec}")
            problem = generate_problem(rng, spec)
            if problem.prompt in seen:
                continue
            seen.add(problem.prompt)
            if split != "sft":
                out[split].append(_row(problem, render_solution(problem)))
                continue
            noisy = noise_rng.random() < spec.noise
            boxed = None
            if noisy:
                boxed = noise_rng.randint(0, spec.max_value - 1)
                if boxed >= problem.answer:  # uniform over the range without the true answer
                    boxed += 1
            out[split].append(_row(problem, render_solution(problem, boxed), noisy))
    return out


def write_jsonl(path: str, rows: Sequence[Dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_task(out_dir: str, n_train: int, n_val: int, seed: int, n_sft: int = 0,
               spec: TaskSpec = TaskSpec()) -> Dict[str, str]:
    """Write `train.jsonl`, `val.jsonl` (and `sft.jsonl` when n_sft > 0) and `task.json` (the
    spec and sizes) to out_dir. Rows are {"prompt", "answer", "solution"} (+ "noisy" in sft).
    Returns {split: path}."""
    os.makedirs(out_dir, exist_ok=True)
    splits = make_splits(n_train, n_val, seed, n_sft, spec)
    paths = {}
    for split, rows in splits.items():
        if split == "sft" and n_sft == 0:
            continue
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        write_jsonl(paths[split], rows)
    with open(os.path.join(out_dir, "task.json"), "w") as f:
        json.dump({"seed": seed, "n_train": n_train, "n_val": n_val, "n_sft": n_sft,
                   "spec": asdict(spec)}, f, indent=2)
    return paths
