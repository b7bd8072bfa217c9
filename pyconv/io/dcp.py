"""PyTorch distributed checkpoints (DCP, `torch.distributed.checkpoint`), read without torch and
without a process group: the `.metadata` pickle and where each chunk's bytes lie.

A directory written by DCP's FileSystemWriter (as Megatron-Core's `torch_dist` backend uses it):

    .metadata           pickle of Metadata(
                            state_dict_metadata={fqn: TensorStorageMetadata(properties, size,
                                                      chunks=[ChunkStorageMetadata(offsets, sizes)])
                                                 | BytesStorageMetadata()},
                            storage_data={MetadataIndex(fqn, offset=chunk offsets | None):
                                          _StorageInfo(relative_path, offset, length)},
                            planner_data, storage_meta, version="1.0.0")
    __R_N.distcp        rank R's N-th data file: items back to back, each at its _StorageInfo
                        offset; a tensor chunk is a complete torch.save archive of that chunk
                        (`torch.save(chunk_tensor)`, data.pkl + data/0 + ...), a bytes item its raw
                        bytes (Megatron-Core: a torch.save of a ShardedObject's value)

A chunk is the block [offsets, offsets + sizes) of the global tensor `size`; the chunks of a
tensor tile it. The classes of the pickle are read through pyconv's restricted unpickler as
`PickledRecord`s (see pyconv.io.unpickle) and turned here into the frozen records below, every
field checked; the chunk archives are parsed with the torch zip reader, windowed to the item's
bytes, to find the data offset of the one storage each holds.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from pyconv.catalog import StoredTensor
from pyconv.dtypes import TORCH_NAME
from pyconv.errors import FormatError
from pyconv.io.unpickle import (
    MAX_PICKLE_BYTES, EnumValue, PickledRecord, TorchDtype, restricted_load,
)

METADATA_FILE = ".metadata"  # also pyconv.mcore.checkpoint.DCP_METADATA_FILE, for light detection
_MODULE = "torch.distributed.checkpoint.metadata"
_MAX_RANK = 64  # dimensions of one tensor; real ones have at most 5
_INT64_LIMIT = 1 << 63


@dataclass(frozen=True)
class ItemLocation:
    """Where one item (a tensor chunk's torch.save archive, or a bytes item) lies."""

    relative_path: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    location: ItemLocation


@dataclass(frozen=True)
class DcpTensor:
    fqn: str
    dtype: str  # safetensors name
    size: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]


@dataclass(frozen=True)
class DcpMetadata:
    directory: str
    tensors: dict[str, DcpTensor]         # in the order of the pickle
    byte_items: dict[str, ItemLocation]   # BytesStorageMetadata entries (ShardedObjects, extra state)
    version: str | None


# ---- the .metadata pickle -------------------------------------------------------------------

def _record(value, name: str, where: str) -> dict:
    """The attributes of a record of class `name` (a module-local name of torch's DCP)."""
    if not isinstance(value, PickledRecord) or value.qualified_name.rsplit(".", 1)[-1] != name:
        found = value.qualified_name if isinstance(value, PickledRecord) else type(value).__name__
        raise FormatError(f"{where}: expected a {name}, found {found}")
    try:
        return value.fields()
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None


def _show(value) -> str:
    """A short description of an untrusted value for an error message (never a deep repr)."""
    if value is None or type(value) in (bool, int, float, str):
        return repr(value)[:100]
    if type(value) in (tuple, list) and len(value) <= _MAX_RANK and all(type(v) in (int, str) for v in value):
        return repr(list(value))[:200]
    return f"a {type(value).__name__}"


def _int_tuple(value, what: str, where: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list) or len(value) > _MAX_RANK or not all(
            type(v) is int and 0 <= v < _INT64_LIMIT for v in value):
        raise FormatError(f"{where}: {what} must be a tuple of at most {_MAX_RANK} integers in [0, 2**63), "
                          f"got {_show(value)}")
    return tuple(value)


def _tensor_dtype(properties, where: str) -> str:
    """TensorProperties pickles its state as (dtype, layout, requires_grad, memory format, pin)."""
    if not isinstance(properties, PickledRecord) or not properties.qualified_name.endswith(".TensorProperties"):
        raise FormatError(f"{where}: properties are not a TensorProperties")
    state = properties.state
    if type(state) is dict:  # torch versions that pickle the attributes
        state = (state.get("dtype"), state.get("layout"))
    if type(state) is not tuple or len(state) < 2:
        raise FormatError(f"{where}: TensorProperties state is not (dtype, layout, ...)")
    dtype, layout = state[0], state[1]
    if type(dtype) is not TorchDtype:
        raise FormatError(f"{where}: dtype is not a torch dtype")
    if dtype.safetensors is None:
        raise FormatError(f"{where}: dtype {dtype!r} is not one pyconv reads")
    if layout is not None and layout != EnumValue("torch.layout", "torch.strided"):
        raise FormatError(f"{where}: layout {_show(getattr(layout, 'value', layout))} is not torch.strided")
    return dtype.safetensors


def _location(info, where: str) -> ItemLocation:
    fields = _record(info, "_StorageInfo", where)
    path, offset, length = fields.get("relative_path"), fields.get("offset"), fields.get("length")
    if type(path) is not str or not path or len(path) > 255 or "/" in path or "\\" in path or "\0" in path \
            or path in (".", ".."):
        raise FormatError(f"{where}: relative_path {_show(path)} is not a file name in the checkpoint directory")
    for what, value in (("offset", offset), ("length", length)):
        if type(value) is not int or not 0 <= value < _INT64_LIMIT:
            raise FormatError(f"{where}: {what} must be an integer in [0, 2**63), got {_show(value)}")
    if fields.get("transform_descriptors"):
        raise FormatError(f"{where}: stored with transforms {_show(fields['transform_descriptors'])} "
                          "(compression or another DCP extension); pyconv reads plain torch.save items")
    return ItemLocation(path, offset, length)


def _storage_index(storage_data, where: str) -> dict[tuple[str, tuple[int, ...] | None], ItemLocation]:
    if type(storage_data) is not dict:
        raise FormatError(f"{where}: storage_data is not a dict")
    index = {}
    for key, info in storage_data.items():
        fields = _record(key, "MetadataIndex", f"{where}: storage_data key")
        fqn = fields.get("fqn")
        if type(fqn) is not str:
            raise FormatError(f"{where}: storage_data key has no string fqn")
        item = f"{where}: storage_data['{fqn[:200]}']"
        offset = fields.get("offset")
        offset = None if offset is None else _int_tuple(offset, "offset", item)
        if (fqn, offset) in index:
            raise FormatError(f"{item}: chunk at offset {list(offset) if offset else None} is listed twice")
        index[(fqn, offset)] = _location(info, item)
    return index


def read_metadata(directory: str) -> DcpMetadata:
    """The `.metadata` of a DCP directory, checked: every chunk inside its tensor, the chunks of a
    tensor tiling it without overlap, and each chunk and bytes item with a storage entry."""
    path = os.path.join(directory, METADATA_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PICKLE_BYTES + 1)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    if not data:
        raise FormatError(f"{path}: empty file")
    top, _ = restricted_load(data, path)
    fields = _record(top, "Metadata", path)
    if not top.qualified_name.startswith(_MODULE):
        raise FormatError(f"{path}: top level is {top.qualified_name}, not {_MODULE}.Metadata")
    sd_meta = fields.get("state_dict_metadata")
    if type(sd_meta) is not dict:
        raise FormatError(f"{path}: state_dict_metadata is not a dict")
    storage = _storage_index(fields.get("storage_data"), path)
    version = fields.get("version")
    tensors: dict[str, DcpTensor] = {}
    byte_items: dict[str, ItemLocation] = {}
    for fqn, meta in sd_meta.items():
        if type(fqn) is not str:
            raise FormatError(f"{path}: state_dict_metadata has a key that is not a string")
        where = f"{path}: '{fqn[:200]}'"
        kind = meta.qualified_name.rsplit(".", 1)[-1] if isinstance(meta, PickledRecord) else type(meta).__name__
        if kind == "BytesStorageMetadata":
            if (fqn, None) not in storage:
                raise FormatError(f"{where}: bytes item has no storage_data entry")
            byte_items[fqn] = storage[(fqn, None)]
            continue
        m = _record(meta, "TensorStorageMetadata", where)
        dtype = _tensor_dtype(m.get("properties"), where)
        size = _int_tuple(m.get("size"), "size", where)
        chunk_list = m.get("chunks")
        if type(chunk_list) is not list or not chunk_list:
            raise FormatError(f"{where}: chunks must be a non-empty list")
        chunks = []
        for i, c in enumerate(chunk_list):
            cf = _record(c, "ChunkStorageMetadata", f"{where}: chunk {i}")
            offsets = _int_tuple(cf.get("offsets"), "chunk offsets", where)
            sizes = _int_tuple(cf.get("sizes"), "chunk sizes", where)
            if len(offsets) != len(size) or len(sizes) != len(size) or any(
                    o + s > n for o, s, n in zip(offsets, sizes, size)):
                raise FormatError(f"{where}: chunk at offset {list(offsets)} of size {list(sizes)} does not lie "
                                  f"inside the tensor's size {list(size)}")
            location = storage.get((fqn, offsets))
            if location is None:
                raise FormatError(f"{where}: chunk at offset {list(offsets)} has no storage_data entry")
            chunks.append(DcpChunk(offsets, sizes, location))
        _check_tiling(fqn, size, chunks, where)
        tensors[fqn] = DcpTensor(fqn, dtype, size, tuple(chunks))
    return DcpMetadata(directory, tensors, byte_items, version if type(version) is str else None)


def _volume(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


MAX_TILING_CELLS = 1 << 20  # cells of the grid the chunks' edges draw; a real tensor has as many as chunks


def _check_tiling(fqn: str, size: tuple[int, ...], chunks: list[DcpChunk], where: str) -> None:
    """The chunks (each inside the tensor, checked before) cover it exactly once: their volumes add
    up to the tensor's, and no two overlap. Overlap is found on the grid the chunks' edges draw
    along every dimension: each chunk covers a block of its cells, and no cell may be covered
    twice. Linear in the cells, which for chunks on a regular partition (as every DCP saver
    writes them) are the chunks themselves; a tiling irregular enough to draw more than
    MAX_TILING_CELLS cells is refused rather than checked slowly."""
    covered = sum(_volume(c.sizes) for c in chunks)
    if covered != _volume(size):
        raise FormatError(f"{where}: chunks cover {covered} of the {_volume(size)} elements of size {list(size)}")
    nonempty = [c for c in chunks if _volume(c.sizes)]
    if not size or len(nonempty) < 2:
        return
    edges = [sorted({0, n} | {c.offsets[d] for c in nonempty} | {c.offsets[d] + c.sizes[d] for c in nonempty})
             for d, n in enumerate(size)]
    cells = _volume(len(e) - 1 for e in edges)
    if cells > MAX_TILING_CELLS:
        raise FormatError(f"{where}: {len(nonempty)} chunks cut the tensor into a grid of {cells} cells; pyconv "
                          f"checks tilings of up to {MAX_TILING_CELLS} cells")
    position = [{edge: i for i, edge in enumerate(e)} for e in edges]
    owner: dict[tuple[int, ...], DcpChunk] = {}
    for c in nonempty:
        spans = [range(position[d][o], position[d][o + n]) for d, (o, n) in enumerate(zip(c.offsets, c.sizes))]
        for cell in itertools.product(*spans):
            other = owner.setdefault(cell, c)
            if other is not c:
                first, second = sorted((other.offsets, c.offsets))
                raise FormatError(f"{where}: chunks at offsets {list(first)} and {list(second)} overlap")


# ---- the chunks' bytes ----------------------------------------------------------------------

class ChunkLocator:
    """Finds the raw bytes of tensor chunks: opens each data file once, parses the torch.save
    archive at the chunk's location and checks it holds exactly that chunk."""

    def __init__(self, metadata: DcpMetadata):
        self.metadata = metadata
        self._files: dict[str, tuple[object, int]] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()

    def _open(self, relative_path: str, fqn: str):
        entry = self._files.get(relative_path)
        if entry is None:
            path = os.path.join(self.metadata.directory, relative_path)
            try:
                f = open(path, "rb")
            except OSError as e:
                raise FormatError(f"{path}: cannot open data file of '{fqn[:200]}': {e.strerror}") from None
            entry = self._files[relative_path] = (f, os.fstat(f.fileno()).st_size)
        return entry

    def locate(self, tensor: DcpTensor, chunk: DcpChunk) -> StoredTensor:
        from pyconv.io.torchzip import TensorRef, read_torch_archive

        loc = chunk.location
        path = os.path.join(self.metadata.directory, loc.relative_path)
        where = (f"{path}: '{tensor.fqn[:200]}' chunk at offset {list(chunk.offsets)} "
                 f"(bytes {loc.offset}..{loc.offset + loc.length})")
        f, file_size = self._open(loc.relative_path, tensor.fqn)
        if loc.offset + loc.length > file_size:
            raise FormatError(f"{where} runs past the end of the file ({file_size} bytes)")
        try:
            obj = read_torch_archive(path, f, loc.offset, loc.length).obj
        except FormatError as e:
            message = str(e)
            raise FormatError(f"{where}: {message[len(path) + 2:] if message.startswith(path + ': ') else message}") \
                from None
        if type(obj) is not TensorRef:
            raise FormatError(f"{where}: the archive does not hold a single tensor")
        if obj.dtype != tensor.dtype or tuple(obj.shape) != chunk.sizes:
            raise FormatError(f"{where}: the archive holds a {obj.dtype} tensor of shape {list(obj.shape)}, the "
                              f"metadata says {tensor.dtype} {list(chunk.sizes)}")
        return obj.stored()


# ---- writing the .metadata ------------------------------------------------------------------



def metadata_pickle(tensors: list[DcpTensor], byte_items: dict[str, ItemLocation], save_id: str) -> bytes:
    """The `.metadata` DCP's FileSystemWriter writes for these tensors and bytes items, as a pickle
    that torch's `pickle.load` turns into the real dataclasses (and pyconv's reader into records).
    No planner data: Megatron-Core and DCP's default load planner do not need it for flat keys.

    Assembled from byte fragments (io.torchsave.PickleFragments), each object's fields in the order
    torch's dataclasses list them: an MoE checkpoint has hundreds of thousands of chunks, and a
    tree of PickledObjects for them cost most of planning."""
    from pyconv.io.torchsave import PickleFragments, PickledCall, PickledObject, TorchDtypeValue

    f = PickleFragments()
    none = f.NONE

    def size(dims) -> bytes:
        return f.value(PickledCall("torch", "Size", (tuple(dims),)))

    def field(name: str, value: bytes) -> bytes:
        return f.value(name) + value

    def storage_info(loc: ItemLocation) -> bytes:
        return (f.object_open("torch.distributed.checkpoint.filesystem", "_StorageInfo")
                + field("relative_path", f.value(loc.relative_path)) + field("offset", f.value(loc.offset))
                + field("length", f.value(loc.length)) + field("transform_descriptors", none) + f.OBJECT_CLOSE)

    properties: dict[str, bytes] = {}
    # Keyed as the dicts torch pickles are (a repeated key keeps its first place, its last value).
    state_dict_metadata: dict[str, bytes] = {}
    storage_data: dict[tuple, bytes] = {}
    for t in tensors:
        if t.dtype not in properties:
            properties[t.dtype] = f.value(PickledObject(_MODULE, "TensorProperties", tuple_state=(
                TorchDtypeValue(TORCH_NAME[t.dtype]), PickledCall("torch.serialization", "_get_layout",
                                                                           ("torch.strided",)),
                False, PickledCall(_MODULE, "_MEM_FORMAT_ENCODING", (0,)), False)))
        fqn = f.string(t.fqn)
        chunks = [f.object_open(_MODULE, "ChunkStorageMetadata") + field("offsets", size(c.offsets))
                  + field("sizes", size(c.sizes)) + f.OBJECT_CLOSE for c in t.chunks]
        state_dict_metadata[t.fqn] = (fqn + f.object_open(_MODULE, "TensorStorageMetadata")
                                      + field("properties", properties[t.dtype]) + field("size", size(t.size))
                                      + field("chunks", f.listing(chunks)) + f.OBJECT_CLOSE)
        for c in t.chunks:
            storage_data[(t.fqn, tuple(c.offsets))] = (
                f.object_open(_MODULE, "MetadataIndex") + field("fqn", fqn) + field("offset", size(c.offsets))
                + field("index", none) + f.OBJECT_CLOSE + storage_info(c.location))
    for fqn, loc in byte_items.items():
        state_dict_metadata[fqn] = f.string(fqn) + f.bare_object(_MODULE, "BytesStorageMetadata")
        storage_data[(fqn,)] = (f.object_open(_MODULE, "MetadataIndex") + field("fqn", f.string(fqn))
                                + field("index", none) + f.OBJECT_CLOSE + storage_info(loc))
    storage_meta = (f.object_open(_MODULE, "StorageMeta") + field("checkpoint_id", none)
                    + field("save_id", f.value(save_id)) + field("load_id", none) + field("modules", b"]")  # []
                    + f.OBJECT_CLOSE)
    return b"".join([f.HEADER, f.object_open(_MODULE, "Metadata"),
                     field("state_dict_metadata", f.dictionary(list(state_dict_metadata.values()))),
                     field("planner_data", none), field("storage_data", f.dictionary(list(storage_data.values()))),
                     field("storage_meta", storage_meta),
                     field("version", f.value("1.0.0")), f.OBJECT_CLOSE, f.STOP])
