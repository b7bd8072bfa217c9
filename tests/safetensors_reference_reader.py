"""The safetensors header reader pyconv had before parsing moved into the core (the standard
library's json with hooks per object, then the core's checks on the entries), kept as the oracle
of tests/test_header_parser.py: the core must accept exactly what it accepted, give the same
tensors, and refuse the rest with the same error (up to the JSON parser's own wording)."""

from __future__ import annotations

import json

from pyconv import _core
from pyconv.catalog import StoredTensor
from pyconv.errors import FormatError
from pyconv.io.safetensors import SafetensorsFile

_INT64_MAX = 2**63 - 1


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


def reference_read_header(path: str) -> SafetensorsFile:
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
