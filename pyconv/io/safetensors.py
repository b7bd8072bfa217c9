"""safetensors headers: read and validated by the core; the JSON parsed by the standard library."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pyconv import _core
from pyconv.catalog import StoredTensor, nbytes
from pyconv.dtypes import ITEMSIZE
from pyconv.errors import FormatError
from pyconv.io.parse_once import parsed

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class SafetensorsFile:
    path: str
    tensors: dict[str, StoredTensor]  # in file order
    metadata: dict[str, str]


def _reject_lone_surrogates(value) -> None:
    # Python decodes an unpaired "\ud800" escape to a str that cannot be encoded as UTF-8;
    # serde_json (the reference) rejects it, and it would break the core call and any header we write.
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)  # objects inside were checked by their own hook
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"unpaired surrogate escape in string {ascii(v)[:40]}") from None


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        _reject_lone_surrogates(key)
        _reject_lone_surrogates(value)
        seen[key] = value
    return seen


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_json(path: str, raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: header is not valid JSON: {e}") from None


def _int_field(path: str, name: str, what: str, value) -> int:
    if type(value) is not int:
        raise FormatError(f"{path}: tensor '{name}': {what} must be an integer, got {json.dumps(value)[:40]}")
    if not -_INT64_MAX <= value <= _INT64_MAX:
        raise FormatError(f"{path}: tensor '{name}': {what} {value} is out of range")
    return value


def read_safetensors(path: str) -> SafetensorsFile:
    """Reads and validates a safetensors header; raises FormatError naming the file and tensor.
    Parsed once per read of a checkpoint (io.parse_once): detection may have parsed it already."""
    return parsed(("safetensors", os.path.realpath(path)), lambda: _read_header(path))


def _read_header(path: str) -> SafetensorsFile:
    header_len, file_size, raw = _core.read_safetensors_prefix(path)
    header = _parse_json(path, raw)
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise FormatError(f"{path}: tensor '{name}': entry is not a JSON object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise FormatError(f"{path}: tensor '{name}': missing {', '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise FormatError(f"{path}: tensor '{name}': dtype must be a string")
        if not isinstance(shape, list):
            raise FormatError(f"{path}: tensor '{name}': shape must be a list")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise FormatError(f"{path}: tensor '{name}': data_offsets must be a list [begin, end]")
        dims = [_int_field(path, name, "shape entry", d) for d in shape]
        begin, end = (_int_field(path, name, "data offset", o) for o in offsets)
        entries.append((name, dtype, dims, begin, end))
    records = _core.validate_safetensors(path, header_len, file_size, entries)
    tensors = {name: StoredTensor(path, offset, dtype, tuple(shape)) for name, dtype, shape, offset, _ in records}
    return SafetensorsFile(path, tensors, dict(metadata))


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
