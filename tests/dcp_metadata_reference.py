"""The DCP `.metadata` writer pyconv had before it assembled the pickle from fragments: a tree of
PickledObjects pickled whole. Kept as the oracle of tests/test_torch_dist.py's byte-equality test."""

from __future__ import annotations

from pyconv.dtypes import TORCH_NAME
from pyconv.io.dcp import _MODULE, DcpTensor, ItemLocation


def reference_metadata_pickle(tensors: list[DcpTensor], byte_items: dict[str, ItemLocation], save_id: str) -> bytes:
    """The `.metadata` DCP's FileSystemWriter writes for these tensors and bytes items, as a pickle
    that torch's `pickle.load` turns into the real dataclasses (and pyconv's reader into records).
    No planner data: Megatron-Core and DCP's default load planner do not need it for flat keys."""
    from pyconv.io.torchsave import PickledCall, PickledObject, TorchDtypeValue

    def size(dims):
        return PickledCall("torch", "Size", (tuple(dims),))

    def obj(name, module=_MODULE, **fields):
        return PickledObject(module, name, tuple(fields.items()))

    def info(loc: ItemLocation):
        return obj("_StorageInfo", "torch.distributed.checkpoint.filesystem", relative_path=loc.relative_path,
                   offset=loc.offset, length=loc.length, transform_descriptors=None)

    state_dict_metadata: dict = {}
    storage_data: dict = {}
    for t in tensors:
        properties = PickledObject(_MODULE, "TensorProperties", tuple_state=(
            TorchDtypeValue(TORCH_NAME[t.dtype]), PickledCall("torch.serialization", "_get_layout",
                                                                       ("torch.strided",)),
            False, PickledCall(_MODULE, "_MEM_FORMAT_ENCODING", (0,)), False))
        state_dict_metadata[t.fqn] = obj(
            "TensorStorageMetadata", properties=properties, size=size(t.size),
            chunks=[obj("ChunkStorageMetadata", offsets=size(c.offsets), sizes=size(c.sizes)) for c in t.chunks])
        for c in t.chunks:
            storage_data[obj("MetadataIndex", fqn=t.fqn, offset=size(c.offsets), index=None)] = info(c.location)
    for fqn, loc in byte_items.items():
        state_dict_metadata[fqn] = obj("BytesStorageMetadata")
        storage_data[obj("MetadataIndex", fqn=fqn, index=None)] = info(loc)
    from pyconv.io.torchsave import pickle_object

    return pickle_object(obj(
        "Metadata", state_dict_metadata=state_dict_metadata, planner_data=None, storage_data=storage_data,
        storage_meta=obj("StorageMeta", checkpoint_id=None, save_id=save_id, load_id=None, modules=[]),
        version="1.0.0"))
