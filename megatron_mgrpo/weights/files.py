"""Output-directory helpers shared by the weight tools (`convert`, `fp8`).

A leaf module (standard library only), so that `fp8` can use them without importing `convert`,
which imports `push`, which imports `fp8`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from typing import Optional

# Files of an HF model directory that belong to its tokenizer (copied along with the weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "mgrpo_tokenizer.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.jinja")


class ConversionError(ValueError):
    """Bad input for a conversion, said in one line."""


@contextlib.contextmanager
def tool_errors(tool: str, *kinds: type):
    """For a tool's main(): a ConversionError, one of `kinds` or an OSError (a read-only or full
    disk, ...) becomes one line `tool: message` on stderr and exit code 2, no traceback."""
    try:
        yield
    except (ConversionError, *kinds) as e:
        message = str(e)
    except OSError as e:
        message = os_error(e)
    else:
        return
    print(f"{tool}: {message}", file=sys.stderr)
    raise SystemExit(2)


def write_failure(cause: BaseException, path: str) -> BaseException:
    """What to raise for a write into `path` that failed with `cause`: an OSError as it is
    (naming `path` if it names nothing); torch.save's report of a short write (`unexpected pos
    N vs M`, what a full disk gives) as the OSError it stands for, ENOSPC when the disk holding
    `path` has (almost) no space left; anything else unchanged."""
    if isinstance(cause, OSError):
        if cause.filename is None:
            cause.filename = path
        return cause
    if isinstance(cause, RuntimeError) and "unexpected pos" in str(cause):
        free = _free_bytes(path)
        if free is not None and free < 2 ** 20:
            return OSError(errno.ENOSPC, f"No space left on device ({free} bytes free)", path)
        return OSError(errno.EIO, f"short write ({cause}; {free} bytes free)", path)
    return cause


def _free_bytes(path: str) -> Optional[int]:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def os_error(e: OSError, path: Optional[str] = None) -> str:
    """`path: cause` for an OSError (the path it names, else `path`)."""
    where = e.filename if e.filename is not None else path
    cause = e.strerror or str(e)
    return f"{where}: {cause}" if where is not None else cause


@contextlib.contextmanager
def staged_dir(out_dir: str, overwrite: bool):
    """Yield `<out_dir>.tmp` to write into; rename it to `out_dir` on success, remove it on
    failure, so nothing half-written ever sits under the final name. An output that cannot be
    written (a read-only parent, a regular file in the way) is a ConversionError before any
    work is done; with `overwrite`, the old directory is swapped out before it is removed, so a
    failed swap leaves the old one in place."""
    out_dir = out_dir.rstrip("/") or "/"
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"{out_dir!r} exists and is not a directory; remove it or choose "
                              "another output path (--force only replaces a directory)")
    if os.path.exists(out_dir) and not overwrite:
        raise ConversionError(f"{out_dir!r} exists; pass --force to replace it")
    tmp = out_dir + ".tmp"
    if os.path.lexists(tmp) and not os.path.isdir(tmp):
        raise ConversionError(f"{tmp!r} (the staging path) exists and is not a directory; "
                              "remove it")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as e:
        raise ConversionError(f"cannot write the output: {os_error(e, tmp)}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if os.path.exists(out_dir):
            # A fresh empty directory to swap the old output onto (rename replaces an empty one).
            old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old.",
                                   dir=os.path.dirname(os.path.abspath(out_dir)))
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except OSError as e:
        if old is not None:
            if not os.path.exists(out_dir):
                with contextlib.suppress(OSError):
                    os.replace(old, out_dir)
            with contextlib.suppress(OSError):
                os.rmdir(old)  # still empty when the first swap failed
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"cannot put the output in place: {os_error(e, out_dir)}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer(src_dir: Optional[str], dst_dir: str) -> None:
    if src_dir and os.path.isdir(src_dir):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
