"""safetensors headers: read, parsed and validated by the core (csrc/safetensors.cpp)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pyconv import _core
from pyconv.catalog import StoredTensor, nbytes
from pyconv.dtypes import ITEMSIZE
from pyconv.io.parse_once import parsed


@dataclass(frozen=True)
class SafetensorsFile:
    path: str
    tensors: dict[str, StoredTensor]  # in file order
    metadata: dict[str, str]


def read_safetensors(path: str) -> SafetensorsFile:
    """Reads and validates a safetensors header; raises FormatError naming the file and tensor.
    Parsed once per read of a checkpoint (io.parse_once): detection may have parsed it already."""
    return parsed(("safetensors", os.path.realpath(path)), lambda: _read_header(path))


def _read_header(path: str) -> SafetensorsFile:
    tensors, metadata = _core.read_safetensors_header(path, StoredTensor)
    return SafetensorsFile(path, tensors, metadata)


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str], *,
                  keep_empty_metadata: bool = False) -> bytes:
    """The 8-byte prefix and JSON header for (name, dtype, shape, begin, end) entries,
    padded with spaces so the data section starts 8-byte aligned, as safetensors does.
    Empty metadata is left out unless keep_empty_metadata (save_file(metadata={}) writes it)."""
    header: dict = {}
    if metadata or (keep_empty_metadata and metadata is not None):
        header["__metadata__"] = metadata
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(len(body) + 8) % 8)
    return len(body).to_bytes(8, "little") + body


# The order in which safetensors (measured with 0.8.0, safetensors.torch.save_file) lays tensors
# out: by dtype in this order (the reverse of the Rust `Dtype` enum), then by name (byte order,
# which for UTF-8 is Python's str order). The JSON header lists the tensors in the same order.
# F6_E2M3/F6_E3M2 (between U8 and F4 in the enum) could not be measured: torch has no such dtype.
SAFETENSORS_DTYPE_ORDER = ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                           "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8", "F4", "BOOL")
_DTYPE_RANK = {d: i for i, d in enumerate(SAFETENSORS_DTYPE_ORDER)}


HeaderEntry = tuple[str, str, tuple[int, ...], int, int]  # name, dtype, shape, begin, end


def layout_like_save_file(tensors: list[tuple[str, str, tuple[int, ...]]],
                          metadata: dict[str, str] | None = None) -> tuple[bytes, list[HeaderEntry]]:
    """The header bytes and the (name, dtype, shape, begin, end) entries, in data order, of the file
    `safetensors.torch.save_file` writes for these (name, dtype, shape) tensors: byte for byte the
    same, given the same tensor contents (compact JSON; no `__metadata__` when metadata is None, an
    empty object when it is {}; spaces padding the header to a multiple of 8). begin and end are
    relative to the data section, which starts at len(header)."""
    unknown = sorted({dtype for _, dtype, _ in tensors} - (set(_DTYPE_RANK) & set(ITEMSIZE)))
    if unknown:
        raise ValueError(f"no known safetensors layout for dtype {unknown[0]}")
    entries, position = [], 0
    for name, dtype, shape in sorted(tensors, key=lambda t: (_DTYPE_RANK[t[1]], t[0])):
        size = nbytes(dtype, tuple(shape))
        entries.append((name, dtype, tuple(shape), position, position + size))
        position += size
    return encode_header(entries, metadata, keep_empty_metadata=True), entries
