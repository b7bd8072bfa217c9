"""Writes the corpus of hostile checkpoints under tests/data/hostile/ (committed as a regression corpus).

    python tests/data/make_hostile.py          # rewrites tests/data/hostile/

Each case is a small Hugging Face directory (config.json plus model.safetensors, or two shards
with model.safetensors.index.json) that differs from a valid checkpoint in one way. The manifest
cases.json maps each case to the file pyconv must name and a substring its message must hold.
Output is deterministic: tests/test_hostile.py regenerates it and compares byte for byte.

Independent of pyconv on purpose: the corpus is written with json and struct only.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys

HOSTILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile")
MANIFEST = "cases.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2, "intermediate_size": 4,
    "num_attention_heads": 1, "num_key_value_heads": 1, "num_hidden_layers": 0, "vocab_size": 4,
    "max_position_embeddings": 16, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float32",
}

# The valid model every case departs from: (name, dtype, shape), F32, stored in this order.
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
TENSORS = [(EMBED, "F32", [4, 2]), (NORM, "F32", [2]), (HEAD, "F32", [4, 2])]
ITEMSIZE = {"F32": 4}


def _data(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def _layout(tensors) -> tuple[dict, int]:
    """The header entries of tensors stored back to back from offset 0, and their total bytes."""
    header, pos = {}, 0
    for name, dtype, shape in tensors:
        size = ITEMSIZE[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    return header, pos


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _safetensors(header_json: bytes, data: bytes, prefix: int | None = None) -> bytes:
    """8-byte little-endian length (the true one unless `prefix` lies), header, data."""
    return struct.pack("<Q", len(header_json) if prefix is None else prefix) + header_json + data


def _valid_file(tensors, metadata=None) -> bytes:
    header, size = _layout(tensors)
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    return _safetensors(_json(header), _data(size))


def _edited(edit, tensors=TENSORS, data_delta: int = 0) -> bytes:
    """A single file whose header entries went through `edit(header)`; data_delta bytes added or cut."""
    header, size = _layout(tensors)
    header = {"__metadata__": {"format": "pt"}, **header}
    edit(header)
    return _safetensors(_json(header), _data(size + data_delta))


def _index(weight_map: dict, total_size: int = 72) -> bytes:
    return (json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n").encode()


def _sharded(weight_map=None, shard1=None, shard2=None, index: bytes | None = None) -> dict[str, bytes]:
    """Files of a valid two-shard checkpoint, with any shard, the weight map or the whole index replaced."""
    files = {
        SHARD1: _valid_file(TENSORS[:2], {"format": "pt"}) if shard1 is None else shard1,
        SHARD2: _valid_file(TENSORS[2:], {"format": "pt"}) if shard2 is None else shard2,
    }
    if weight_map is None:
        weight_map = {EMBED: SHARD1, NORM: SHARD1, HEAD: SHARD2}
    files[INDEX] = _index(weight_map) if index is None else index
    return files


def _set(name, key, value):
    def edit(header):
        header[name][key] = value
    return edit


def _shift_offsets(by: int):
    def edit(header):
        for name in (EMBED, NORM, HEAD):
            header[name]["data_offsets"] = [o + by for o in header[name]["data_offsets"]]
    return edit


def _config_bytes() -> bytes:
    return (json.dumps(CONFIG, indent=2, sort_keys=True) + "\n").encode()


def valid_single() -> dict[str, bytes]:
    """A valid single-file checkpoint: the baseline every single-file case changes in one way."""
    return {SINGLE: _valid_file(TENSORS, {"format": "pt"})}


def valid_sharded() -> dict[str, bytes]:
    return _sharded()


def _cases():
    """(case, {file: bytes}, offending file, expected substring) for every hostile case."""
    one = lambda raw: {SINGLE: raw}  # noqa: E731
    S = SINGLE
    wm = {EMBED: SHARD1, NORM: SHARD1, HEAD: SHARD2}
    yield "file_too_short", one(b"\x10\x00\x00\x00\x00"), S, "file is 5 bytes, too short"
    yield "empty_file", one(b""), S, "file is 0 bytes, too short"
    yield "header_past_eof", one(_safetensors(b'{"a":1}', b"", prefix=1000)), S, \
        "header length 1000 runs past the end of the file (15 bytes)"
    yield "header_too_large", one(_safetensors(b"{}", b"", prefix=100_000_001)), S, \
        "header length 100000001 exceeds the limit of 100000000 bytes"
    # Exactly at the limit is not "too large": it fails only because the file is short.
    yield "header_at_limit_past_eof", one(_safetensors(b"{}", b"", prefix=100_000_000)), S, \
        "header length 100000000 runs past the end of the file"
    yield "header_length_u64_max", one(b"\xff" * 8 + b"{}"), S, \
        "header length 18446744073709551615 exceeds the limit"
    yield "header_not_utf8", one(_safetensors(b'{"\xff\xfe":{}}', b"")), S, "header is not valid UTF-8"
    yield "header_overlong_utf8", one(_safetensors(b'{"\xc0\xaf":{}}', b"")), S, "header is not valid UTF-8"
    yield "header_utf8_surrogate", one(_safetensors(b'{"\xed\xa0\x80":{}}', b"")), S, "header is not valid UTF-8"
    yield "header_empty", one(_safetensors(b"", b"")), S, "header does not start with '{'"
    yield "header_leading_space", one(_safetensors(b" {}", b"")), S, "header does not start with '{'"
    yield "header_json_array", one(_safetensors(b"[]", b"")), S, "header does not start with '{' (not a JSON object)"
    yield "header_not_json", one(_safetensors(b'{"a":{"dtype":"F32",', b"")), S, "header is not valid JSON"
    yield "header_trailing_garbage", one(_safetensors(b"{}x", b"")), S, "header is not valid JSON: unexpected content after document"
    yield "header_nan", one(_safetensors(
        b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', _data(4))), S, \
        "header is not valid JSON: non-standard JSON constant NaN"
    yield "header_infinity", one(_safetensors(b'{"__metadata__":{"x":"y"},"a":-Infinity}', b"")), S, \
        "non-standard JSON constant -Infinity"
    yield "header_duplicate_key", one(_safetensors(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', _data(8))), S, \
        "header is not valid JSON: duplicate key 'a'"
    yield "header_lone_surrogate_name", one(_safetensors(
        b'{"a\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', _data(4))), S, \
        "header is not valid JSON: unpaired surrogate escape"
    yield "header_nested_duplicate_key", one(_safetensors(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":[{"k":1,"\\u006b":2}]}}', _data(4))), S, \
        "header is not valid JSON: duplicate key 'k'"
    yield "header_duplicate_field", one(_safetensors(
        b'{"a":{"dtype":"F32","shape":[1],"dtype":"F32","data_offsets":[0,4]}}', _data(4))), S, \
        "header is not valid JSON: duplicate key 'dtype'"
    yield "metadata_lone_surrogate", one(_edited(lambda h: h.__setitem__("__metadata__", {"format": "\ud800"}))), S, \
        "unpaired surrogate escape"
    yield "unknown_dtype", one(_edited(_set(NORM, "dtype", "F17"))), S, \
        f"tensor '{NORM}': unknown dtype 'F17'"
    yield "dtype_lowercase", one(_edited(_set(NORM, "dtype", "f32"))), S, "unknown dtype 'f32'"
    yield "dtype_not_string", one(_edited(_set(NORM, "dtype", 32))), S, f"tensor '{NORM}': dtype must be a string"
    yield "shape_not_list", one(_edited(_set(NORM, "shape", 2))), S, "shape must be a list"
    yield "shape_negative", one(_edited(_set(EMBED, "shape", [-4, -2]))), S, \
        f"tensor '{EMBED}': negative dimension -4 in shape"
    yield "shape_float", one(_edited(_set(NORM, "shape", [2.0]))), S, \
        f"tensor '{NORM}': shape entry must be an integer, got 2.0"
    yield "shape_bool", one(_edited(_set(NORM, "shape", [True, 2]))), S, \
        "shape entry must be an integer, got true"
    yield "shape_string", one(_edited(_set(NORM, "shape", ["2"]))), S, 'shape entry must be an integer, got "2"'
    yield "shape_overflow", one(_edited(_set(NORM, "shape", [2**32, 2**32]))), S, \
        f"tensor '{NORM}': shape has too many elements (overflow)"
    yield "shape_bytes_overflow", one(_edited(_set(NORM, "shape", [2**62]))), S, \
        f"tensor '{NORM}': byte size overflows"
    yield "shape_past_u64", one(_edited(_set(NORM, "shape", [2**64]))), S, \
        "shape entry 18446744073709551616 is out of range"
    yield "size_mismatch", one(_edited(_set(NORM, "shape", [3]))), S, \
        f"tensor '{NORM}': data_offsets span 8 bytes but dtype F32 and shape need 12"
    yield "offsets_reversed", one(_edited(_set(NORM, "data_offsets", [40, 32]))), S, \
        "data_offsets end 32 is before begin 40"
    yield "offsets_negative", one(_edited(_set(NORM, "data_offsets", [-8, 0]))), S, "negative data offset"
    yield "offsets_float", one(_edited(_set(NORM, "data_offsets", [32.0, 40]))), S, \
        "data offset must be an integer, got 32.0"
    yield "offsets_three_values", one(_edited(_set(NORM, "data_offsets", [32, 40, 48]))), S, \
        "data_offsets must be a list [begin, end]"
    yield "offsets_overlap", one(_edited(_set(HEAD, "data_offsets", [36, 68]), data_delta=-4)), S, \
        f"tensor '{HEAD}': data starts at 36, expected 40 (overlaps the previous tensor)"
    yield "offsets_gap", one(_edited(_set(HEAD, "data_offsets", [44, 76]), data_delta=4)), S, \
        f"tensor '{HEAD}': data starts at 44, expected 40 (leaves a gap after the previous tensor)"
    yield "offsets_not_from_zero", one(_edited(_shift_offsets(8), data_delta=8)), S, \
        f"tensor '{EMBED}': data starts at 8, expected 0"
    # Two tensors on the same bytes: each is well-formed alone, together they alias.
    yield "offsets_aliased", one(_edited(_set(HEAD, "data_offsets", [0, 32]), data_delta=-32)), S, \
        "data starts at 0, expected 32 (overlaps the previous tensor)"
    yield "data_truncated", one(_edited(lambda h: None, data_delta=-5)), S, \
        "tensor data needs 72 bytes but the file holds 67 after the header"
    yield "offsets_past_eof", one(_edited(lambda h: h.__setitem__("x", {
        "dtype": "F32", "shape": [1000], "data_offsets": [72, 4072]}))), S, \
        "tensor data needs 4072 bytes but the file holds 72"
    yield "trailing_bytes", one(_edited(lambda h: None, data_delta=3)), S, \
        "file has 3 bytes after the last tensor (data must end exactly at end of file)"
    yield "metadata_non_string", one(_edited(lambda h: h.__setitem__("__metadata__", {"format": "pt", "step": 1}))), \
        S, "__metadata__ must map strings to strings"
    yield "metadata_nested", one(_edited(lambda h: h.__setitem__("__metadata__", {"format": {"a": "b"}}))), \
        S, "__metadata__ must map strings to strings"
    yield "metadata_not_object", one(_edited(lambda h: h.__setitem__("__metadata__", "pt"))), S, \
        "__metadata__ must map strings to strings"
    yield "missing_data_offsets", one(_edited(lambda h: h[NORM].pop("data_offsets"))), S, \
        f"tensor '{NORM}': missing data_offsets"
    yield "missing_dtype_and_shape", one(_edited(lambda h: (h[NORM].pop("dtype"), h[NORM].pop("shape")))), S, \
        f"tensor '{NORM}': missing dtype, shape"
    yield "entry_not_object", one(_edited(lambda h: h.__setitem__(NORM, [0, 8]))), S, \
        f"tensor '{NORM}': entry is not a JSON object"

    yield "config_not_json", {**valid_single(), "config.json": b'{"model_type": "llama",'}, "config.json", \
        "config is not valid JSON"
    yield "config_not_object", {**valid_single(), "config.json": b'["llama"]\n'}, "config.json", \
        "config is not a JSON object"

    yield "index_not_json", _sharded(index=b'{"weight_map": {"lm_head.weight": '), INDEX, "index is not valid JSON"
    yield "index_not_utf8", _sharded(index=b'{"weight_map": {"\xff": "x"}}'), INDEX, "index is not valid JSON"
    yield "index_no_weight_map", _sharded(index=b'{"metadata": {"total_size": 72}}\n'), INDEX, \
        "index has no 'weight_map' object"
    yield "index_empty_weight_map", _sharded(weight_map={}), INDEX, "index has no 'weight_map' object"
    yield "index_not_object", _sharded(index=b'[{"weight_map": {}}]\n'), INDEX, "index has no 'weight_map' object"
    yield "index_shard_not_string", _sharded(weight_map={**wm, HEAD: 2}), INDEX, \
        f"tensor '{HEAD}' maps to 2, not a file name in the checkpoint directory"
    missing = _sharded()
    del missing[SHARD2]
    yield "index_missing_shard", missing, INDEX, f"shard '{SHARD2}' (holding '{HEAD}') is missing"
    # The traversal resolves to this case's own, valid shard: refused for its name, not its absence.
    up = f"../index_path_traversal/{SHARD2}"
    yield "index_path_traversal", _sharded(weight_map={**wm, HEAD: up}), INDEX, \
        f"tensor '{HEAD}' maps to '{up}', not a file name in the checkpoint directory"
    yield "index_absolute_path", _sharded(weight_map={**wm, HEAD: "/etc/passwd"}), INDEX, \
        f"tensor '{HEAD}' maps to '/etc/passwd', not a file name"
    yield "index_dotdot", _sharded(weight_map={**wm, HEAD: ".."}), INDEX, "maps to '..', not a file name"
    yield "shard_tensor_not_in_index", _sharded(weight_map={EMBED: SHARD1, HEAD: SHARD2}), SHARD1, \
        f"tensor '{NORM}' is not listed for this file in {INDEX}"
    yield "shard_tensor_in_other_shard", _sharded(weight_map={EMBED: SHARD1, NORM: SHARD2, HEAD: SHARD2}), SHARD1, \
        f"tensor '{NORM}' is not listed for this file in {INDEX}"
    yield "index_tensor_not_in_shard", _sharded(weight_map={**wm, "model.layers.0.mlp.up_proj.weight": SHARD2}), \
        INDEX, f"tensor 'model.layers.0.mlp.up_proj.weight' is listed in '{SHARD2}' but not stored there"
    yield "shard_unknown_dtype", _sharded(shard2=_safetensors(
        _json({HEAD: {"dtype": "F17", "shape": [4, 2], "data_offsets": [0, 32]}}), _data(32))), SHARD2, \
        f"tensor '{HEAD}': unknown dtype 'F17'"
    yield "shard_truncated", _sharded(shard2=_valid_file(TENSORS[2:])[:-1]), SHARD2, \
        "tensor data needs 32 bytes but the file holds 31"


def generate(out_dir: str = HOSTILE_DIR) -> dict[str, dict[str, str]]:
    """Writes every case under out_dir (replacing what was there) and the manifest; returns the manifest."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
            raise SystemExit(f"{out_dir}: not empty and holds no {MANIFEST}; refusing to replace it")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    manifest = {}
    for case, files, offending, expected in _cases():
        if case in manifest:
            raise ValueError(f"duplicate case {case}")
        case_dir = os.path.join(out_dir, case)
        os.makedirs(case_dir)
        for name, raw in {"config.json": _config_bytes(), **files}.items():
            with open(os.path.join(case_dir, name), "wb") as f:
                f.write(raw)
        manifest[case] = {"file": offending, "error": expected}
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True) + "\n")
    return manifest


def write_checkpoint(path: str, files: dict[str, bytes]) -> None:
    """Writes a checkpoint directory (config.json plus `files`), e.g. valid_single() for a positive control."""
    os.makedirs(path, exist_ok=True)
    for name, raw in {"config.json": _config_bytes(), **files}.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(raw)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else HOSTILE_DIR
    cases = generate(out)
    print(f"wrote {len(cases)} cases under {out}")
