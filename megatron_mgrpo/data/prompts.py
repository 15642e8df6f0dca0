"""Prompt datasets: load and validate local jsonl / parquet files; a resumable prompt sampler.

    prompts = load_prompts("runs/tiny_base/data/train.jsonl", "prompt", "answer", tokenizer, 128)
    # train.jsonl: 5000 rows, 0 skipped
    sampler = PromptSampler(prompts, batch_size=8, seed=1234, shuffle=True)
    batch = sampler.next_batch()          # list of PromptExample (index, prompt, answer, ids)
    state = sampler.state_dict()          # {"epoch", "position", ...}: put it in the checkpoint

How files are read (offline, nothing is downloaded):

- `.jsonl` (also `.json` holding JSON lines) is read line by line here, one `json.loads` per line,
  not through `datasets`: its json loader fails on the first malformed line as a whole, and we
  want to skip and count bad lines instead. Blank lines are ignored (not rows). Only "\n" ends
  a row (U+2028, U+0085 and the like may sit inside a valid row's strings).
- Text files are read as strict UTF-8 (a leading BOM is allowed): a file in another encoding
  is a `DataError` naming the line where decoding fails, never silently altered.
- `.json` holding one JSON array of objects is read with `json.load`.
- `.parquet` goes through `datasets.load_dataset("parquet", data_files=..., split="train")`,
  `.csv` (GPQA's release format) likewise through its "csv" loader.

Every row is validated; a bad row is skipped and counted under one reason, and the loader prints
one line per file, e.g. `train.jsonl: 1000 rows, 3 skipped (2 malformed json, 1 over
max_prompt_length=128)`. Reasons: `malformed json` (not JSON, or not an object), `missing
<prompt_key>`, `non-string <prompt_key>`, `empty <prompt_key>` (blank after stripping), `missing
<answer_key>`, `non-string <answer_key>` (ints and floats are accepted and turned into strings:
math datasets often store numeric answers), `over max_prompt_length=N` (more than N tokens after
`encode_prompt`). A missing file, an unknown extension or no usable row raises `DataError`
naming the file and what to do; so does a file that cannot be read (permissions, a corrupt
parquet file, ...).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from megatron_mgrpo.data.tokenizer import Tokenizer, encode_prompt

__all__ = ["DataError", "PromptExample", "PromptSet", "load_prompts", "read_rows",
           "PromptSampler"]

MALFORMED = "malformed json"


class DataError(ValueError):
    """A prompt file is missing, unreadable or has no usable rows; the message says which
    file and what to do."""


@dataclass(frozen=True)
class PromptExample:
    """One validated prompt."""

    index: int
    """Position in the PromptSet (stable: the sampler and checkpoints refer to it)."""

    prompt: str
    """The prompt text."""

    answer: Optional[str]
    """The true answer (reporting / RLVR only), or None when no answer_key was asked for."""

    prompt_ids: Optional[List[int]]
    """`encode_prompt(tokenizer, prompt)`, or None when loaded without a tokenizer."""


@dataclass
class PromptSet:
    """The usable rows of one file, and what was skipped."""

    path: str
    prompts: List[str]
    answers: List[Optional[str]]
    prompt_ids: Optional[List[List[int]]]
    num_rows: int
    """Rows read (non-blank lines for jsonl), usable or not."""
    skipped: Counter = field(default_factory=Counter)
    """Reason -> number of rows skipped for it."""

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> PromptExample:
        return PromptExample(i, self.prompts[i], self.answers[i],
                             None if self.prompt_ids is None else self.prompt_ids[i])

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """`name: N rows, K skipped (a reason1, b reason2)`."""
        name = os.path.basename(self.path)
        text = f"{name}: {self.num_rows} rows, {self.num_skipped} skipped"
        if self.skipped:
            reasons = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
            text += " (" + ", ".join(f"{n} {reason}" for reason, n in reasons) + ")"
        return text


def read_rows(path: str) -> Tuple[List[Optional[Dict[str, Any]]], str]:
    """The rows of a jsonl / json / parquet file, in order; a malformed jsonl line is None.
    Returns (rows, format)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file; point data.train_path / data.val_path at a local "
                        ".jsonl or .parquet file (`python tools/prepare_tiny.py --out "
                        "runs/tiny_base` writes the tiny demo's)")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; give a .jsonl or .parquet file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: not readable (permission denied)")
    lower = path.lower()
    if lower.endswith((".parquet", ".csv")):
        kind = "parquet" if lower.endswith(".parquet") else "csv"
        if kind == "csv":
            _read_text(path)  # strict UTF-8, the failing line named (not pandas' byte offset)
        return _read_with_datasets(path, kind), kind
    if lower.endswith((".jsonl", ".json")):
        text = _read_text(path)
        if lower.endswith(".json") and text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e}); fix the file or write it as "
                                "JSON lines (.jsonl), where bad lines are skipped") from None
            return [r if isinstance(r, dict) else None for r in data], "json"
        rows: List[Optional[Dict[str, Any]]] = []
        # Only "\n" ends a row (JSON lines): str.splitlines would also split on U+2028,
        # U+2029, U+0085, \x0b, \x0c and \x1c-\x1e, which may sit inside a valid row.
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            rows.append(row if isinstance(row, dict) else None)
        return rows, "jsonl"
    raise DataError(f"{path}: unknown file type; accepted: .jsonl, .json, .parquet, .csv")


def _read_text(path: str) -> str:
    """The file as strict UTF-8 (a leading BOM is dropped); DataError naming the line where
    decoding fails, never a silently altered prompt."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{column}); re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t "
                        "utf-8`)") from None


def _read_with_datasets(path: str, kind: str) -> List[Dict[str, Any]]:
    import datasets

    quiet = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=os.path.abspath(path), split="train")
    except Exception as e:  # a corrupt file, or not of its extension's format
        raise DataError(f"{path}: cannot read as {kind} ({type(e).__name__}: {e})") from None
    finally:
        if quiet:
            datasets.enable_progress_bars()
    return ds.to_list()


def _answer_text(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def load_prompts(path: str, prompt_key: str = "prompt", answer_key: Optional[str] = "answer",
                 tokenizer: Optional[Tokenizer] = None, max_prompt_length: Optional[int] = None,
                 log: Optional[Callable[[str], None]] = print, chat_template: bool = False
                 ) -> PromptSet:
    """Load and validate the prompts of `path` (see the module docstring for the rules).

    `answer_key=None` loads prompts only. With a tokenizer, prompts are encoded with
    `encode_prompt` (kept in `PromptSet.prompt_ids`; `chat_template`: as one user turn of the
    tokenizer's chat template) and those longer than `max_prompt_length` tokens (template
    included) are skipped. `log` gets the one-line summary (None: silent).
    """
    rows, _ = read_rows(path)
    if max_prompt_length is not None and tokenizer is None:
        raise ValueError("max_prompt_length needs a tokenizer to count tokens")
    prompts: List[str] = []
    answers: List[Optional[str]] = []
    ids_list: Optional[List[List[int]]] = [] if tokenizer is not None else None
    skipped: Counter = Counter()
    for row in rows:
        if row is None:
            skipped[MALFORMED] += 1
            continue
        if prompt_key not in row or row[prompt_key] is None:
            skipped[f"missing {prompt_key}"] += 1
            continue
        prompt = row[prompt_key]
        if not isinstance(prompt, str):
            skipped[f"non-string {prompt_key}"] += 1
            continue
        if not prompt.strip():
            skipped[f"empty {prompt_key}"] += 1
            continue
        answer = None
        if answer_key is not None:
            if answer_key not in row or row[answer_key] is None:
                skipped[f"missing {answer_key}"] += 1
                continue
            answer = _answer_text(row[answer_key])
            if answer is None:
                skipped[f"non-string {answer_key}"] += 1
                continue
        if tokenizer is not None:
            ids = encode_prompt(tokenizer, prompt, chat_template)
            if max_prompt_length is not None and len(ids) > max_prompt_length:
                skipped[f"over max_prompt_length={max_prompt_length}"] += 1
                continue
            ids_list.append(ids)
        prompts.append(prompt)
        answers.append(answer)
    result = PromptSet(path, prompts, answers, ids_list, len(rows), skipped)
    if log is not None:
        log(result.summary())
    if not prompts:
        hint = (f"check data.prompt_key={prompt_key!r}"
                + (f" and data.answer_key={answer_key!r} (null if the file has no answers)"
                   if answer_key is not None else ""))
        if max_prompt_length is not None and any(k.startswith("over") for k in skipped):
            hint += f", or raise data.max_prompt_length={max_prompt_length}"
        raise DataError(f"{path}: no usable prompts ({result.summary()}); {hint}")
    return result


class PromptSampler:
    """Deterministic, resumable batches of prompts.

    Epoch e visits every prompt once, in `random.Random(seed + 1_000_003 * e)`'s shuffle (or
    in file order without `shuffle`). A batch that runs past the end of an epoch is completed
    from the start of the next one, so every batch has `batch_size` prompts. `state_dict()` is
    (epoch, position); a sampler restored from it continues with exactly the batches the saved
    one would have produced.
    """

    def __init__(self, prompt_set: PromptSet, batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(prompt_set) == 0:
            raise DataError(f"{prompt_set.path}: no prompts to sample from")
        self.prompt_set = prompt_set
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: Optional[List[int]] = None
        self._order_epoch = -1

    def _epoch_order(self) -> List[int]:
        if self._order_epoch != self.epoch:
            order = list(range(len(self.prompt_set)))
            if self.shuffle:
                random.Random(self.seed + 1_000_003 * self.epoch).shuffle(order)
            self._order, self._order_epoch = order, self.epoch
        return self._order

    def next_indices(self) -> List[int]:
        """Indices into the PromptSet of the next batch."""
        out: List[int] = []
        while len(out) < self.batch_size:
            order = self._epoch_order()
            take = order[self.position:self.position + self.batch_size - len(out)]
            out += take
            self.position += len(take)
            if self.position >= len(order):
                self.epoch += 1
                self.position = 0
        return out

    def next_batch(self) -> List[PromptExample]:
        """The next `batch_size` prompts."""
        return [self.prompt_set[i] for i in self.next_indices()]

    def peek_batch(self) -> List[PromptExample]:
        """The batch `next_batch` will return next, without moving on."""
        epoch, position = self.epoch, self.position
        try:
            return self.next_batch()
        finally:
            self.epoch, self.position = epoch, position

    def __iter__(self) -> Iterator[List[PromptExample]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_prompts": len(self.prompt_set),
                "batch_size": self.batch_size}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from `state`. The prompt set, seed and shuffle must be those it was saved
        with (else the order would differ): a mismatch raises DataError."""
        for key, mine in (("num_prompts", len(self.prompt_set)), ("seed", self.seed),
                          ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise DataError(f"{self.prompt_set.path}: cannot resume the prompt order: the "
                                f"checkpoint has {key}={state[key]!r}, this run {mine!r} (use "
                                "the same data file and seed, or start without resume)")
        if not 0 <= int(state["position"]) < len(self.prompt_set) or int(state["epoch"]) < 0:
            raise DataError(f"{self.prompt_set.path}: bad sampler state {state!r}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
