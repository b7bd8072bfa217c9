"""The safetensors header reader of the core (yyjson, walked once, StoredTensors built without
their __init__), against the reference reader it replaced (tests/safetensors_reference_reader.py)
and against safetensors itself. The differential fuzz is in tests/fuzz_headers.py."""

from __future__ import annotations

import gc
import json
import struct

import pytest

import pyconv
from pyconv.catalog import StoredTensor
from pyconv.io.safetensors import _read_header, layout_like_save_file
from safetensors_reference_reader import reference_read_header


def _file(tmp_path, header: dict | bytes, data: bytes = b"", name="h.safetensors") -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def _both(path):
    return _read_header(path), reference_read_header(path)


def test_a_saved_file_reads_as_safetensors_and_the_reference_read_it(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = {f"model.layers.{i}.w\u00e9ight.{j}": torch.zeros(i + 1, j + 2, dtype=dt)
               for i in range(4) for j, dt in enumerate((torch.float32, torch.bfloat16, torch.int8, torch.float64))}
    tensors["empty"] = torch.zeros(0, 3)
    tensors["scalar"] = torch.tensor(3.0)
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "note": "\u00fcber \\u0041"})
    core, reference = _both(path)
    assert list(core.tensors.items()) == list(reference.tensors.items())
    assert core.metadata == reference.metadata == {"format": "pt", "note": "\u00fcber \\u0041"}
    assert set(core.tensors) == set(tensors)
    for name, t in core.tensors.items():
        assert t.shape == tuple(tensors[name].shape)


def test_stored_tensors_built_by_the_core_behave_as_constructed_ones(tmp_path):
    path = _file(tmp_path, {"a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                            "b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [12, 24]}}, bytes(24))
    data_start = len(open(path, "rb").read()) - 24
    core = _read_header(path).tensors
    a = core["a"]
    assert type(a) is StoredTensor
    constructed = StoredTensor(path, data_start, "BF16", (2, 3))
    assert a == constructed and hash(a) == hash(constructed)
    assert a.scale is None and a.strides is None and a.nbytes == 12
    with pytest.raises(AttributeError):
        a.offset = 0  # still frozen
    assert core["a"].shape is core["b"].shape  # one tuple per distinct shape


def test_the_garbage_collector_is_left_as_it_was(tmp_path):
    good = _file(tmp_path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "good.safetensors")
    bad = _file(tmp_path, {"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "bad.safetensors")
    assert gc.isenabled()
    _read_header(good)
    assert gc.isenabled()
    with pytest.raises(pyconv.FormatError):
        _read_header(bad)
    assert gc.isenabled()
    gc.disable()
    try:
        _read_header(good)
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("header, data, accepted", [
    # integers at the edges of what a reader of the parsed JSON accepts: +-(2^63 - 1)
    (b'{"a":{"dtype":"U8","shape":[9223372036854775807,0],"data_offsets":[0,0]}}', b"", True),
    (b'{"a":{"dtype":"U8","shape":[9223372036854775808,0],"data_offsets":[0,0]}}', b"", False),
    (b'{"a":{"dtype":"U8","shape":[-9223372036854775807],"data_offsets":[0,0]}}', b"", False),
    (b'{"a":{"dtype":"U8","shape":[-9223372036854775808],"data_offsets":[0,0]}}', b"", False),
    (b'{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,0]}}', b"", False),
    (b'{"a":{"dtype":"U8","shape":[-0,4],"data_offsets":[0,0]}}', b"", True),
    (b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2.0]}}', b"..", False),
    (b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2e0]}}', b"..", False),
    (b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"extra":{"x":[1e400,99999999999999999999999,null]}}}',
     b"..", True),
    # names and metadata with escapes, NUL, non-ASCII, surrogate pairs
    (b'{"\\u0061\\u00e9\\ud83d\\ude00":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b".", True),
    (b'{"a\\u0000b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b".", True),
    (b'{"__metadata__":null,"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b".", True),
    (b'{"__metadata__":{"k":"v","k2":"\\ud83d\\ude00"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b".", True),
    (b'{"__metadata__":{"k":1},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b".", False),
    (b'{"__metadata__":[],"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b".", False),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"__metadata__":{},"__metadata__":{}}', b".", False),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"\\u0061":{"dtype":"U8","shape":[0],"data_offsets":[1,1]}}',
     b".", False),
    # JSON a strict reader refuses
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],}}', b".", False),
    (b'{"a":{"dtype":"U8","shape":[01],"data_offsets":[0,1]}}', b".", False),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x', b".", False),
    (b'{"a":{"dtype":"U\\u0038","shape":[1],"data_offsets":[0,1]}}', b".", True),
    (b'{"a":{"dtype":"U8\t","shape":[1],"data_offsets":[0,1]}}', b".", False),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
     b"..", True),
    (b'{"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
     b"..", True),
    # an entry with a structural error after one with a value error: the structural one is named
    (b'{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":2,"data_offsets":[1,2]}}',
     b"..", False),
])
def test_agrees_with_the_reference(tmp_path, header, data, accepted):
    path = _file(tmp_path, header, data)
    outcomes = []
    for read in (_read_header, reference_read_header):
        try:
            f = read(path)
            outcomes.append(("ok", list(f.tensors.items()), f.metadata))
        except pyconv.FormatError as e:
            outcomes.append(("refused", str(e).split("\0")[0].split(", got ")[0]))
    core, reference = outcomes
    assert core[0] == ("ok" if accepted else "refused")
    if accepted or "not valid JSON" not in reference[1]:
        if "is out of range" in reference[1] and len(reference[1]) > 200:
            assert "is out of range" in core[1]
        else:
            assert core == reference
    else:
        assert "header is not valid JSON" in core[1], core[1]


def test_structure_errors_come_before_value_errors(tmp_path):
    path = _file(tmp_path, b'{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,1]},'
                           b'"b":{"dtype":"U8","shape":2,"data_offsets":[1,2]}}', b"..")
    with pytest.raises(pyconv.FormatError, match="tensor 'b': shape must be a list"):
        _read_header(path)


def test_deep_nesting_is_refused_without_recursion(tmp_path):
    depth = 200_000
    path = _file(tmp_path, b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + b"[" * depth + b"]" * depth
                 + b"}}", b".")
    with pytest.raises(pyconv.FormatError, match="nesting deeper than 512 levels"):
        _read_header(path)
    ok = _file(tmp_path, b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + b"[" * 500 + b"]" * 500 + b"}}",
               b".", "ok.safetensors")
    assert list(_read_header(ok).tensors) == ["a"]


def test_a_large_header_reads_as_the_reference_reads_it(tmp_path):
    entries = [(f"model.layers.{i // 64}.mlp.experts.{i % 64}.down_proj.weight", ("BF16", "F32", "F8_E4M3")[i % 3],
                (i % 5, 3)) for i in range(20_000)]
    header, layout = layout_like_save_file(entries, {"format": "pt"})
    path = tmp_path / "large.safetensors"
    path.write_bytes(header + bytes(max(end for *_, end in layout)))
    path = str(path)
    core, reference = _both(path)
    assert list(core.tensors.items()) == list(reference.tensors.items())
    assert core.metadata == reference.metadata
