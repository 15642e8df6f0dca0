"""Output-directory helpers shared by the weight tools (`convert`, `fp8`).

A leaf module (standard library only), so that `fp8` can use them without importing `convert`,
which imports `push`, which imports `fp8`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Optional

# Files of an HF model directory that belong to its tokenizer (copied along with the weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "mgrpo_tokenizer.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.jinja")


class ConversionError(ValueError):
    """Bad input for a conversion, said in one line."""


@contextlib.contextmanager
def staged_dir(out_dir: str, overwrite: bool):
    """Yield `<out_dir>.tmp` to write into; rename it to `out_dir` on success, remove it on
    failure, so nothing half-written ever sits under the final name."""
    out_dir = out_dir.rstrip("/")
    if os.path.exists(out_dir) and not overwrite:
        raise ConversionError(f"{out_dir!r} exists; pass --force to replace it")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def copy_tokenizer(src_dir: Optional[str], dst_dir: str) -> None:
    if src_dir and os.path.isdir(src_dir):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
