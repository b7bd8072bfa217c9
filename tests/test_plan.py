"""Planner tests: catalogs built in memory, golden offsets; no file is opened."""

from __future__ import annotations

import json

import pytest

from pyconv.catalog import CanonicalTensor, Catalog, SourceBlock, StoredTensor, view2d
from pyconv.errors import LayoutError
from pyconv.formats.hf import Options, plan_output
from pyconv.io.hfdir import split_into_shards
from pyconv.plan import BlockCopy, TargetSpec, copies_for_region, parse_size


def catalog_of(*tensors, config=None, extra=()):
    return Catalog("hf", "/src", {t.name: t for t in tensors}, config, None, extra)


def whole(name, dtype, shape, path="/src/model.safetensors", offset=1000):
    return CanonicalTensor.whole(name, StoredTensor(path, offset, dtype, shape))


def test_view2d():
    assert view2d(()) == (1, 1)
    assert view2d((7,)) == (7, 1)
    assert view2d((3, 5)) == (3, 5)
    assert view2d((2, 3, 5)) == (6, 5)
    assert view2d((4, 0)) == (4, 0)


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("100KB") == 100_000
    assert parse_size("2MiB") == 2 * 1024 * 1024
    assert parse_size("123") == 123
    assert parse_size(77) == 77
    for bad in ("banana", "5XB", "-1", "0"):
        with pytest.raises(LayoutError):
            parse_size(bad)


def test_split_into_shards_follows_huggingface_hub():
    sizes = [("a", 40), ("b", 50), ("c", 150), ("d", 30), ("e", 80), ("f", 20)]
    # c exceeds the limit: it becomes a shard of its own at once while [a, b] stays open,
    # exactly as huggingface_hub's split_state_dict_into_shards_factory does.
    assert split_into_shards(sizes, 100) == [["c"], ["a", "b"], ["d"], ["e", "f"]]


def test_plan_hf_golden_offsets_and_dtype_order():
    tensors = [whole("w", "F32", (4, 8), offset=100), whole("b", "F32", (8,), offset=228),
               whole("ids", "I64", (3,), offset=260), whole("m", "BF16", (5,), offset=284)]
    files = plan_output(catalog_of(*tensors), TargetSpec(dtype="BF16", options=Options(max_shard_size=10**9)))
    assert [f.path for f in files] == ["model.safetensors"]
    shard = files[0]
    header_len = len(shard.literals[0][1])
    assert header_len % 8 == 0
    header = json.loads(shard.literals[0][1][8:])
    assert header["__metadata__"] == {"format": "pt"}
    # I64 (8 bytes) first, then the 2-byte tensors by name: b, m, w.
    assert [k for k in header if k != "__metadata__"] == ["ids", "b", "m", "w"]
    assert header["ids"] == {"dtype": "I64", "shape": [3], "data_offsets": [0, 24]}
    assert header["b"] == {"dtype": "BF16", "shape": [8], "data_offsets": [24, 40]}
    assert header["m"] == {"dtype": "BF16", "shape": [5], "data_offsets": [40, 50]}
    assert header["w"] == {"dtype": "BF16", "shape": [4, 8], "data_offsets": [50, 114]}
    assert shard.size == header_len + 114
    by_name = {t.name: t for t in shard.tensors}
    assert by_name["w"].offset == header_len + 50
    assert by_name["w"].copies == (BlockCopy("/src/model.safetensors", 100, 32, "F32", 4, 8, 0, 0),)
    assert by_name["b"].copies == (BlockCopy("/src/model.safetensors", 228, 4, "F32", 8, 1, 0, 0),)
    assert by_name["ids"].dtype == "I64"


def test_plan_hf_sharding_index_and_config():
    tensors = [whole(f"t{i}", "F32", (10, 10), offset=400 * i) for i in range(5)]  # 400 bytes each
    config = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    files = plan_output(catalog_of(*tensors, config=config, extra=(("/src/tokenizer.json", 17),)),
                        TargetSpec(dtype="F16", options=Options(max_shard_size=500)))
    names = [f.path for f in files]
    assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json", "config.json",
                     "tokenizer.json"]
    index = json.loads(files[3].literals[0][1])
    assert index["metadata"]["total_size"] == 5 * 200
    assert index["weight_map"] == {"t0": names[0], "t1": names[0], "t2": names[1], "t3": names[1], "t4": names[2]}
    assert json.loads(files[4].literals[0][1])["torch_dtype"] == "float16"
    copy = files[5]
    assert copy.kind == "copy" and copy.size == 17
    assert copy.tensors[0].copies == (BlockCopy("/src/tokenizer.json", 0, 1, "U8", 17, 1, 0, 0),)


def test_plan_refuses_fp8_cast_with_name():
    with pytest.raises(LayoutError, match="w8: an F8_E4M3 weight without its weight_scale_inv cannot be dequantized to BF16"):
        plan_output(catalog_of(whole("w8", "F8_E4M3", (2, 2))), TargetSpec(dtype="BF16", options=Options()))


def test_copies_for_region_composes_shards():
    # A [6, 4] F16 tensor stored as two column shards [6, 2] (a row-parallel TP=2 layout).
    left = StoredTensor("/a.safetensors", 64, "F16", (6, 2))
    right = StoredTensor("/b.safetensors", 128, "F16", (6, 2))
    t = CanonicalTensor("w", "F16", (6, 4), (SourceBlock(left, 0, 0, 6, 2, 0, 0), SourceBlock(right, 0, 0, 6, 2, 0, 2)))
    # Rows 2..5, columns 1..3 of the canonical tensor: one column from each shard.
    copies = copies_for_region(t, 2, 1, 3, 2, dst_row=10, dst_col=0)
    assert copies == [
        BlockCopy("/a.safetensors", 64 + (2 * 2 + 1) * 2, 4, "F16", 3, 1, 10, 0),
        BlockCopy("/b.safetensors", 128 + (2 * 2 + 0) * 2, 4, "F16", 3, 1, 10, 1),
    ]


def test_copies_for_region_fails_closed_on_holes():
    stored = StoredTensor("/a.safetensors", 0, "F32", (2, 2))
    t = CanonicalTensor("w", "F32", (4, 2), (SourceBlock(stored, 0, 0, 2, 2, 0, 0),))
    with pytest.raises(LayoutError, match="cover 4 of the 8"):
        copies_for_region(t, 0, 0, 4, 2)


def test_plan_is_json_and_needs_no_io(monkeypatch):
    import builtins
    import os

    def no_io(*args, **kwargs):
        raise AssertionError("the planner touched the filesystem")

    monkeypatch.setattr(builtins, "open", no_io)
    monkeypatch.setattr(os, "stat", no_io)
    monkeypatch.setattr(os.path, "getsize", no_io)
    files = plan_output(catalog_of(whole("w", "F32", (3, 3))), TargetSpec(options=Options()))
    assert files[0].size == len(files[0].literals[0][1]) + 36


def test_copies_for_region_composes_transposes():
    # Canonical [4, 6] (HF Conv1D [in, out]) assembled from a Megatron-style stored [6, 4] read transposed.
    stored = StoredTensor("/m.pt", 0, "F32", (6, 4))
    t = CanonicalTensor("c", "F32", (4, 6), (SourceBlock(stored, 0, 0, 4, 6, 0, 0, transpose=True),))
    # Writing it transposed again (Megatron -> Megatron) is a straight copy: rows 2..4 of the stored tensor.
    assert copies_for_region(t, 0, 2, 4, 3, transpose=True) == [BlockCopy("/m.pt", 2 * 16, 16, "F32", 3, 4, 0, 0)]
    # Writing the canonical layout (-> HF) transposes: canonical rows 1..2 = stored columns 1..2.
    assert copies_for_region(t, 1, 0, 2, 6) == [BlockCopy("/m.pt", 4, 16, "F32", 2, 6, 0, 0, transpose=True)]
