"""Checkpoints written by `torch.save` (zip format, torch >= 1.6), read without importing torch.

An archive, as torch 2.13 writes it (every record STORED, data 64-byte aligned by padding
the local header's extra field, CRC and sizes in a data descriptor after the data):

    <name>/data.pkl                 the object tree, pickle protocol 2
    <name>/.format_version          "1"
    <name>/.storage_alignment       "64"
    <name>/byteorder                "little" (absent in old files: little)
    <name>/data/<key>               one record per storage, raw little-endian elements
    <name>/version                  "3\\n"
    <name>/.data/serialization_id

`<name>` is whatever the first central-directory entry says (torch uses the file's stem, or
"archive"); torch.load looks every record up under that prefix and so do we. The pickle
names storages by persistent id `('storage', torch.FloatStorage | torch.storage.UntypedStorage,
key, location, numel)` and rebuilds tensors with `torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, requires_grad, hooks)`, or `_rebuild_tensor_v3(..., dtype)` for
dtypes without a typed storage class (uint16/32/64, float8), whose numel then counts bytes.

Only the central directory, the local headers and data.pkl are read; each tensor becomes a
`TensorRef`: where its bytes lie in the file. torch.load does not check CRCs (verified on
2.13; `torch.serialization.set_crc32_options(False)` writes zeros), so neither do we.
"""

from __future__ import annotations

import argparse
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Iterator

from pyconv.catalog import StoredTensor
from pyconv.errors import FormatError
from pyconv.io.parse_once import parsed
from pyconv.io.unpickle import (
    MAX_PICKLE_BYTES,
    PersistentStorage,
    RebuiltTensor,
    inert,
    restricted_load,
)

MAX_TREE_DEPTH = 100  # Megatron's deepest trees (optimizer state) are under 10
MAX_PATH_CHARS = 1024  # a tensor's dotted path; real ones are under 200

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_HEADER_SIGNATURE = 0x04034B50
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # torch.serialization.MAGIC_NUMBER
_SMALL_RECORD = 64  # byteorder and friends


@inert
@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor of a torch.save archive: its first element at `offset` of `path`, row-major
    contiguous (`nbytes` bytes from there) or a view with the element `strides` torch kept."""

    path: str
    storage_key: str
    offset: int  # absolute, of the first element
    dtype: str  # safetensors name: BF16, F32, F8_E4M3...
    shape: tuple[int, ...]
    nbytes: int  # of the tensor's elements (a strided view spans more of its storage)
    strides: tuple[int, ...] | None = None  # in elements; None: row-major contiguous

    def stored(self) -> StoredTensor:
        return StoredTensor(self.path, self.offset, self.dtype, tuple(self.shape), strides=self.strides)


@dataclass(frozen=True)
class TorchCheckpoint:
    path: str
    archive_name: str
    obj: Any  # the unpickled tree; tensors are TensorRefs

    def tensors(self) -> Iterator[tuple[str, TensorRef]]:
        return iter_tensors(self.obj)


@inert
@dataclass(frozen=True, slots=True)
class _TensorProblem:
    """Stands in the tree for a tensor pyconv cannot read, so the error can name its path."""

    storage_key: str
    problem: str


class _TreeError(Exception):
    pass


_LEAVES = (TensorRef, _TensorProblem)


def _path_component(key) -> str:
    if type(key) is str:
        return key
    if type(key) is int and -(1 << 63) <= key < (1 << 63):
        return str(key)
    return f"<{type(key).__name__} key>"


def _children(obj):
    if isinstance(obj, dict):
        return ((_path_component(k), v) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return ((str(i), v) for i, v in enumerate(obj))
    if isinstance(obj, argparse.Namespace):
        return ((_path_component(k), v) for k, v in vars(obj).items())
    return None


def _walk(obj, prefix: str):
    """(dotted path, leaf) for each TensorRef or _TensorProblem under dicts, lists, tuples and
    Namespaces, in order. Iterative, so a deep tree cannot exhaust the C stack. Through its
    memo a pickle can make cycles and shared sub-trees (a list of a million references to one
    dict): each container is walked once, so the walk is linear in the pickle, and a second
    reference to a container that holds tensors is refused rather than dropped."""
    if isinstance(obj, _LEAVES):
        yield prefix, obj
        return
    children = _children(obj)
    if children is None:
        return
    done: dict[int, tuple[bool, str]] = {}  # walked containers -> (holds tensors, first path)
    stack = [[prefix, children, id(obj), False]]  # path, children, id, holds tensors
    on_path = {id(obj)}
    while stack:
        frame = stack[-1]
        item = next(frame[1], None)
        if item is None:
            stack.pop()
            on_path.discard(frame[2])
            done[frame[2]] = (frame[3], frame[0])
            if stack and frame[3]:
                stack[-1][3] = True
            continue
        key, child = item
        if not isinstance(child, _LEAVES):
            grandchildren = _children(child)
            if grandchildren is None or (id(child) in done and not done[id(child)][0]):
                continue  # a scalar, or a tensor-free container seen before
        dotted = f"{frame[0]}.{key}" if frame[0] else key
        if len(dotted) > MAX_PATH_CHARS:
            raise _TreeError(f"path '{dotted[:100]}...' is longer than {MAX_PATH_CHARS} characters")
        if isinstance(child, _LEAVES):
            frame[3] = True
            yield dotted, child
            continue
        if id(child) in on_path:
            raise _TreeError(f"'{dotted}' contains itself")
        if id(child) in done:
            raise _TreeError(f"'{dotted}' is the same container as '{done[id(child)][1]}', which holds tensors")
        if len(stack) >= MAX_TREE_DEPTH:
            raise _TreeError(f"'{dotted}' is nested more than {MAX_TREE_DEPTH} deep")
        on_path.add(id(child))
        stack.append([dotted, grandchildren, id(child), False])


def read_state_dict(path: str) -> dict[str, "StoredTensor"]:
    """The tensors of a torch.save'd state dict (a Hugging Face .bin, a PEFT adapter_model.bin),
    by their dotted path in the saved tree, read through the safe unpickler."""
    return {name: ref.stored() for name, ref in iter_tensors(read_torch_checkpoint(path).obj)}


def iter_tensors(obj, prefix: str = "") -> Iterator[tuple[str, TensorRef]]:
    """(dotted path, TensorRef) for every tensor under dicts/OrderedDicts, lists, tuples and
    Namespaces, in order; list items are named by index (`layers.0.weight`). A tensor
    referenced from two places is yielded under both names. Raises ValueError for a cycle or a
    container that holds tensors reached twice (read_torch_checkpoint has refused those)."""
    try:
        for dotted, leaf in _walk(obj, prefix):
            if type(leaf) is TensorRef:
                yield dotted, leaf
    except _TreeError as e:
        raise ValueError(str(e)) from None


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    # torch's definition: strides of size-1 dimensions and of empty tensors do not matter.
    if 0 in shape:
        return True
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


class _Archive:
    """The records of one torch.save zip: names, where their data lie, and the storages seen."""

    def __init__(self, path: str, f, base: int = 0, size: int | None = None):
        """The archive in bytes [base, base + size) of the file (default: the whole file); offsets
        in the zip structures are relative to base, those this class reports are absolute."""
        self.path = path
        self.f = f
        self.base = base
        whole = os.fstat(f.fileno()).st_size
        self.file_size = whole - base if size is None else size
        if base < 0 or self.file_size < 0 or base + self.file_size > whole:
            raise FormatError(f"{path}: bytes {base}..{base + self.file_size} lie outside the file ({whole} bytes)")
        self._check_signature()
        try:
            whole_file = base == 0 and size is None
            infos = zipfile.ZipFile(f if whole_file else _FileWindow(f, base, self.file_size)).infolist()
        except Exception as e:  # noqa: BLE001 - zipfile raises many kinds on hostile directories
            raise FormatError(f"{path}: not a readable zip archive (truncated or corrupt?): {e}") from None
        if not infos:
            raise FormatError(f"{path}: zip archive has no records")
        # torch.load takes the archive name from the first central-directory entry.
        first = infos[0].filename
        if "/" not in first:
            raise FormatError(f"{path}: record '{first[:200]}' is not in a subdirectory, as torch.save writes")
        self.name = first.split("/", 1)[0]
        self.records: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in self.records:
                raise FormatError(f"{path}: record '{info.filename[:200]}' appears twice")
            self.records[info.filename] = info
        self.storages: dict[str, tuple[PersistentStorage, int, int]] = {}  # key -> (ref, data offset, nbytes)

    def _check_signature(self):
        head = os.pread(self.f.fileno(), min(512, self.file_size), self.base)
        if head[:4] == b"PK\x03\x04":
            return  # torch.load's own test (_is_zipfile)
        if _LEGACY_MAGIC in head[:32] or head[257:262] == b"ustar":
            raise FormatError(f"{self.path}: legacy torch.save format, re-save with torch >= 1.6 "
                              "(torch.save(torch.load(f, weights_only=False), f) in a trusted environment)")
        if not head:
            raise FormatError(f"{self.path}: empty file, not a torch.save checkpoint")
        kind = "a bare pickle" if head[:1] == b"\x80" else f"it starts with {head[:8]!r}"
        raise FormatError(f"{self.path}: not a torch.save zip archive ({kind})")

    def record(self, name: str) -> zipfile.ZipInfo | None:
        return self.records.get(f"{self.name}/{name}")

    def data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where the record's bytes start, from its local header; the record must be stored and
        lie inside the file."""
        name = info.filename[:200]
        if info.flag_bits & 0x1:
            raise FormatError(f"{self.path}: record '{name}' is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise FormatError(f"{self.path}: record '{name}' is compressed (method {info.compress_type}); "
                              "torch.save writes stored records")
        header = b""
        # zipfile shifts offsets when bytes are prepended
        if 0 <= info.header_offset <= self.file_size - _LOCAL_HEADER.size:
            header = os.pread(self.f.fileno(), _LOCAL_HEADER.size, self.base + info.header_offset)
        if len(header) < _LOCAL_HEADER.size:
            raise FormatError(f"{self.path}: local header of record '{name}' at byte {info.header_offset} "
                              f"lies outside the file ({self.file_size} bytes)")
        signature, _, _, method, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        encoded = info.filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        if (signature != _LOCAL_HEADER_SIGNATURE or method != zipfile.ZIP_STORED
                or os.pread(self.f.fileno(), name_len, self.base + info.header_offset + _LOCAL_HEADER.size) != encoded):
            raise FormatError(f"{self.path}: local header of record '{name}' at byte {info.header_offset} "
                              "does not match the central directory")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + info.file_size > self.file_size:
            raise FormatError(f"{self.path}: record '{name}' (bytes {start}..{start + info.file_size}) "
                              f"runs past the end of the {'file' if self.base == 0 else 'archive'} "
                              f"({self.file_size} bytes)")
        return self.base + start

    def read(self, info: zipfile.ZipInfo) -> bytes:
        start = self.data_offset(info)
        if info.file_size > MAX_PICKLE_BYTES:
            raise FormatError(f"{self.path}: record '{info.filename[:200]}' of {info.file_size} bytes exceeds "
                              f"pyconv's limit of {MAX_PICKLE_BYTES} for a pickle")
        return os.pread(self.f.fileno(), info.file_size, start)

    def on_storage(self, ref: PersistentStorage) -> None:
        seen = self.storages.get(ref.key)
        if seen is not None:
            # torch.load keeps the first typed storage per key whatever later references say.
            if seen[0] != ref:
                raise FormatError(f"{self.path}: storage '{ref.key[:64]}' is referenced as both "
                                  f"{seen[0].numel} x {seen[0].storage_type.name} and "
                                  f"{ref.numel} x {ref.storage_type.name}")
            return
        info = self.record(f"data/{ref.key}")
        if info is None:
            raise FormatError(f"{self.path}: storage '{ref.key[:64]}' has no record '{self.name}/data/{ref.key[:64]}'")
        offset = self.data_offset(info)
        itemsize = ref.storage_type.dtype.itemsize
        if ref.numel * itemsize != info.file_size:
            raise FormatError(f"{self.path}: storage '{ref.key[:64]}' declares {ref.numel} x {ref.storage_type.name} "
                              f"= {ref.numel * itemsize} bytes but its record '{info.filename[:200]}' holds "
                              f"{info.file_size} bytes")
        self.storages[ref.key] = (ref, offset, info.file_size)

    def make_tensor(self, t: RebuiltTensor):
        key = t.storage.key
        dtype = t.dtype.safetensors
        if dtype is None:
            return _TensorProblem(key, f"has dtype {t.dtype!r}, which pyconv does not read")
        if t.metadata:
            return _TensorProblem(key, f"has torch's lazy {'/'.join(map(str, t.metadata))[:40]} bit set; "
                                       "re-save it after .resolve_conj()/.resolve_neg()")
        itemsize = t.dtype.itemsize
        numel = 1
        for size in t.size:
            numel *= size
        contiguous = _is_contiguous(t.size, t.stride)
        # The bytes the view reaches, checked against its storage (a view may span more than numel).
        last = t.storage_offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if numel else t.storage_offset - 1
        _, record_offset, record_bytes = self.storages[key]
        begin, end = t.storage_offset * itemsize, (last + 1) * itemsize
        if end > record_bytes:
            view = "" if contiguous else f", stride {t.stride}"
            return _TensorProblem(key, f"needs bytes {begin}..{end} of storage '{key[:64]}' "
                                       f"(offset {t.storage_offset}, shape {t.size}{view}, {t.dtype!r}), which holds "
                                       f"{record_bytes} bytes")
        return TensorRef(self.path, key, record_offset + begin, dtype, t.size, numel * itemsize,
                         None if contiguous else t.stride)


class _FileWindow:
    """Bytes [base, base + size) of an open file as a read-only seekable file, for zipfile."""

    def __init__(self, f, base: int, size: int):
        self.fd, self.base, self.size, self.position = f.fileno(), base, size, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        origin = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        if origin + offset < 0:
            raise OSError("seek before the start of the archive")
        self.position = origin + offset
        return self.position

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.position + n)
        if end <= self.position:
            return b""
        data = os.pread(self.fd, end - self.position, self.base + self.position)
        self.position += len(data)
        return data


def read_torch_checkpoint(path: str | os.PathLike) -> TorchCheckpoint:
    """Reads a torch.save archive's structure: every tensor a TensorRef, nothing else read.

    Raises FormatError (message starting with the path) for anything torch.save would not have
    written or pyconv cannot map: the legacy format, compressed or truncated records, a global
    outside the allowlist, a tensor reaching outside its storage (named by its tree path)."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FormatError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        return read_torch_archive(path, f)


def read_torch_archive(path: str, f, base: int = 0, size: int | None = None) -> TorchCheckpoint:
    """read_torch_checkpoint for the archive in bytes [base, base + size) of the open file f
    (a PyTorch DCP `.distcp` file holds one torch.save archive per tensor chunk); its TensorRefs
    carry absolute offsets in the file. Parsed once per read of a checkpoint (io.parse_once)."""
    return parsed(("torch archive", os.path.realpath(path), base, size), lambda: _read_archive(path, f, base, size))


def _read_archive(path: str, f, base: int, size: int | None) -> TorchCheckpoint:
    archive = _Archive(path, f, base, size)
    if archive.record("constants.pkl") is not None:
        raise FormatError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint")
    pickle_info = archive.record("data.pkl")
    if pickle_info is None:
        raise FormatError(f"{path}: not a torch.save archive: no record '{archive.name}/data.pkl'")
    byteorder_info = archive.record("byteorder")
    if byteorder_info is not None:
        byteorder = archive.read(byteorder_info) if byteorder_info.file_size <= _SMALL_RECORD else b"?"
        if byteorder != b"little":
            raise FormatError(f"{path}: byteorder is {byteorder[:16]!r}; pyconv reads little-endian checkpoints")
    obj, unpickler = restricted_load(archive.read(pickle_info), path, on_storage=archive.on_storage,
                                     make_tensor=archive.make_tensor)
    # Errors name the tensor's place in the tree, so they wait for the walk.
    reached: set[int] = set()
    try:
        for dotted, leaf in _walk(obj, ""):
            reached.add(id(leaf))
            if type(leaf) is _TensorProblem:
                raise FormatError(f"{path}: tensor '{(dotted or '<root>')[:300]}' {leaf.problem}")
    except _TreeError as e:
        raise FormatError(f"{path}: {e}") from None
    for leaf in unpickler.tensors:
        if type(leaf) is _TensorProblem and id(leaf) not in reached:
            raise FormatError(f"{path}: a tensor on storage '{leaf.storage_key[:64]}' {leaf.problem}")
    return TorchCheckpoint(path, archive.name, obj)
