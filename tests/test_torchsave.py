"""pyconv's native torch.save writer, judged by torch.load and Python's zipfile."""

from __future__ import annotations

import argparse
import os
import zipfile
from collections import OrderedDict

import pytest
import torch

from pyconv.io.torchsave import TensorSlot, TorchDtypeValue, layout_torch_save
from pyconv.io.torchzip import iter_tensors, read_torch_checkpoint

TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
         "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
         "BOOL": torch.bool}


def materialise(path, obj, tensors):
    """Writes the layout the way the executor would: literals, then each tensor's bytes."""
    layout, slots = layout_torch_save(obj)
    with open(path, "wb") as f:
        f.truncate(layout.size)
        for offset, data in layout.literals:
            f.seek(offset)
            f.write(data)
        for offset, slot, t in zip(layout.record_offsets, slots, tensors):
            assert offset % 64 == 0 and slot.nbytes == t.numel() * t.element_size()
            f.seek(offset)
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return layout


def test_torch_load_reads_every_dtype_and_megatron_shaped_objects(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=g).to(TORCH[d]) if d not in ("BOOL",) else torch.rand(4, generator=g) > .5
               for d in TORCH]
    tensors += [torch.randn(2, 3, 4, generator=g), torch.tensor(3.5), torch.empty(0, 7)]
    model = OrderedDict((f"t{i}", TensorSlot(next(k for k, v in TORCH.items() if v == t.dtype), tuple(t.shape)))
                        for i, t in enumerate(tensors))
    args = argparse.Namespace(num_layers=2, params_dtype=TorchDtypeValue("bfloat16"), rotary_base=10000.0,
                              untie=False, nested={"a": [1, (2, 3)], "b": None}, big=2**40, neg=-7, raw=b"\x00\xff")
    obj = {"model": model, "args": args, "checkpoint_version": 3.0, "iteration": 0}
    materialise(tmp_path / "m.pt", obj, tensors)
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert list(loaded) == ["model", "args", "checkpoint_version", "iteration"]
    assert isinstance(loaded["model"], OrderedDict) and list(loaded["model"]) == list(model)
    for t, (name, got) in zip(tensors, loaded["model"].items()):
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    assert vars(loaded["args"]) == {**vars(args), "params_dtype": torch.bfloat16}
    assert loaded["checkpoint_version"] == 3.0 and loaded["iteration"] == 0
    # weights_only=True (torch's own safe loader) accepts it too, apart from argparse.Namespace.
    torch.serialization.add_safe_globals([argparse.Namespace])
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["model"]["t0"], tensors[0])
    # Our own reader agrees on offsets.
    refs = dict(iter_tensors(read_torch_checkpoint(str(tmp_path / "m.pt")).obj))
    assert refs["model.t1"].dtype == "BF16" and refs["model.t1"].shape == (3, 5)
    assert zipfile.ZipFile(tmp_path / "m.pt").testzip() in (None, "archive/data.pkl")  # CRCs are zero, as documented


def test_torch_computing_offsets_itself_still_reads_the_right_bytes(tmp_path):
    """torch can skip the local headers and compute storage offsets from miniz's layout when an
    archive has .format_version; ours has none, so torch reads the headers."""
    from torch.utils.serialization import config

    tensors = [torch.arange(5, dtype=torch.float32), torch.arange(7, dtype=torch.int64)]
    obj = {"model": {"a": TensorSlot("F32", (5,)), "b": TensorSlot("I64", (7,))}}
    materialise(tmp_path / "m.pt", obj, tensors)
    old = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        loaded = torch.load(tmp_path / "m.pt", mmap=True, weights_only=True)
    finally:
        config.load.calculate_storage_offsets = old
    assert torch.equal(loaded["model"]["a"], tensors[0]) and torch.equal(loaded["model"]["b"], tensors[1])


def test_layout_is_deterministic():
    obj = {"model": {"w": TensorSlot("F32", (2, 2))}}
    assert layout_torch_save(obj)[0] == layout_torch_save(obj)[0]


def test_zip64_for_records_past_4gib(tmp_path):
    big = TensorSlot("BF16", (3 * 2**30,))  # 6 GiB: a record past 4 GiB and offsets past it
    obj = {"model": OrderedDict([("big", big), ("small", TensorSlot("F32", (4,)))])}
    layout, slots = layout_torch_save(obj)
    path = tmp_path / "big.pt"
    with open(path, "wb") as f:  # sparse: only the literals take disk space
        f.truncate(layout.size)
        for offset, data in layout.literals:
            f.seek(offset)
            f.write(data)
    infos = {i.filename: i for i in zipfile.ZipFile(path).infolist()}
    assert infos["archive/data/0"].file_size == big.nbytes
    assert infos["archive/data/1"].header_offset > 2**32
    refs = dict(iter_tensors(read_torch_checkpoint(str(path)).obj))
    assert refs["model.big"].offset == layout.record_offsets[0] and refs["model.small"].offset == layout.record_offsets[1]
    loaded = torch.load(path, mmap=True, weights_only=False)
    assert loaded["model"]["big"].shape == (3 * 2**30,) and loaded["model"]["small"].tolist() == [0, 0, 0, 0]


def test_refuses_what_it_cannot_write():
    with pytest.raises(TypeError, match="F8_E4M3"):
        layout_torch_save({"w": TensorSlot("F8_E4M3", (2,))})
    with pytest.raises(TypeError, match="set"):
        layout_torch_save({"w": {1, 2}})
    assert os.sep  # keep imports used
