"""Graded arithmetic word problems for a small instruct model, written deterministically.

    python tools/make_arith_tasks.py --out runs/arith   # runs/arith/<set>[_open][_val].jsonl

For each set, `<set>_val.jsonl` holds the first `--n-val` problems (64: the base measurements
and validation) and `<set>.jsonl` the next `--n` (256: training prompts), all distinct. Each
problem is written twice, as an open question and as multiple choice.

Open answers (`<set>_open[_val].jsonl`, `algorithm.grader: final_number`): rows of
`{"id", "question", "answer", "prompt"}` with the true number as `answer` (GSM8K's columns, so
`mgrpo eval --benchmarks gsm8k --eval.paths "{gsm8k: FILE}"` scores a file) and `prompt` the
question under OPEN_TEMPLATE (the gsm8k benchmark's default template), the text training sees.

Four-option multiple choice (`algorithm.grader: multiple_choice`): SmolLM2-135M-Instruct wrote
no `\\boxed{}` in 48 greedy answers to 8 phrasings of a boxed request (2 problems per set, up
to 64 new tokens; README), but it does name an option ("The correct answer is B"), which
`extract_choice` reads. Each row has

- `prompt`: the text the model sees (TEMPLATE below filled in), `answer`: the correct letter
  (evaluation and reporting only: the label-free modes never read it), `value`: the number;
- the same problem in GPQA's schema (`Question`, `Correct Answer`, `Incorrect Answer 1-3`,
  `Record ID`), so `mgrpo eval` scores a file as `gpqa_diamond` through `eval.paths` with
  `eval.templates: {gpqa_diamond: TEMPLATE}`: its option order (`random.Random(f"{seed}:{Record
  ID}")`, eval.seed 0) is the one written into `prompt`, so both see the same text.

Sets, easiest first:

| set | problem |
| --- | --- |
| add | one step: add or subtract two numbers below 50 |
| two_step | two steps: a number below 50, plus one and minus another |
| mul | one step: a count of groups times the items in each (2-9 x 2-12) |

The same `--seed`, `--n` and `--n-val` write the same bytes on every machine
(`random.Random(f"{seed}:{set}")`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Callable, Dict, List, Tuple

OPEN_TEMPLATE = "{question}\nGive the final answer as a number."
TEMPLATE = ("{question}\nA) {A}\nB) {B}\nC) {C}\nD) {D}\n"
            "Reply in the form 'Answer: X', where X is the letter of the correct option.")
NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ida", "Jon", "Kim", "Leo"]
ITEMS = ["apples", "pens", "books", "stickers", "marbles", "cards", "shells", "coins"]
BOXES = ["box", "bag", "jar", "basket", "pack", "shelf"]


def _add(r: random.Random) -> Tuple[str, int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(10, 49), r.randint(2, 29)
    ask = f"How many {item} does {name} have now?"
    if r.random() < 0.5:
        return f"{name} has {a} {item}. {name} gets {b} more. {ask}", a + b
    a = max(a, b + 1)
    return f"{name} has {a} {item}. {name} gives away {b}. {ask}", a - b


def _two_step(r: random.Random) -> Tuple[str, int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(10, 49), r.randint(2, 29), r.randint(2, 19)
    return (f"{name} has {a} {item}. {name} gets {b} more, then gives away {c}. How many {item} "
            f"does {name} have now?", a + b - c)


def _mul(r: random.Random) -> Tuple[str, int]:
    item, box = r.choice(ITEMS), r.choice(BOXES)
    n, each = r.randint(2, 9), r.randint(2, 12)
    plural = box + ("es" if box.endswith(("x", "f")) else "s")
    plural = "shelves" if box == "shelf" else plural
    return f"Each {box} holds {each} {item}. How many {item} are in {n} {plural}?", n * each


SETS: Dict[str, Callable[[random.Random], Tuple[str, int]]] = {
    "add": _add, "two_step": _two_step, "mul": _mul}


def _wrong(r: random.Random, answer: int) -> list:
    """Three distinct wrong values near `answer` (off by one, by ten, a slip), all >= 0."""
    out: list = []
    while len(out) < 3:
        v = answer + r.choice([-10, -2, -1, 1, 2, 10, 11, -11, 5, -5])
        if v >= 0 and v != answer and v not in out:
            out.append(v)
    return out


def make_set(name: str, n: int, seed: int, eval_seed: int = 0) -> List[dict]:
    """`n` distinct problems of set `name`, in generation order."""
    r, rows, seen = random.Random(f"{seed}:{name}"), [], set()
    while len(rows) < n:
        text, answer = SETS[name](r)
        if text in seen:
            continue
        seen.add(text)
        rid, wrong = f"{name}-{len(rows)}", _wrong(r, answer)
        options = [str(answer)] + [str(w) for w in wrong]
        random.Random(f"{eval_seed}:{rid}").shuffle(options)  # evaluation.benchmarks._gpqa
        letter = "ABCD"[options.index(str(answer))]
        rows.append({"Record ID": rid, "prompt": TEMPLATE.format(question=text,
                                                                 **dict(zip("ABCD", options))),
                     "answer": letter, "value": str(answer), "Question": text,
                     "Correct Answer": str(answer),
                     **{f"Incorrect Answer {i + 1}": str(w) for i, w in enumerate(wrong)}})
    return rows


def open_row(row: dict) -> dict:
    """The open-answer form of a `make_set` row."""
    return {"id": row["Record ID"], "question": row["Question"], "answer": row["value"],
            "prompt": OPEN_TEMPLATE.format(question=row["Question"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for <set>.jsonl")
    p.add_argument("--n", type=int, default=256, help="training problems per set")
    p.add_argument("--n-val", type=int, default=64, help="validation problems per set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated: {', '.join(SETS)}")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.sets.split(","):
        if name not in SETS:
            raise SystemExit(f"unknown set {name!r}; accepted: {', '.join(SETS)}")
        rows = make_set(name, args.n_val + args.n, args.seed)
        open_rows = [open_row(row) for row in rows]
        for kind, written in (("", rows), ("_open", open_rows)):
            for suffix, part in (("_val", written[:args.n_val]), ("", written[args.n_val:])):
                path = os.path.join(args.out, f"{name}{kind}{suffix}.jsonl")
                with open(path, "w") as f:
                    for row in part:
                        f.write(json.dumps(row) + "\n")
                print(f"{path}: {len(part)} problems")


if __name__ == "__main__":
    main()
