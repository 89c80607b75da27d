"""The safetensors format, read and written with bounds: the header is checked before any tensor data is touched.

A file is ``N`` (8 bytes, little-endian u64), an ``N``-byte JSON header ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}`` (padded with spaces), then the data buffer; offsets are relative to
the buffer and the tensors tile it exactly, without gaps or overlaps (what the reference implementation checks).

``SafetensorsReader`` parses and validates the header with explicit limits (header size, tensor count, name
length, rank, dtype, offsets inside the file and tiling), so a caller can check names, dtypes and shapes against a
model before reading data, and then reads only the tensors it uses, from the same open file (a concurrent rename
over the path cannot swap the data under the header). ``write`` streams tensors to an open file object, so every
failure is an ``OSError`` of that file and no second copy of the tensors is built in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from typing import BinaryIO

import torch

from . import _strict_json

# The reference implementation's own header limit is 100 MB. An adapter header is ~150 bytes per tensor plus the
# config copied into the metadata: 16 MiB fits ~100,000 tensors, and parsing it takes ~0.1 s.
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 1 << 16
MAX_NAME_CHARS = 1024
MAX_RANK = 8

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of the header: ``dtype`` (torch), ``shape``, and its byte range [begin, end) in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _check_entry(name, info, where, data_len) -> Entry:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ValueError(f"{where}: a tensor name of {len(name)} characters (1..{MAX_NAME_CHARS} accepted)")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{where}: tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"{where}: tensor {name!r} has dtype {info['dtype']!r} (known: {sorted(DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not _ints(shape) or len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise ValueError(f"{where}: tensor {name!r} has shape {shape!r} (a list of at most {MAX_RANK} sizes >= 0)")
    if not _ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1] <= data_len:
        raise ValueError(f"{where}: tensor {name!r} has data_offsets {offsets!r} outside the {data_len}-byte buffer")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{where}: tensor {name!r} of shape {tuple(shape)} and dtype {info['dtype']} needs {nbytes} "
                         f"bytes, its data_offsets span {offsets[1] - offsets[0]}")  # fmt: skip
    return Entry(name, dtype, tuple(shape), offsets[0], offsets[1])


class SafetensorsReader:
    """An open safetensors file whose header has been validated; ``read(name)`` loads one tensor.

    Use as a context manager. Attributes: ``entries`` ({name: Entry}, header order), ``metadata`` ({str: str}),
    ``path``, ``bytes_read`` (header and tensor bytes read so far: what the tests bound).

    Raises (on open):
        OSError: the file cannot be opened. ValueError: the header breaks the format or a limit (named).
    """

    def __init__(self, path: str | os.PathLike, *, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_tensors: int = MAX_TENSORS):  # fmt: skip
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            self._parse(max_header_bytes, max_tensors)
        except BaseException:
            self._file.close()
            raise

    def _parse(self, max_header_bytes: int, max_tensors: int) -> None:
        where = f"{self.path} is not a valid safetensors file (truncated or another format?)"
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise ValueError(f"{where}: the file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > max_header_bytes or n > size - 8:
            raise ValueError(f"{where}: a header of {n} bytes in a {size}-byte file (at most {max_header_bytes})")
        text = self._file.read(n)
        self.bytes_read = 8 + n
        if not text.startswith(b"{"):
            raise ValueError(f"{where}: the header does not start with '{{' (not a safetensors file?)")
        header = _strict_json.loads(text, where, max_bytes=max_header_bytes, max_depth=3)
        if not isinstance(header, dict):
            raise ValueError(f"{where} must be a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{where}: __metadata__ must map strings to strings")
        if len(header) > max_tensors:
            raise ValueError(f"{where}: {len(header)} tensors, more than the {max_tensors} accepted")
        self.data_start, data_len = 8 + n, size - 8 - n
        entries = [_check_entry(name, info, where, data_len) for name, info in header.items()]
        end = 0
        for e in sorted(entries, key=lambda e: (e.begin, e.end)):  # the tensors must tile the buffer exactly
            if e.begin != end:
                what = "overlaps another tensor" if e.begin < end else f"leaves a gap at byte {end}"
                raise ValueError(f"{where}: tensor {e.name!r} {what} (data_offsets [{e.begin}, {e.end}])")
            end = e.end
        if end != data_len:
            raise ValueError(f"{where}: the tensors cover {end} of the {data_len} data bytes (truncated or padded?)")
        self.entries = {e.name: e for e in entries}
        self.metadata = metadata

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a new CPU tensor (its own memory); reads only its bytes."""
        e = self.entries[name]
        if sys.byteorder != "little":
            raise OSError("safetensors data is little-endian; this machine is big-endian")
        nbytes = e.end - e.begin
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._file.seek(self.data_start + e.begin)
            got = self._file.readinto(memoryview(out.numpy()))
            if got != nbytes:  # the file shrank after the header was checked
                raise ValueError(f"{self.path}: tensor {name!r} was cut short ({got} of {nbytes} bytes)")
            self.bytes_read += nbytes
        return out.view(e.dtype).reshape(e.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU, contiguous) to the open binary file ``f`` in the safetensors format.

    Tensors are laid out by decreasing element size, then name, so every offset is a multiple of its element size
    (the header is padded to 8 bytes), as the reference writer does. Each tensor's bytes are written from its own
    memory, without a copy.
    """
    if sys.byteorder != "little":
        raise OSError("safetensors data is little-endian; this machine is big-endian")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} must be a contiguous CPU tensor of a safetensors dtype")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for name in order:
        t = tensors[name]
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
