"""One tokenizer interface, two backends: a sentencepiece `.model` file, or an HF tokenizer dir.

    tok = load_tokenizer("runs/tiny_base")       # a dir or a .model file; picks the backend
    ids = encode_prompt(tok, row["prompt"])       # what the policy sees (BOS added if the
                                                  # tokenizer has one); the trainer and the
                                                  # warm-up both use this one function
    text = tok.decode(completion_ids)             # special tokens (BOS/EOS/PAD) dropped

`encode` never adds special tokens; `encode_prompt` adds BOS when the tokenizer defines one
(sentencepiece: yes; Qwen's HF tokenizers: no). `encode_prompt(tok, text, chat_template=True)`
instead renders the text as one user turn with the tokenizer's chat template and the generation
prompt (`apply_chat_template(..., add_generation_prompt=True)`'s ids; the template writes its own
start tokens, so no BOS is prepended): what an instruct model expects (`data.chat_template`,
`eval.chat_template`). A completion is generated after the prompt's ids and ends at the first
`eos_id` (`stop_ids` lists every id that ends a completion). Completions are decoded on their
own (`decode(completion_ids)`), not re-split from the prompt + completion.

`train_sentencepiece` builds the tokenizer of the synthetic task: BPE with digits split (every
number is a run of digit tokens, so arithmetic is done digit by digit), byte fallback (nothing is
ever unknown: unseen characters become their UTF-8 bytes), no normalisation (decode(encode(t))
== t exactly), and `\\boxed{` as one token. `SentencePieceTokenizer.save(dir)` writes the
`.model` file as `tokenizer.model`, a marker `mgrpo_tokenizer.json` that makes `load_tokenizer`
pick this backend, and an equivalent HF fast tokenizer (`tokenizer.json`, checked to encode the
same) so the model dir also loads with `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from typing import Iterable, List, Optional, Sequence

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer",
           "train_sentencepiece", "encode_prompt", "chat_prompt_ids", "TokenizerError",
           "DEFAULT_USER_SYMBOLS"]

MARKER = "mgrpo_tokenizer.json"
SP_FILE = "tokenizer.model"
# `\boxed{` as one token keeps completions short; ",▁" is the ", " between worked steps
# (sentencepiece matches user symbols after turning spaces into ▁).
DEFAULT_USER_SYMBOLS = ("\\boxed{", "\u2581\\boxed{", ",\u2581")


class TokenizerError(ValueError):
    """A tokenizer path is missing or holds no tokenizer we can load."""


class Tokenizer(ABC):
    """Text <-> token ids. `encode` adds no special tokens; `decode` drops them."""

    bos_id: Optional[int]
    """Beginning-of-sequence id, or None when the tokenizer has none (then prompts get none)."""
    eos_id: int
    """End of a completion."""
    pad_id: int
    """Padding id (never attended to; the EOS id when the tokenizer has no pad token)."""
    vocab_size: int
    """Number of ids the tokenizer can produce (the model's vocab must be at least this)."""

    @abstractmethod
    def encode(self, text: str) -> List[int]:
        """Token ids of `text`, no BOS/EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens (BOS, EOS, PAD) dropped."""

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write the tokenizer into `directory` so that `load_tokenizer(directory)` loads it."""

    @property
    def stop_ids(self) -> List[int]:
        """Ids that end a completion."""
        return [self.eos_id]

    @property
    def special_ids(self) -> set:
        return {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}


def encode_prompt(tokenizer: Tokenizer, text: str, chat_template: bool = False) -> List[int]:
    """A prompt's ids as the policy sees them: [BOS] + encode(text) (no BOS if there is none),
    or with `chat_template` the tokenizer's chat template around one user message, generation
    prompt included (TokenizerError when the tokenizer has no template).

    The only place the prompt format meets the tokenizer: the warm-up, the evaluation and the
    trainer all call it, so they agree. The completion follows these ids directly.
    """
    if chat_template:
        return chat_prompt_ids(tokenizer, text)
    ids = tokenizer.encode(text)
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids


def chat_prompt_ids(tokenizer: Tokenizer, text: str) -> List[int]:
    """`apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)`'s
    ids: the template's own start tokens, no extra BOS."""
    hf = getattr(tokenizer, "tok", None)
    if hf is None or not getattr(hf, "chat_template", None):
        raise TokenizerError("chat_template is true but the tokenizer has no chat template (an "
                             "HF tokenizer dir with chat_template.jinja or tokenizer_config.json's "
                             "chat_template); set data.chat_template / eval.chat_template false")
    ids = hf.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                 add_generation_prompt=True)
    # transformers 5 returns a BatchEncoding (a mapping), 4.x a list of ids
    return [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file."""

    def __init__(self, model_file: str):
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise TokenizerError(f"no sentencepiece model at {model_file!r}")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"{model_file}: the sentencepiece model defines no EOS piece")
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self._special = self.special_ids

    def encode(self, text: str) -> List[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) not in self._special])

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, SP_FILE)
        if os.path.abspath(target) != os.path.abspath(self.model_file):
            shutil.copyfile(self.model_file, target)
        with open(os.path.join(directory, MARKER), "w") as f:
            json.dump({"backend": "sentencepiece", "model_file": SP_FILE}, f, indent=2)
        self._save_hf(directory)

    def to_hf(self):
        """An equivalent `transformers` fast tokenizer (same ids for the same text)."""
        from tokenizers import Tokenizer as RawTokenizer  # noqa: F401  (dependency of transformers)
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        model_pb2 = import_protobuf()
        proto = model_pb2.ModelProto()
        with open(self.model_file, "rb") as f:
            proto.ParseFromString(f.read())
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        raw = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
        names = {i: self.sp.id_to_piece(i) for i in (self.bos_id, self.eos_id, self.pad_id)
                 if i is not None}
        return PreTrainedTokenizerFast(
            tokenizer_object=raw, bos_token=names.get(self.bos_id), eos_token=names[self.eos_id],
            pad_token=names.get(self.pad_id), unk_token=self.sp.id_to_piece(self.sp.unk_id()),
            clean_up_tokenization_spaces=False)

    def _save_hf(self, directory: str, probe: Iterable[str] = ()) -> bool:
        """Write tokenizer.json & co. if the HF conversion encodes a probe text identically."""
        try:
            hf = self.to_hf()
        except Exception:  # an optional extra; the .model file is the source of truth
            return False
        probe = list(probe) or ["Q: Ann has 23 pens. She buys 15 more. How many pens now? A:",
                                " 23+15=38, 38-7=31, \\boxed{31}",
                                "héllo wörld ✓ 12 \\boxed{x}"]
        if any(hf.encode(t, add_special_tokens=False) != self.encode(t) for t in probe):
            return False
        hf.save_pretrained(directory)
        return True


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory (loaded offline with `AutoTokenizer`)."""

    def __init__(self, directory: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as e:
            raise TokenizerError(f"cannot load an HF tokenizer from {directory!r}: {e}") from None
        self.directory = directory
        if self.tok.eos_token_id is None:
            raise TokenizerError(f"{directory}: the tokenizer defines no eos_token")
        self.eos_id = int(self.tok.eos_token_id)
        self.bos_id = None if self.tok.bos_token_id is None else int(self.tok.bos_token_id)
        self.pad_id = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None \
            else self.eos_id
        self.vocab_size = len(self.tok)
        self._special = set(self.tok.all_special_ids) | self.special_ids

    def encode(self, text: str) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) not in self._special],
                               skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @property
    def stop_ids(self) -> List[int]:
        """EOS plus the generation config's extra EOS ids (e.g. Qwen's `<|im_end|>`)."""
        ids = [self.eos_id]
        path = os.path.join(self.directory, "generation_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                extra = json.load(f).get("eos_token_id")
            for i in extra if isinstance(extra, list) else [extra]:
                if isinstance(i, int) and i not in ids:
                    ids.append(i)
        return ids

    def save(self, directory: str) -> None:
        self.tok.save_pretrained(directory)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at `path`: a sentencepiece `.model` file, a dir written by
    `SentencePieceTokenizer.save` (marker `mgrpo_tokenizer.json`), or an HF tokenizer dir."""
    if not path or not os.path.exists(path):
        raise TokenizerError(f"tokenizer path {path!r} does not exist (data.tokenizer: give a "
                             "sentencepiece .model file or a directory with tokenizer files)")
    if os.path.isfile(path):
        if path.endswith(".model"):
            return SentencePieceTokenizer(path)
        raise TokenizerError(f"{path!r}: expected a sentencepiece .model file or a directory")
    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            meta = json.load(f)
        if meta.get("backend") != "sentencepiece":
            raise TokenizerError(f"{marker}: unknown backend {meta.get('backend')!r}")
        return SentencePieceTokenizer(os.path.join(path, meta.get("model_file", SP_FILE)))
    return HFTokenizer(path)


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int = 512,
                        user_defined_symbols: Sequence[str] = DEFAULT_USER_SYMBOLS,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
    """Train a sentencepiece model on `texts`; writes `<model_prefix>.model` (and `.vocab`).

    Ids: 0 `<unk>`, 1 `<s>` (BOS), 2 `</s>` (EOS), 3 `<pad>`, then the user symbols. Byte
    fallback takes 256 ids, so `vocab_size` must exceed 260 + the distinct characters; the
    result may be smaller than asked when the texts support fewer merges. Digits are split,
    text is not normalised (round trips are exact) and no dummy space is prefixed, so a prompt's
    ids followed by its completion's ids are the ids of the two texts encoded separately.
    """
    import sentencepiece as spm

    directory = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(directory, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type=model_type, split_digits=True, byte_fallback=True, character_coverage=1.0,
        user_defined_symbols=list(user_defined_symbols), normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, shuffle_input_sentence=False,
        minloglevel=2)
    return SentencePieceTokenizer(model_prefix + ".model")
