"""A restricted unpickler for the pickles inside checkpoints (`data.pkl` of a torch.save archive).

A pickle is a program: each global it names is imported and called. `torch.load` runs any
of them; pyconv runs none. `find_class` answers only from `ALLOWED_GLOBALS`, a table of
inert classes and of pyconv's own stand-ins for torch objects; every other global is refused
before anything is imported or called. torch and numpy are never imported.

What a load guarantees, for any input bytes:
- No code from the file runs. The only callables a pickle can reach are the values in
  `ALLOWED_GLOBALS`, each a pyconv function that checks the types of its arguments and
  builds plain data (an OrderedDict, a set, a stand-in). None imports, opens a file,
  evaluates a string or allocates in proportion to an argument's value (so no
  `bytes(10**12)`: only `bytes()`, and `_codecs.encode` only with latin-1).
- Nothing outside the load can be changed by it. BUILD (setattr/__setstate__ on any object
  on the stack) is the pickle's way to mutate: the functions are handed out wrapped in
  immutable `_Global` objects, the table's stand-ins are frozen, slotted and refuse
  `__setstate__`, and the one class handed out (for NEWOBJ), Namespace, is a per-load
  subclass of argparse.Namespace whose metaclass refuses setattr. Without this a 40-byte
  pickle could turn the process-wide `torch.bfloat16` stand-in into float32 for every later
  load (frozen slotted dataclasses get a `__setstate__` that bypasses `frozen`).
- The result holds only: None, bool, int, float, str, bytes, tuple, list, dict, set,
  frozenset, OrderedDict, argparse.Namespace and the stand-ins below
  (`TorchDtype`, `TorchDevice`, `EnumValue`, numpy records, `PickledRecord`s of the allowed
  plain-data classes such as PyTorch DCP's metadata, and whatever the caller's `make_tensor`
  returns).
- Memory stays proportional to the pickle. `prescan` walks the opcodes (pickletools, pure
  Python) before the C unpickler sees them and refuses memo indices larger than the pickle
  (the C unpickler allocates 16 bytes per index up to the largest one: a 9-byte pickle asks
  for 32 GB) and length prefixes that run past the end.
- No native crash: tuples nest at most `MAX_TUPLE_DEPTH` deep. Hashing a deeply nested tuple
  (as a dict key) recurses in C without a guard: a 2 MB plain pickle kills `pickle.loads`
  with SIGSEGV. Deep lists and dicts are safe here; tree walks bound their own depth.
Not guaranteed: that the values make sense (a Namespace may hold anything the table can
build), nor anything about the tensors beyond what the caller's hooks check.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import dataclasses
import functools
import io
import pickle
import pickletools
import posixpath
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pyconv.dtypes import FROM_TORCH_NAME
from pyconv.errors import FormatError

MAX_PICKLE_BYTES = 1 << 30  # a data.pkl holds structure, not tensor bytes; real ones are KBs to tens of MBs
MAX_TUPLE_DEPTH = 64  # torch's own pickles nest tuples 2-3 deep
# What unpickling may build, estimated per opcode by prescan (CPython object sizes, roughly): a
# data.pkl of tens of MB builds a few hundred MB; a pickle of nothing but empty containers
# builds ~30 bytes of objects per byte of pickle and is refused before it is built.
MAX_UNPICKLED_BYTES = 1 << 29
_OBJECT_BYTES = 64  # a small object or empty container
_SLOT_BYTES = 16  # a reference in a list, tuple, dict or on the stack
_MEMO_BYTES = 100  # a memo entry (dict slot and int key)
_INT64_LIMIT = 1 << 63

# Every dtype torch 2.13 defines, by the name it pickles under (`torch.half` pickles as
# `torch.float16`), with its itemsize; these may appear as values (`args.params_dtype`).
TORCH_DTYPE_ITEMSIZE = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "uint16": 2, "float16": 2, "bfloat16": 2, "int32": 4,
    "uint32": 4, "float32": 4, "float64": 8, "int64": 8, "uint64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "complex32": 4, "complex64": 8, "complex128": 16, "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1,
    "quint2x4": 1, "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
    **{f"{sign}int{bits}": 1 for sign in ("", "u") for bits in range(1, 8)},
}
# Typed storage classes torch.save still writes (dtypes older than uint16 and float8 use
# `torch.storage.UntypedStorage` plus a dtype argument to _rebuild_tensor_v3).
_TYPED_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}


# ---- stand-ins: plain-Python records of what the pickle described -------------------------

def _refuse_build(self, state):
    raise FormatError(f"BUILD (__setstate__) on a {type(self).__name__} is not allowed")


def _rebuild_record(cls, values):
    return cls(*values)


def inert(cls):
    """For frozen slotted dataclasses that a pickle can reach: BUILD cannot change them
    (dataclass gives them a __setstate__ that bypasses `frozen`), while pyconv can still
    pickle them itself (multiprocessing), through the constructor."""
    names = tuple(f.name for f in dataclasses.fields(cls))
    cls.__setstate__ = _refuse_build
    cls.__reduce__ = lambda self: (_rebuild_record, (type(self), tuple(getattr(self, n) for n in names)))
    return cls


class _Sealed(type):
    def __setattr__(cls, name, value):
        raise FormatError(f"setting attribute '{str(name)[:64]}' of class {cls.__name__} is not allowed")

    def __delattr__(cls, name):
        raise FormatError(f"deleting attribute '{str(name)[:64]}' of class {cls.__name__} is not allowed")


class _SealedNamespace(argparse.Namespace, metaclass=_Sealed):
    """The table's `argparse.Namespace`. NEWOBJ needs a real class, and BUILD could setattr on
    whatever class find_class hands out, so each load gets its own sealed subclass that records
    its instances; when the load is over they become plain argparse.Namespace objects."""

    __slots__ = ()


def _namespace_class_for(created: list) -> type:
    def __new__(cls, *args, **kwargs):
        namespace = argparse.Namespace.__new__(cls)
        created.append(namespace)
        return namespace
    return _Sealed("Namespace", (_SealedNamespace,), {"__slots__": (), "__new__": __new__})

@inert
@dataclass(frozen=True, slots=True)
class TorchDtype:
    """A `torch.<name>` dtype, recorded by name."""

    name: str

    @property
    def safetensors(self) -> str | None:
        return FROM_TORCH_NAME.get(self.name)  # the dtypes whose tensors pyconv reads

    @property
    def itemsize(self) -> int:
        return TORCH_DTYPE_ITEMSIZE[self.name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


@inert
@dataclass(frozen=True, slots=True)
class TorchDevice:
    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


@inert
@dataclass(frozen=True, slots=True)
class StorageType:
    """`torch.FloatStorage`, `torch.storage.UntypedStorage`...: the element type of a storage record."""

    name: str
    dtype: TorchDtype  # uint8 for UntypedStorage, whose numel counts bytes


@inert
@dataclass(frozen=True, slots=True)
class ClassMarker:
    """A class a pickle may name only as an argument (torch.Tensor for _rebuild_from_type_v2,
    numpy.ndarray for _reconstruct); it cannot be called or instantiated."""

    name: str


@inert
@dataclass(frozen=True, slots=True)
class PersistentStorage:
    """A storage reference, the persistent id `('storage', storage_type, key, location, numel)`."""

    storage_type: StorageType
    key: str
    location: str
    numel: int


@inert
@dataclass(frozen=True, slots=True)
class RebuiltTensor:
    """The arguments of torch's tensor-rebuild functions, checked for type and range."""

    storage: PersistentStorage
    storage_offset: int  # in elements of dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: TorchDtype
    metadata: dict | None  # torch's lazy conj/neg bits


@inert
@dataclass(frozen=True, slots=True)
class EnumValue:
    """A member of an allowed enum class (see `enum_stand_in`), recorded as class name and value."""

    enum: str
    value: Any


class NumpyDtype:
    """A pickled `numpy.dtype`; its BUILD state is recorded, never interpreted."""

    __slots__ = ("name", "state")

    def __init__(self, name: str):
        self.name, self.state = name, None

    def __setstate__(self, state):
        if self.state is not None or type(state) is not tuple:
            raise FormatError("numpy.dtype state is not a tuple set once")
        self.state = state

    def __repr__(self) -> str:
        return f"numpy.dtype({self.name!r})"


class NumpyArray:
    """A pickled numpy array (Megatron keeps numpy's RNG state in `rng_state`). pyconv carries
    it as a record `(version, shape, dtype, is_fortran, raw bytes)` and never rebuilds it."""

    __slots__ = ("state",)

    def __init__(self):
        self.state = None

    def __setstate__(self, state):
        if self.state is not None or type(state) is not tuple or len(state) != 5:
            raise FormatError("numpy array state is not a 5-tuple set once")
        self.state = state

    def __repr__(self) -> str:
        return f"NumpyArray(shape={self.state[1] if self.state else None})"


@inert
@dataclass(frozen=True, slots=True)
class NumpyScalar:
    dtype: NumpyDtype
    raw: bytes


class PickledRecord:
    """An instance of an allowed plain-data class that pickles as NEWOBJ `cls.__new__(cls)` then
    BUILD with its state (a dataclass such as PyTorch DCP's `Metadata` or `ChunkStorageMetadata`):
    the state BUILD gave it, a dict of str keys or a tuple, kept as is and set at most once. A
    class without state (`BytesStorageMetadata`) keeps None. Nothing here interprets the state;
    the reader of the format does (pyconv.io.dcp). The class comes from `record_class`, sealed
    like Namespace, so BUILD reaches neither it nor any other record."""

    __slots__ = ("state",)
    qualified_name = "PickledRecord"

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise FormatError(f"{cls.qualified_name} must be created with no arguments (NEWOBJ, then BUILD)")
        record = object.__new__(cls)
        object.__setattr__(record, "state", None)
        return record

    def __setstate__(self, state):
        name = self.qualified_name
        if self.state is not None:
            raise FormatError(f"BUILD on a {name} twice is not allowed")
        if type(state) is dict:
            if not all(type(k) is str for k in state):
                raise FormatError(f"BUILD on a {name}: attribute names must be strings")
        elif type(state) is not tuple:
            raise FormatError(f"BUILD on a {name}: state must be a dict or a tuple, got {type(state).__name__}")
        object.__setattr__(self, "state", state)

    def __setattr__(self, name, value):
        raise FormatError(f"setting attribute '{str(name)[:64]}' of a {self.qualified_name} is not allowed")

    def __delattr__(self, name):
        raise FormatError(f"deleting attribute '{str(name)[:64]}' of a {self.qualified_name} is not allowed")

    def fields(self) -> dict:
        """The BUILD state as a dict ({} for none); a tuple state is refused here, so callers
        that expect attributes never see one."""
        if self.state is None:
            return {}
        if type(self.state) is not dict:
            raise FormatError(f"{self.qualified_name}: expected attributes, found a {len(self.state)}-tuple state")
        return self.state

    def __repr__(self) -> str:
        return f"{self.qualified_name}({self.state!r})"


def record_class(qualified_name: str) -> type:
    """A table value for a plain-data class: instances are `PickledRecord`s named qualified_name."""
    return _Sealed(qualified_name.rsplit(".", 1)[-1], (PickledRecord,),
                   {"__slots__": (), "qualified_name": qualified_name})


# ---- what the allowed globals do -----------------------------------------------------------

def _is_int(x) -> bool:
    return type(x) is int and 0 <= x < _INT64_LIMIT


def _int_tuple(what: str, value) -> tuple[int, ...]:
    if type(value) not in (tuple, list) or not all(_is_int(v) for v in value):
        raise FormatError(f"{what} must be a tuple of integers in [0, 2**63)")
    return tuple(value)


def _torch_size(*args):
    if len(args) != 1:
        raise FormatError("torch.Size takes one tuple")
    return _int_tuple("torch.Size", args[0])


def _torch_device(*args):
    if not (1 <= len(args) <= 2 and type(args[0]) is str and len(args[0]) <= 64
            and (len(args) == 1 or args[1] is None or _is_int(args[1]))):
        raise FormatError("torch.device takes a device name and an optional index")
    kind, _, index = args[0].partition(":")
    if index:
        if len(args) == 2 or not (index.isascii() and index.isdigit()):
            raise FormatError(f"torch.device: bad device {args[0]!r}")
        return TorchDevice(kind, int(index))
    return TorchDevice(kind, args[1] if len(args) == 2 else None)


def _codecs_encode(*args):
    # Protocol 2 spells a bytes object as _codecs.encode(str, 'latin1'): one output byte per
    # character. Any other codec (zlib, bz2, idna...) is refused.
    if len(args) != 2 or type(args[0]) is not str or args[1] not in ("latin1", "latin-1"):
        raise FormatError("_codecs.encode is allowed only as encode(str, 'latin1')")
    return args[0].encode("latin-1")


def _empty_bytes(*args):
    # Protocol 2 writes b"" as bytes(); bytes(n) would allocate n bytes.
    if args:
        raise FormatError("builtins.bytes is allowed only with no argument")
    return b""


def _ordered_dict(*args):
    # torch writes OrderedDict() then SETITEMS; a list or dict of pairs is also fine.
    if len(args) > 1 or (args and type(args[0]) not in (list, tuple, dict, collections.OrderedDict)):
        raise FormatError("collections.OrderedDict takes at most one list or dict")
    return collections.OrderedDict(*args)


def _container(kind: type) -> Callable:
    def build(*args):
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
            raise FormatError(f"builtins.{kind.__name__} takes at most one list")
        return kind(*args)
    return build


def _numpy_reconstruct(*args):
    if len(args) != 3 or args[0] != ClassMarker("numpy.ndarray") or type(args[2]) is not bytes:
        raise FormatError("numpy _reconstruct is allowed only for numpy.ndarray")
    return NumpyArray()


def _numpy_dtype(*args):
    if not 1 <= len(args) <= 3 or type(args[0]) is not str or len(args[0]) > 64:
        raise FormatError("numpy.dtype takes a type code")
    return NumpyDtype(args[0])


def _numpy_scalar(*args):
    if len(args) != 2 or type(args[0]) is not NumpyDtype or type(args[1]) is not bytes or len(args[1]) > 64:
        raise FormatError("numpy scalar takes a dtype and at most 64 bytes")
    return NumpyScalar(args[0], args[1])


_TORCH_LAYOUTS = frozenset(f"torch.{name}" for name in (
    "strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged"))


def _torch_layout(*args):
    # torch.serialization._get_layout('torch.strided'): how a torch.layout pickles.
    if len(args) != 1 or args[0] not in _TORCH_LAYOUTS:
        raise FormatError("torch.serialization._get_layout takes the name of a torch layout")
    return EnumValue("torch.layout", args[0])


def _posix_path(*args):
    # pathlib.PosixPath('/ckpt/dir') pickles as PosixPath('/', 'ckpt', 'dir') (DCP's
    # StorageMeta.checkpoint_id): kept as the plain string it names.
    if not all(type(a) is str for a in args):
        raise FormatError("pathlib.PosixPath takes strings")
    return posixpath.join(*args) if args else "."


def _make_enum_value(enum: str, *args):
    if len(args) != 1 or type(args[0]) not in (int, str, float, bool, type(None)):
        raise FormatError(f"{enum} takes one int, str, float, bool or None")
    return EnumValue(enum, args[0])


def enum_stand_in(qualified_name: str) -> Callable:
    """A table value for an enum class: `Enum(value)` becomes `EnumValue(qualified_name, value)`."""
    return functools.partial(_make_enum_value, qualified_name)


class _NeedsUnpickler:
    """Marks a table value that acts on the unpickler's hooks; find_class binds it."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn


class _Global:
    """What find_class hands out for a table function: callable, and immutable (no BUILD), so
    neither the function's attributes (`__defaults__`) nor its binding can be changed."""

    __slots__ = ("fn", "unpickler")

    def __init__(self, fn, unpickler):
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "unpickler", unpickler)

    def __call__(self, *args):
        return self.fn(*args) if self.unpickler is None else self.fn(self.unpickler, *args)

    def __setattr__(self, name, value):
        raise FormatError("setting attributes of an allowed global is not allowed")

    __setstate__ = _refuse_build

    def __reduce__(self):
        raise TypeError("an unpickler's global cannot be pickled")


def _check_hooks(what: str, hooks):
    # torch never serializes backward hooks (an empty OrderedDict stands in).
    if type(hooks) not in (dict, collections.OrderedDict) or hooks:
        raise FormatError(f"{what}: backward_hooks must be an empty dict")


def _rebuild(u: "RestrictedUnpickler", what: str, storage, storage_offset, size, stride, requires_grad, hooks,
             dtype, metadata):
    if type(storage) is not PersistentStorage:
        raise FormatError(f"{what}: the storage argument is not a storage reference")
    if not _is_int(storage_offset):
        raise FormatError(f"{what}: storage_offset must be an integer in [0, 2**63)")
    size, stride = _int_tuple(f"{what}: size", size), _int_tuple(f"{what}: stride", stride)
    if len(size) != len(stride):
        raise FormatError(f"{what}: size has {len(size)} dimensions but stride has {len(stride)}")
    if type(requires_grad) is not bool:
        raise FormatError(f"{what}: requires_grad must be a bool")
    _check_hooks(what, hooks)
    if metadata is not None and type(metadata) is not dict:
        raise FormatError(f"{what}: metadata must be a dict")
    return u.add_tensor(RebuiltTensor(storage, storage_offset, size, stride, dtype, metadata or None))


def _simple_namespace(u, *args):
    """types.SimpleNamespace(), as Hugging Face's Megatron-GPT2 script pickles its args (REDUCE
    with no arguments, then BUILD with the fields): read as the load's sealed Namespace, which
    becomes a plain argparse.Namespace when the load is over."""
    if args:
        raise FormatError("types.SimpleNamespace: expected no positional arguments")
    return u._namespace_class()


def _rebuild_tensor_v2(u, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    dtype = storage.storage_type.dtype if type(storage) is PersistentStorage else None
    return _rebuild(u, "_rebuild_tensor_v2", storage, storage_offset, size, stride, requires_grad,
                    backward_hooks, dtype, metadata)


def _rebuild_tensor_v3(u, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if type(dtype) is not TorchDtype:
        raise FormatError("_rebuild_tensor_v3: dtype is not a torch dtype")
    return _rebuild(u, "_rebuild_tensor_v3", storage, storage_offset, size, stride, requires_grad,
                    backward_hooks, dtype, metadata)


def _rebuild_parameter(u, data, requires_grad, backward_hooks):
    if not u.is_tensor(data) or type(requires_grad) is not bool:
        raise FormatError("_rebuild_parameter: data is not a tensor")
    _check_hooks("_rebuild_parameter", backward_hooks)
    return data  # a Parameter's bytes are its tensor's


def _rebuild_parameter_with_state(u, data, requires_grad, backward_hooks, state):
    # state holds the Parameter's Python attributes (e.g. Megatron's tensor_model_parallel);
    # they do not change the bytes, and are dropped.
    return _rebuild_parameter(u, data, requires_grad, backward_hooks)


def _rebuild_from_type_v2(u, func, new_type, args, state):
    # torch.save of a tensor with Python attributes: func(*args), then as_subclass(new_type).
    rebuilders = (_rebuild_tensor_v2, _rebuild_tensor_v3)
    if not (type(func) is _Global and func.fn in rebuilders and func.unpickler is u):
        raise FormatError("_rebuild_from_type_v2: func is not a tensor-rebuild function")
    if new_type not in (ClassMarker("torch.Tensor"), ClassMarker("torch.nn.Parameter")):
        raise FormatError("_rebuild_from_type_v2: type is not torch.Tensor or torch.nn.Parameter")
    if type(args) is not tuple:
        raise FormatError("_rebuild_from_type_v2: args is not a tuple")
    return func(*args)


# ---- the allowlist --------------------------------------------------------------------------
# (module, name), in Python 3 spelling -> what find_class hands back. Extend it here (e.g.
# `("megatron.core.transformer.enums", "AttnBackend"): enum_stand_in("...AttnBackend")`);
# `check_allowlist` insists that each value is a function that checks its arguments' types and
# builds plain data (handed out wrapped), an @inert record, or a class sealed by `_Sealed`.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("argparse", "Namespace"): _SealedNamespace,
    ("types", "SimpleNamespace"): _NeedsUnpickler(_simple_namespace),
    ("builtins", "set"): _container(set),
    ("builtins", "frozenset"): _container(frozenset),
    ("builtins", "bytes"): _empty_bytes,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("torch", "Tensor"): ClassMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): ClassMarker("torch.nn.Parameter"),
    ("torch._utils", "_rebuild_tensor_v2"): _NeedsUnpickler(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _NeedsUnpickler(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _NeedsUnpickler(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _NeedsUnpickler(_rebuild_parameter_with_state),
    ("torch._tensor", "_rebuild_from_type_v2"): _NeedsUnpickler(_rebuild_from_type_v2),
    ("torch.storage", "UntypedStorage"): StorageType("UntypedStorage", TorchDtype("uint8")),
    ("torch", "UntypedStorage"): StorageType("UntypedStorage", TorchDtype("uint8")),
    **{("torch", name): TorchDtype(name) for name in TORCH_DTYPE_ITEMSIZE},
    # torch.load resolves any "*Storage" name whatever its module; cuda storages were pickled
    # as torch.cuda.<Type>Storage by old versions.
    **{(module, name): StorageType(name, TorchDtype(dtype))
       for name, dtype in _TYPED_STORAGES.items() for module in ("torch", "torch.cuda")},
    # numpy 2 pickles under numpy._core, numpy 1 under numpy.core.
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _numpy_reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _numpy_scalar for core in ("core", "_core")},
    ("numpy", "ndarray"): ClassMarker("numpy.ndarray"),
    ("numpy", "dtype"): _numpy_dtype,
    # PyTorch distributed checkpoint (DCP) metadata, the `.metadata` pickle (read by pyconv.io.dcp).
    ("torch.serialization", "_get_layout"): _torch_layout,
    ("pathlib", "PosixPath"): _posix_path,
    ("pathlib", "PurePosixPath"): _posix_path,
    **{("torch.distributed.checkpoint.metadata", name): record_class(f"torch.distributed.checkpoint.metadata.{name}")
       for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                    "TensorProperties", "MetadataIndex", "StorageMeta")},
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"):
        enum_stand_in("torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
        record_class("torch.distributed.checkpoint.filesystem._StorageInfo"),
    # Megatron-Core keeps the save plans beside the metadata (`Metadata.all_local_plans`).
    **{("torch.distributed.checkpoint.planner", name): record_class(f"torch.distributed.checkpoint.planner.{name}")
       for name in ("SavePlan", "WriteItem", "TensorWriteData")},
    # ... as its own SavePlan subclass up to Megatron-Core 0.14 (NeMo 2.x checkpoints).
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"):
        record_class("megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"):
        enum_stand_in("torch.distributed.checkpoint.planner.WriteItemType"),
    # Enums in Megatron-LM's args and common state (megatron.core.safe_globals lists them).
    **{(module, name): enum_stand_in(f"{module}.{name}") for module, name in (
        ("megatron.core.transformer.enums", "AttnBackend"), ("megatron.core.transformer.enums", "CudaGraphScope"),
        ("megatron.core.enums", "ModelType"), ("megatron.core.rerun_state_machine", "RerunMode"),
        ("megatron.core.rerun_state_machine", "RerunState"), ("megatron.core.rerun_state_machine", "RerunDiagnostic"))},
}


def check_allowlist(table: Mapping[tuple[str, str], Any]) -> None:
    """Every value must be a function (handed out wrapped), a sealed class or an inert record;
    anything else could be mutated by BUILD for the whole process."""
    for key, value in table.items():
        if not (isinstance(value, _Sealed) or type(value) in (types.FunctionType, functools.partial, _NeedsUnpickler)
                or getattr(type(value), "__setstate__", None) is _refuse_build):
            raise TypeError(f"allowlist entry {key}: {value!r} is not a function, a sealed class or an inert record")


check_allowlist(ALLOWED_GLOBALS)


_TORCH_MODULE_RENAMES = {"torch.tensor": "torch._tensor"}  # as torch.load's find_class does


def _python3_name(module: str, name: str) -> tuple[str, str]:
    # Protocol 2 writes Python 2 names (__builtin__.eval, commands.Popen for subprocess.Popen);
    # the stdlib's find_class translates them, and so does ours, before the lookup.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return _TORCH_MODULE_RENAMES.get(module, module), name


# ---- the unpickler ----------------------------------------------------------------------------

def _no_storage(storage: PersistentStorage):
    raise FormatError(f"storage reference '{storage.key[:64]}' outside a torch zip archive")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles with `ALLOWED_GLOBALS` only; storage references and tensors go to the hooks.

    on_storage(PersistentStorage) validates a storage reference against the archive (raising
    FormatError); make_tensor(RebuiltTensor) returns the object that stands for the tensor.
    """

    def __init__(self, file, path: str, *, on_storage: Callable[[PersistentStorage], None] = _no_storage,
                 make_tensor: Callable[[RebuiltTensor], Any] = lambda t: t,
                 allowed: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS):
        super().__init__(file, encoding="utf-8")
        if allowed is not ALLOWED_GLOBALS:
            check_allowlist(allowed)
        self.path = path
        self.tensors: list[Any] = []  # what make_tensor returned, in pickle order
        self._tensor_ids: set[int] = set()
        self._on_storage, self._make_tensor, self._allowed = on_storage, make_tensor, allowed
        self.namespaces: list[argparse.Namespace] = []
        self._namespace_class = _namespace_class_for(self.namespaces)

    def find_class(self, module, name):
        module, name = _python3_name(module, name)
        value = self._allowed.get((module, name))
        if value is None:
            raise FormatError(f"{self.path}: refusing to unpickle global '{str(module)[:200]}.{str(name)[:200]}': "
                              "not in pyconv's allowlist (pickled checkpoints can run code)")
        if value is _SealedNamespace:
            return self._namespace_class
        if type(value) is _NeedsUnpickler:
            return _Global(value.fn, self)
        if callable(value) and not isinstance(value, _Sealed):
            return _Global(value, None)
        return value

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise FormatError("persistent id is not ('storage', type, key, location, numel)")
        _, storage_type, key, location, numel = pid
        if type(location) is bytes:  # Python 2 era pickles
            location = location.decode("ascii", "replace")
        if type(storage_type) is not StorageType or type(key) is not str or type(location) is not str:
            raise FormatError("persistent id is not ('storage', storage type, str key, str location, numel)")
        if not _is_int(numel):
            raise FormatError(f"storage '{key[:64]}': numel must be an integer in [0, 2**63)")
        storage = PersistentStorage(storage_type, key, location, numel)
        self._on_storage(storage)
        return storage

    def add_tensor(self, rebuilt: RebuiltTensor):
        tensor = self._make_tensor(rebuilt)
        self.tensors.append(tensor)
        self._tensor_ids.add(id(tensor))
        return tensor

    def is_tensor(self, obj) -> bool:
        return id(obj) in self._tensor_ids


def _opcode_actions() -> dict:
    """For each opcode: (action, pops a mark, items taken below the mark or from the top,
    what it pushes). Only the memo, marks and tuple nesting need more than the stack counts."""
    markobject = pickletools.markobject
    actions = {}
    for op in pickletools.opcodes:
        name = op.name
        before = op.stack_before
        takes_mark = markobject in before
        below = before.index(markobject) if takes_mark else len(before)
        if name in ("EXT1", "EXT2", "EXT4"):  # copyreg's extension registry: nothing honest uses it
            action = "refuse"
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            action = "put"
        elif name in ("GET", "BINGET", "LONG_BINGET", "MARK", "DUP"):
            action = name.lower().removeprefix("bin").removeprefix("long_bin")
        elif name in ("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            action = "tuple"
        elif name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"):
            action = "in_place"  # leaves its container, not a new object, on the stack
        else:
            action = "other"
        actions[op] = (action, name, takes_mark, below, len(op.stack_after))
    return actions


_OPCODE_ACTIONS = _opcode_actions()


def prescan(path: str, data: bytes) -> None:
    """Checks the opcodes before anything is built: no memo index beyond the pickle's size, no
    length prefix past its end, tuples at most MAX_TUPLE_DEPTH deep. It replays the stack with
    pickletools' stack effects (marks kept apart, as the C unpickler does), recording per slot
    only how deep a tuple it holds. Costs about 1.5 us per opcode (pure Python)."""
    if len(data) > MAX_PICKLE_BYTES:
        raise FormatError(f"{path}: pickle of {len(data)} bytes exceeds pyconv's limit of {MAX_PICKLE_BYTES}")
    stack: list[int] = []  # per slot: nesting depth of the tuple it holds, 0 for anything else
    marks: list[int] = []  # stack heights at each MARK
    memo: dict[int, int] = {}
    fence = 0  # the C unpickler never pops below the last mark
    actions = _OPCODE_ACTIONS
    built = 0  # estimated bytes of the objects the load would build
    try:
        for op, arg, pos in pickletools.genops(data):
            action, name, takes_mark, below, pushes = actions[op]
            built += (_MEMO_BYTES if action == "put" else _SLOT_BYTES if action in ("get", "dup", "in_place")
                      else _OBJECT_BYTES + (len(arg) if type(arg) in (str, bytes) else 0) if pushes else 0)
            if built > MAX_UNPICKLED_BYTES:
                raise FormatError(f"{path}: unpickling would build more than {MAX_UNPICKLED_BYTES >> 20} MiB of "
                                  f"objects by byte {pos} of {len(data)} (a pickle bomb?); pyconv refuses it")
            if action == "other" and not takes_mark:
                if below:
                    if len(stack) - below < fence:
                        raise FormatError(f"{path}: pickle stack underflow at byte {pos}")
                    del stack[len(stack) - below:]
                if pushes:
                    stack.extend((0,) * pushes)
            elif action == "put":
                index = len(memo) if arg is None else arg
                if not 0 <= index <= len(data):
                    raise FormatError(f"{path}: pickle memo index {index} at byte {pos} exceeds the pickle's size")
                if len(stack) <= fence:
                    raise FormatError(f"{path}: pickle stack underflow at byte {pos}")
                memo[index] = stack[-1]
            elif action == "get":
                stack.append(memo.get(arg, 0))
            elif action == "mark":
                marks.append(len(stack))
                fence = len(stack)
            elif action == "dup":
                if len(stack) <= fence:
                    raise FormatError(f"{path}: pickle stack underflow at byte {pos}")
                stack.append(stack[-1])
            elif action == "refuse":
                raise FormatError(f"{path}: pickle opcode {name} at byte {pos} is not allowed")
            else:  # a tuple, an in-place update, or any opcode that pops to a mark
                popped: list[int] = []
                if takes_mark:
                    if not marks:
                        raise FormatError(f"{path}: pickle opcode {name} at byte {pos} has no MARK")
                    top = marks.pop()
                    fence = marks[-1] if marks else 0
                    popped = stack[top:]
                    del stack[top:]
                if len(stack) - below < fence:
                    raise FormatError(f"{path}: pickle stack underflow at byte {pos}")
                if below:
                    popped = stack[len(stack) - below:] + popped
                    del stack[len(stack) - below:]
                built += _SLOT_BYTES * len(popped)  # the items now held by a container
                if action == "tuple":
                    depth = 1 + max(popped, default=0)
                    if depth > MAX_TUPLE_DEPTH:
                        raise FormatError(f"{path}: tuples nested more than {MAX_TUPLE_DEPTH} deep at byte {pos}")
                    stack.append(depth)
                elif action == "in_place":
                    stack.append(popped[0])
                else:
                    stack.extend((0,) * pushes)
    except ValueError as e:  # pickletools: truncated argument, unknown opcode
        raise FormatError(f"{path}: malformed pickle: {str(e)[:200]}") from None


def restricted_load(data: bytes, path: str, **hooks) -> tuple[Any, RestrictedUnpickler]:
    """Unpickles `data` (read from `path`, named in errors) with the allowlist; returns the
    object and the unpickler (whose `.tensors` lists what make_tensor returned)."""
    prescan(path, data)
    unpickler = RestrictedUnpickler(io.BytesIO(data), path, **hooks)
    try:
        obj = unpickler.load()
        for namespace in unpickler.namespaces:
            namespace.__class__ = argparse.Namespace
        return obj, unpickler
    except FormatError as e:
        message = str(e)
        raise FormatError(message if message.startswith(f"{path}: ") else f"{path}: {message}") from None
    except Exception as e:  # noqa: BLE001 - any failure of hostile bytes is a format error
        raise FormatError(f"{path}: malformed pickle: {type(e).__name__}: {str(e)[:200]}") from None


def load_pickle_file(path: str) -> Any:
    """A plain pickle file (no storages) through the allowlist."""
    with open(path, "rb") as f:
        data = f.read(MAX_PICKLE_BYTES + 1)
    return restricted_load(data, path)[0]
