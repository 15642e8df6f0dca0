"""safetensors files read and written tensor by tensor, with plain file I/O.

`safetensors.safe_open` memory-maps a file, and every page a read touches stays in the process's
resident set until the file is closed: converting a 70B shard that way costs the shard's size in
RSS. Here a tensor is read with one `readinto` into a buffer of its own size, and written with
one `write` after a header computed from the shapes alone, so a converter holds one tensor (and
what it is being fused with) at a time. The format: an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets}} padded to 8 bytes, then the data, contiguous.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file."""


def read_header(path: str) -> Tuple[Dict[str, dict], int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset of the data) of one file.

    The header is checked against itself and the file before any tensor is read: every
    tensor's byte range must hold exactly its shape in its dtype, the ranges must tile the
    data from its start without gaps or overlaps, and the file must be long enough. A file
    that fails (truncated, or a header that lies) is a SafetensorsError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise SafetensorsError(f"{path}: header length {n} exceeds the file's size "
                                       f"({size} bytes): truncated, or not a safetensors file")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    end = _check_entries(path, header)
    if 8 + n + end > size:
        raise SafetensorsError(f"{path}: truncated ({size} bytes, the header needs "
                               f"{8 + n + end})")
    return header, 8 + n


def _check_entries(path: str, header: Dict[str, object]) -> int:
    """Validate every entry's dtype, shape and byte range; returns the data's length."""
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise SafetensorsError(f"{where}: header entry needs dtype, shape and data_offsets")
        shape, offsets, code = entry["shape"], entry["data_offsets"], entry["dtype"]
        if code not in DTYPES:
            raise SafetensorsError(f"{where}: dtype {code!r} is not supported (accepted: "
                                   f"{', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise SafetensorsError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise SafetensorsError(f"{where}: bad data_offsets {offsets!r}")
        want = nbytes(shape, DTYPES[code])
        if offsets[1] - offsets[0] != want:
            raise SafetensorsError(f"{where}: its byte range {offsets} holds "
                                   f"{offsets[1] - offsets[0]} bytes, but shape {shape} in "
                                   f"{code} needs {want}: a corrupt or lying header")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, stop, name in sorted(spans):
        if begin != position:
            kind = "overlap" if begin < position else "gap"
            raise SafetensorsError(f"{path}: tensor {name!r} starts at byte {begin} of the data, "
                                   f"expected {position} ({kind} between tensors): a corrupt "
                                   "header")
        position = stop
    return position


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_tensor(f, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor from an open file, read into a buffer of exactly its size."""
    if entry["dtype"] not in DTYPES:
        raise SafetensorsError(f"dtype {entry['dtype']} is not supported")
    begin, end = entry["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(data_start + begin)
    if f.readinto(buf.numpy()) != end - begin:
        raise SafetensorsError(f"{getattr(f, 'name', 'file')}: short read")
    return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class StreamingWriter:
    """Writes one safetensors file whose tensors (names, shapes, dtypes) are known up front.

    The header goes first; `write(name, tensor)` must then come in the declared order. `close`
    checks that every declared tensor was written, so a short file is never left looking whole.
    """

    def __init__(self, path: str, layout: Sequence[Tuple[str, Sequence[int], torch.dtype]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = path
        self._order: List[Tuple[str, Tuple[int, ...], torch.dtype]] = [
            (n, tuple(s), d) for n, s, d in layout]
        header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dtype in self._order:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(path, "wb")
        self._next = 0
        self._write(struct.pack("<Q", len(blob)) + blob)

    def _write(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as e:  # a full disk names no file: name it
            if e.filename is None:
                e.filename = self.path
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, shape, dtype = self._order[self._next]
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{self.path}: expected {want_name} {list(shape)} {dtype}, got "
                             f"{name} {list(tensor.shape)} {tensor.dtype}")
        if tensor.numel():
            self._write(memoryview(tensor.detach().contiguous().reshape(-1)
                                   .view(torch.uint8).numpy()))
        self._next += 1

    def discard(self) -> None:
        """Close the file after a failure (no completeness check; the caller removes it)."""
        try:
            self._f.close()
        except OSError:
            pass

    def close(self) -> None:
        try:
            self._f.close()  # flushes: a full disk may show only here
        except OSError as e:
            if e.filename is None:
                e.filename = self.path
            raise
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: {len(self._order) - self._next} declared tensors "
                             "were never written")
