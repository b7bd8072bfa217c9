"""Writing torch.save archives without torch: the pickle and the zip structure as bytes, with
the position of every storage record, so the executor can fill the tensor data in place.

The pickle (protocol 2) is emitted opcode by opcode for the few kinds of object a checkpoint
holds: dicts (OrderedDict too), lists, tuples, str, int, float, bool, None, bytes,
argparse.Namespace, torch dtypes and tensors, and instances of plain-data classes and calls
(`PickledObject`, `PickledCall`: the dataclasses of a PyTorch DCP `.metadata`). A tensor is
written as torch.save writes it:

    torch._utils._rebuild_tensor_v2(<persistent ('storage', torch.<Type>Storage, key, 'cpu', numel)>,
                                    0, size, stride, False, OrderedDict())

The zip holds, like torch's: data.pkl, .storage_alignment, byteorder, one STORED record per
storage with its data 64-byte aligned (padding in the local header's extra field), version,
.data/serialization_id. It leaves out `.format_version`: with it, torch may compute storage
offsets from miniz's exact layout (data descriptors after each record) instead of reading the
headers (torch.utils.serialization.config.load.calculate_storage_offsets), and this layout
has no data descriptors. CRC-32 fields are zero, as torch.save writes them with
torch.serialization.set_crc32_options(False); torch.load does not check them. Records and
offsets past 4 GiB use zip64 extra fields and the zip64 end records.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

from pyconv.dtypes import ITEMSIZE, STORAGE_TYPES
ALIGNMENT = 64


@dataclass(frozen=True)
class TensorSlot:
    """A tensor whose bytes the executor writes later: dtype (safetensors name) and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class TorchDtypeValue:
    """A torch dtype inside pickled data (e.g. args.params_dtype), by name: 'bfloat16'."""

    name: str


@dataclass(frozen=True)
class PickledObject:
    """An instance of a plain-data class, pickled as dataclasses pickle: `cls.__new__(cls)`
    (NEWOBJ), then BUILD with the attribute dict `fields` ((name, value) pairs), or with
    `tuple_state` for a class whose __setstate__ takes a tuple (DCP's TensorProperties), or no
    BUILD at all when both are empty. Frozen and hashable, so it can be a dict key."""

    module: str
    name: str
    fields: tuple[tuple[str, object], ...] = ()
    tuple_state: tuple | None = None


@dataclass(frozen=True)
class PickledCall:
    """`module.name(*args)` (GLOBAL, args, REDUCE): torch.Size((2, 3)), an enum member by value."""

    module: str
    name: str
    args: tuple = ()


_SETITEMS_BATCH = 1000  # dict items per SETITEMS, as pickle writes them


def _binunicode(s: str) -> bytes:
    """BINUNICODE: a string as protocol 2 writes it."""
    data = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


class _Pickler:
    """Just enough of pickle protocol 2 to write a checkpoint tree the way torch.save does."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.slots: list[TensorSlot] = []  # storage key i holds slots[i]
        # Bytes already written once: no memo opcodes are used, so a subtree pickles the same
        # wherever it appears (unless it holds a tensor, whose storage key is its position).
        self._constants: dict = {}
        self._strs: dict[str, bytes] = {}
        self._globals: dict[tuple[str, str], bytes] = {}
        self._writers = {type(None): self._none, bool: self._bool, int: self._int, float: self._float, str: self._str,
                         bytes: self._bytes, tuple: self._tuple, list: self._list, OrderedDict: self._ordered_dict,
                         dict: self._dict, argparse.Namespace: self._namespace, TorchDtypeValue: self._dtype_value,
                         TensorSlot: self._tensor, PickledObject: self._object, PickledCall: self._call}

    def dump(self, obj) -> bytes:
        self._save(obj)
        self.out += b"."
        return bytes(self.out)

    def _global(self, module: str, name: str) -> None:
        found = self._globals.get((module, name))
        if found is None:
            found = self._globals[(module, name)] = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        self.out += found

    def _str(self, s: str) -> None:
        found = self._strs.get(s)
        if found is None:
            found = _binunicode(s)
            if len(self._strs) < 100_000:  # field names, module names, repeated keys; not every tensor name
                self._strs[s] = found
        self.out += found

    def _int(self, n: int) -> None:
        if 0 <= n < 256:
            self.out += b"K" + bytes([n])
        elif 0 <= n < 65536:
            self.out += b"M" + struct.pack("<H", n)
        elif -(2**31) <= n < 2**31:
            self.out += b"J" + struct.pack("<i", n)
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data

    def _tuple(self, items) -> None:
        items = list(items)
        if not items:
            self.out += b")"
            return
        if len(items) <= 3:
            for x in items:
                self._save(x)
            self.out += b"\x85\x86\x87"[len(items) - 1:len(items)]
            return
        self.out += b"("
        for x in items:
            self._save(x)
        self.out += b"t"

    def _dict_items(self, items) -> None:
        items = list(items)
        for start in range(0, len(items), _SETITEMS_BATCH):
            self.out += b"("
            for k, v in items[start:start + _SETITEMS_BATCH]:
                self._save(k)
                self._save(v)
            self.out += b"u"

    def _save(self, obj) -> None:
        write = self._writers.get(type(obj))
        if write is None:
            raise TypeError(f"cannot write {type(obj).__name__} into a torch checkpoint")
        write(obj)

    def _none(self, obj) -> None:
        self.out += b"N"

    def _bool(self, obj) -> None:
        self.out += b"\x88" if obj else b"\x89"

    def _float(self, obj) -> None:
        self.out += b"G" + struct.pack(">d", obj)

    def _bytes(self, obj) -> None:  # protocol 2 writes bytes as _codecs.encode(latin1 text, 'latin1')
        self._global("_codecs", "encode")
        self._tuple([obj.decode("latin1"), "latin1"])
        self.out += b"R"

    def _list(self, obj) -> None:
        self.out += b"]"
        if obj:
            self.out += b"("
            for x in obj:
                self._save(x)
            self.out += b"e"

    def _ordered_dict(self, obj) -> None:
        self._global("collections", "OrderedDict")
        self.out += b")R"
        self._dict_items(obj.items())

    def _dict(self, obj) -> None:
        self.out += b"}"
        self._dict_items(obj.items())

    def _namespace(self, obj) -> None:
        self._global("argparse", "Namespace")
        self.out += b")\x81}"  # cls.__new__(cls), then BUILD with the attribute dict
        self._dict_items(vars(obj).items())
        self.out += b"b"

    def _dtype_value(self, obj) -> None:
        self._global("torch", obj.name)

    def _object(self, obj) -> None:
        if obj.tuple_state is not None:  # small and repeated (DCP's TensorProperties per tensor)
            self.out += self._constant(("object", obj), self._object_bytes, obj)
        else:
            self._object_bytes(obj)

    def _object_bytes(self, obj) -> None:
        self._global(obj.module, obj.name)
        self.out += b")\x81"  # EMPTY_TUPLE, NEWOBJ
        if obj.tuple_state is not None:
            self._tuple(obj.tuple_state)
            self.out += b"b"
        elif obj.fields:
            self.out += b"}"
            self._dict_items(obj.fields)
            self.out += b"b"

    def _call(self, obj) -> None:
        self.out += self._constant(("call", obj), self._call_bytes, obj)  # torch.Size((0, 0)) and the like repeat

    def _call_bytes(self, obj) -> None:
        self._global(obj.module, obj.name)
        self._tuple(obj.args)
        self.out += b"R"

    def _tensor(self, slot: TensorSlot) -> None:
        """torch._utils._rebuild_tensor_v2(persistent_id(('storage', <Storage type>, key, 'cpu',
        numel)), 0, shape, stride, False, OrderedDict()); the constant parts written once per
        dtype, the shape and stride tuples once per shape (a checkpoint has tens of thousands of
        tensors and a few dozen shapes)."""
        if slot.dtype not in STORAGE_TYPES:
            raise TypeError(f"cannot write a {slot.dtype} tensor into a torch checkpoint")
        key = str(len(self.slots))
        self.slots.append(slot)
        out = self.out
        out += self._constant(("tensor", slot.dtype), self._tensor_prefix, slot.dtype)
        self._str(key)
        out += self._constant("cpu", self._str, "cpu")
        self._int(slot.nbytes // ITEMSIZE[slot.dtype])
        out += b"tQK\x00"  # TUPLE, BINPERSID, storage_offset 0
        out += self._constant(("shape", slot.shape), self._shape_and_stride, slot.shape)
        out += b"\x89"  # requires_grad=False
        out += self._constant("hooks", self._global, "collections", "OrderedDict")
        out += b")RtR"

    def _tensor_prefix(self, dtype: str) -> None:
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out += b"(("  # the arguments tuple, then the persistent id tuple
        self._str("storage")
        self._global("torch", STORAGE_TYPES[dtype][0])

    def _shape_and_stride(self, shape: tuple[int, ...]) -> None:
        stride, step = [], 1
        for size in reversed(shape):
            stride.append(step)
            step *= size
        self._tuple(shape)
        self._tuple(tuple(reversed(stride)))

    def _constant(self, key, write, *args) -> bytes:
        """The bytes write(*args) appends, computed once per key (write must add no tensor)."""
        found = self._constants.get(key)
        if found is None:
            slots = len(self.slots)
            found = self._encoded(write, *args)
            if len(self.slots) != slots:
                raise TypeError("a tensor inside a repeated pickled object")
            self._constants[key] = found
        return found

    def _encoded(self, write, *args) -> bytes:
        """The bytes write(*args) appends, written aside instead of to the output."""
        saved, self.out = self.out, bytearray()
        try:
            write(*args)
            return bytes(self.out)
        finally:
            self.out = saved


class PickleFragments:
    """The pickle bytes of pieces of a tree, for a writer that assembles a large, regular pickle
    (DCP's `.metadata`: hundreds of thousands of small objects) without building PickledObjects
    for it: the bytes pickle_object would give the whole tree, each repeated piece encoded once.
    No memo opcodes are used, so pieces concatenate freely."""

    HEADER = b"\x80\x02"   # PROTO 2
    STOP = b"."
    NONE = b"N"
    OBJECT_CLOSE = b"ub"    # SETITEMS, BUILD: after an object_open and its fields

    def __init__(self):
        self._pickler = _Pickler()
        self._values: dict = {}

    def value(self, obj) -> bytes:
        """The bytes of a tree pickle_object takes (no tensors); a hashable one (ints, strings,
        tuples, PickledCalls...) encoded once per distinct tree."""
        try:
            found = self._values.get(obj)
        except TypeError:  # a list or dict: encoded each time
            return self._pickler._encoded(self._pickler._save, obj)
        if found is None:
            found = self._pickler._encoded(self._pickler._save, obj)
            if len(self._values) < 200_000:
                self._values[obj] = found
        return found

    @staticmethod
    def string(s: str) -> bytes:
        """A string, not cached (names that occur once)."""
        return _binunicode(s)

    def object_open(self, module: str, name: str) -> bytes:
        """A PickledObject with fields, up to its first field (GLOBAL, EMPTY_TUPLE, NEWOBJ,
        EMPTY_DICT, MARK); its fields' names and values follow, then OBJECT_CLOSE."""
        return self._pickler._constant(("object_open", module, name), self._object_open, module, name)

    def _object_open(self, module: str, name: str) -> None:
        self._pickler._global(module, name)
        self._pickler.out += b")\x81}("

    def bare_object(self, module: str, name: str) -> bytes:
        """A PickledObject with neither fields nor state: GLOBAL, EMPTY_TUPLE, NEWOBJ."""
        return self._pickler._constant(("bare", module, name), self._bare_object, module, name)

    def _bare_object(self, module: str, name: str) -> None:
        self._pickler._global(module, name)
        self._pickler.out += b")\x81"

    @staticmethod
    def dictionary(pairs: list[bytes]) -> bytes:
        """A dict from its items' bytes (each key's then its value's, one entry per item), SETITEMS
        in batches as _Pickler writes them."""
        out = [b"}"]
        for start in range(0, len(pairs), _SETITEMS_BATCH):
            out.append(b"(")
            out.extend(pairs[start:start + _SETITEMS_BATCH])
            out.append(b"u")
        return b"".join(out)

    @staticmethod
    def listing(items: list[bytes]) -> bytes:
        return b"](" + b"".join(items) + b"e" if items else b"]"


def pickle_object(obj) -> bytes:
    """A pickle (protocol 2) of a tree of plain data, PickledObjects and PickledCalls."""
    return _Pickler().dump(obj)


def pickle_checkpoint(obj) -> tuple[bytes, list[TensorSlot]]:
    """data.pkl bytes for obj, and the tensors in storage-key order ('0', '1', ...)."""
    pickler = _Pickler()
    data = pickler.dump(obj)
    return data, pickler.slots


_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_U32 = 0xFFFFFFFF
_DOS_DATE = (2026 - 1980) << 9 | 1 << 5 | 1  # fixed: archives are byte-reproducible


@dataclass(frozen=True)
class ZipLayout:
    size: int
    literals: tuple[tuple[int, bytes], ...]  # (offset, bytes): headers, small records, directory
    record_offsets: tuple[int, ...]          # data offset of each storage record, in slot order


def layout_torch_save(obj, archive_name: str = "archive") -> tuple[ZipLayout, list[TensorSlot]]:
    """The byte layout of torch.save(obj) with every TensorSlot's bytes left for the executor."""
    data_pkl, slots = pickle_checkpoint(obj)
    serialization_id = hashlib.sha1(data_pkl).hexdigest()[:40].encode()
    records: list[tuple[str, bytes | int]] = [
        ("data.pkl", data_pkl), (".storage_alignment", str(ALIGNMENT).encode()), ("byteorder", b"little")]
    records += [(f"data/{i}", slot.nbytes) for i, slot in enumerate(slots)]
    records += [("version", b"3\n"), (".data/serialization_id", serialization_id)]

    literals: list[tuple[int, bytes]] = []
    central: list[bytes] = []
    record_offsets: list[int] = []
    position = 0
    for name, content in records:
        full_name = f"{archive_name}/{name}".encode()
        size = content if isinstance(content, int) else len(content)
        zip64 = size >= _U32 or position >= _U32
        fixed = _LOCAL.size + len(full_name)
        zip64_extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        # Pad with an extra field ('FB', as torch does) so the data starts 64-byte aligned.
        pad = -(position + fixed + len(zip64_extra) + 4) % ALIGNMENT
        extra = zip64_extra + struct.pack("<HH", 0x4246, pad) + b"\0" * pad
        header = _LOCAL.pack(0x04034B50, 45 if zip64 else 20, 0x800, 0, 0, _DOS_DATE, 0,
                             _U32 if zip64 else size, _U32 if zip64 else size, len(full_name), len(extra))
        literals.append((position, header + full_name + extra))
        data_offset = position + fixed + len(extra)
        if isinstance(content, int):
            record_offsets.append(data_offset)
        elif content:
            literals.append((data_offset, content))
        central_extra = b""
        if zip64:
            central_extra = struct.pack("<HHQQQ", 1, 24, size, size, position)
        central.append(_CENTRAL.pack(0x02014B50, 45 if zip64 else 20, 45 if zip64 else 20, 0x800, 0, 0, _DOS_DATE, 0,
                                     _U32 if zip64 else size, _U32 if zip64 else size, len(full_name),
                                     len(central_extra), 0, 0, 0, 0, _U32 if zip64 else position)
                       + full_name + central_extra)
        position = data_offset + size
    directory = b"".join(central)
    directory_offset, count = position, len(central)
    tail = b""
    if directory_offset + len(directory) >= _U32 or count >= 0xFFFF:
        zip64_eocd_offset = directory_offset + len(directory)
        tail += _ZIP64_EOCD.pack(0x06064B50, _ZIP64_EOCD.size - 12, 45, 45, 0, 0, count, count, len(directory),
                                 directory_offset)
        tail += _ZIP64_LOCATOR.pack(0x07064B50, 0, zip64_eocd_offset, 1)
        tail += _EOCD.pack(0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _U32, _U32, 0)
    else:
        tail += _EOCD.pack(0x06054B50, 0, 0, count, count, len(directory), directory_offset, 0)
    literals.append((directory_offset, directory + tail))
    size = directory_offset + len(directory) + len(tail)
    return ZipLayout(size, tuple(literals), tuple(record_offsets)), slots
