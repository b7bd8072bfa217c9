"""The reshard plan: frozen data saying which bytes go where. Building it reads no tensor bytes.

    ReshardPlan
      └─ PlannedFile (path relative to the destination, size, literal bytes such as headers)
           └─ PlannedTensor (name, dtype, shape, byte offset in the file)
                └─ BlockCopy (source file, byte offset, row stride, rows x cols -> (dst_row, dst_col))
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import MISSING, dataclass, field, fields

from pyconv.catalog import CanonicalTensor, LowRankDelta, view2d
from pyconv.dtypes import ITEMSIZE
from pyconv.errors import LayoutError
from pyconv.fp8 import FP8_BLOCK


def quick_init(cls):
    """A frozen dataclass whose __init__ fills the instance dict in one step. The generated one
    calls object.__setattr__ once per field (3.5 us for a BlockCopy's 15): at 150k tensors that
    was most of a plan's time. Same signature, defaults and immutability afterwards."""
    params, items, defaults = [], [], {}
    for f in fields(cls):
        if f.default is not MISSING:
            defaults[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
        elif f.default_factory is not MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: quick_init takes plain defaults only")
        else:
            params.append(f.name)
        items.append(f"{f.name!r}: {f.name}")
    source = f"def __init__(self, {', '.join(params)}):\n    self.__dict__.update({{{', '.join(items)}}})\n"
    namespace: dict = {}
    exec(source, dict(defaults), namespace)  # noqa: S102 - built from the class's own field names
    namespace["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = namespace["__init__"]
    return cls


@dataclass(frozen=True)
class LowRankTerm:
    """A low-rank update merged into a BlockCopy (see csrc/executor.h): element (i, j) of the copy
    gains scale * sum_k L[i][k] * R[k][j]; L[i][k] at left_offset + i * left_row_stride +
    k * left_k_stride of left_source, R[k][j] at right_offset + k * right_k_stride +
    j * right_col_stride of right_source (bytes)."""

    left_source: str
    left_offset: int
    left_row_stride: int
    left_k_stride: int
    left_dtype: str
    right_source: str
    right_offset: int
    right_k_stride: int
    right_col_stride: int
    right_dtype: str
    rank: int
    scale: float


def low_rank_term(delta: LowRankDelta, tensor: CanonicalTensor, row0: int, col0: int) -> LowRankTerm:
    """The term of a delta for a copy whose element (0, 0) is element (row0, col0) of the tensor's 2-D view."""
    rows, cols = view2d(tensor.shape)
    left, right = delta.left, delta.right
    rank = left.shape[0] if delta.left_transposed else left.shape[1]
    want_left = (rank, rows) if delta.left_transposed else (rows, rank)
    want_right = (cols, rank) if delta.right_transposed else (rank, cols)
    if tuple(left.shape) != want_left or tuple(right.shape) != want_right or left.strides or right.strides:
        raise LayoutError(f"tensor {tensor.name}: the low-rank factors of {delta.adapter} are {list(left.shape)} and "
                          f"{list(right.shape)}, not {list(want_left)} and {list(want_right)} (contiguous)")
    li, ri = ITEMSIZE[left.dtype], ITEMSIZE[right.dtype]
    if delta.left_transposed:  # L[i][k] = stored[k][i]
        left_at, left_row, left_k = left.offset + row0 * li, li, rows * li
    else:
        left_at, left_row, left_k = left.offset + row0 * rank * li, rank * li, li
    if delta.right_transposed:  # R[k][j] = stored[j][k]
        right_at, right_k, right_col = right.offset + col0 * rank * ri, ri, rank * ri
    else:
        right_at, right_k, right_col = right.offset + col0 * ri, cols * ri, ri
    return LowRankTerm(left.path, left_at, left_row, left_k, left.dtype, right.path, right_at, right_k, right_col,
                       right.dtype, rank, delta.scale)


@quick_init
@dataclass(frozen=True)
class BlockCopy:
    source: str          # absolute path of the source file
    src_offset: int      # absolute byte offset of the block's first element
    src_row_stride: int  # bytes between block rows in the source (0 repeats a row)
    src_dtype: str
    rows: int
    cols: int
    dst_row: int         # position in the output tensor's 2-D view
    dst_col: int
    transpose: bool = False  # the source block is cols x rows and is written transposed
    # A block-scaled F8_E4M3 source (DeepSeek-V3 `weight_scale_inv`, W = q * S): naming its
    # float32 scale grid S makes the copy dequantize into an F32/BF16/F16 tensor (or feed a
    # quantized one). Source element (i, j) of the copy has scale
    # S[(scale_row0 + i) // scale_block][(scale_col0 + j) // scale_block].
    scale_source: str | None = None  # absolute path of the file holding S; None: no scale
    scale_offset: int = 0            # absolute byte offset of S[0][0] (the whole weight's grid)
    scale_row_stride: int = 0        # bytes between rows of S
    scale_row0: int = 0              # row, in the whole source weight, of the copy's first element
    scale_col0: int = 0              # its column
    scale_block: int = 128
    low_rank: tuple[LowRankTerm, ...] = ()  # LoRA deltas merged into the copied elements, in order


@quick_init
@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the output file
    copies: tuple[BlockCopy, ...]
    # Quantize to F8_E4M3 (dtype "F8_E4M3") with 128x128 block scales: the byte offset, in
    # the same file, of the float32 scale grid [ceil(M/128), ceil(N/128)] the executor
    # writes (plan it as its own region; no copy covers it). None: a plain tensor.
    quantize: int | None = None
    # The 2-D [rows, cols] the copies address, when not view2d(shape): a row-interleaved
    # [g0; u0; g1; u1...] weight is [n, 2 * in] to its copies (gate in the left half).
    view: tuple[int, int] | None = None

    @property
    def view2d(self) -> tuple[int, int]:
        return self.view if self.view is not None else view2d(self.shape)

    @property
    def nbytes(self) -> int:
        rows, cols = self.view2d
        return rows * cols * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class PlannedFile:
    path: str  # relative to the destination directory
    size: int
    tensors: tuple[PlannedTensor, ...] = ()
    literals: tuple[tuple[int, bytes], ...] = ()  # (offset, bytes) written verbatim
    kind: str = "weights"  # "weights", "metadata" (generated JSON) or "copy" (carried over verbatim)


@dataclass(frozen=True)
class ReshardPlan:
    source: str
    source_format: str
    target: dict  # the target spec, JSON-able
    files: tuple[PlannedFile, ...]
    notes: tuple[str, ...] = field(default=())
    # The model tensors (canonical, by Hugging Face name: what `inspect` counts) the files hold;
    # tensor_count counts what the files store (TP shards, fused QKV, per-rank replicas...).
    model_tensors: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def tensor_count(self) -> int:
        return sum(len(f.tensors) for f in self.files if f.kind == "weights")

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "source_format": self.source_format,
            "target": self.target,
            "total_bytes": self.total_bytes,
            "tensors": self.model_tensors,
            "stored_tensors": self.tensor_count,
            "files": [
                {
                    "path": f.path,
                    "kind": f.kind,
                    "size": f.size,
                    "literals": [{"offset": off, "length": len(data)} for off, data in f.literals],
                    "tensors": [
                        {
                            "name": t.name,
                            "dtype": t.dtype,
                            "shape": list(t.shape),
                            "offset": t.offset,
                            "nbytes": t.nbytes,
                            "copies": [vars(c) for c in t.copies],
                        }
                        for t in f.tensors
                    ],
                }
                for f in self.files
            ],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        lines = [f"plan: {self.source} ({self.source_format}) -> {json.dumps(self.target)}"]
        for f in self.files:
            what = f"{len(f.tensors):>6} tensors" if f.kind == "weights" else f"{f.kind:>14}"
            lines.append(f"  {f.path:<48} {what} {f.size:>16,} bytes")
        lines.append(f"  total: {len(self.files)} files, {self.model_tensors} tensors (stored as {self.tensor_count}), "
                     f"{self.total_bytes:,} bytes")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


_WRITTEN: ContextVar[set | None] = ContextVar("pyconv_written_tensors", default=None)


@contextmanager
def recording_written():
    """Collects the names of the canonical tensors a writer plans into its output (every copy comes
    from copies_for_region), so a plan can say how many model tensors it holds."""
    names: set[str] = set()
    token = _WRITTEN.set(names)
    try:
        yield names
    finally:
        _WRITTEN.reset(token)


def note_written(name: str) -> None:
    """A canonical tensor the output holds without a copy from the source (an empty tensor, a scale
    grid that quantization writes)."""
    written = _WRITTEN.get()
    if written is not None:
        written.add(name)


def copies_for_region(tensor: CanonicalTensor, row0: int, col0: int, rows: int, cols: int,
                      dst_row: int = 0, dst_col: int = 0, transpose: bool = False,
                      dtype: str | None = None) -> list[BlockCopy]:
    """Block copies that move rows [row0, row0+rows) x cols [col0, col0+cols) of a canonical
    tensor's 2-D view to (dst_row, dst_col) of an output tensor (transposed if asked): the
    source blocks clipped to the region. Raises LayoutError if they do not cover it.

    A source block maps canonical [r][c] to stored [src_row + r'][src_col + c'] (r', c'
    relative to the block), or to stored [src_row + c'][src_col + r'] when the block is
    transposed; a copy transposes when exactly one of the block and the request does. Written
    as `dtype`, a block-scaled fp8 source is dequantized with its scale grid."""
    note_written(tensor.name)
    if len(tensor.blocks) == 1 and not tensor.deltas:
        # The common case (a whole stored tensor, or one shard of it) without the general loop.
        b = tensor.blocks[0]
        stored = b.stored
        if (not b.transpose and not transpose and stored.strides is None and b.dst_row == 0 and b.dst_col == 0
                and 0 < rows <= b.rows - row0 and 0 < cols <= b.cols - col0 and 0 <= row0 and 0 <= col0
                and (dtype is None or dtype == stored.dtype or stored.scale is None)):
            offset, row_bytes = stored.row_major_at(b.src_row + row0, b.src_col + col0)
            return [BlockCopy(stored.path, offset, row_bytes, stored.dtype, rows, cols, dst_row, dst_col)]
    out = []
    covered = 0
    for b in tensor.blocks:
        r0, r1 = max(row0, b.dst_row), min(row0 + rows, b.dst_row + b.rows)
        c0, c1 = max(col0, b.dst_col), min(col0 + cols, b.dst_col + b.cols)
        if r0 >= r1 or c0 >= c1:
            continue
        # The stored block read: stored_rows x stored_cols at (src_r, src_c) of the stored 2-D view.
        if b.transpose:
            src_r, src_c = b.src_row + (c0 - b.dst_col), b.src_col + (r0 - b.dst_row)
            stored_rows, stored_cols = c1 - c0, r1 - r0
        else:
            src_r, src_c = b.src_row + (r0 - b.dst_row), b.src_col + (c0 - b.dst_col)
            stored_rows, stored_cols = r1 - r0, c1 - c0
        if transpose:
            at_row, at_col = dst_row + (c0 - col0), dst_col + (r0 - row0)
        else:
            at_row, at_col = dst_row + (r0 - row0), dst_col + (c0 - col0)
        flipped = transpose != b.transpose  # stored element (i, j) lands at output (j, i)
        scale = b.stored.scale if dtype is not None and dtype != b.stored.dtype else None
        if scale is not None and (flipped or b.stored.strides is not None or scale.strides is not None):
            raise LayoutError(f"tensor {tensor.name}: a block-scaled fp8 weight cannot be transposed or strided")
        if tensor.deltas and (flipped or b.transpose or scale is not None):
            raise LayoutError(f"tensor {tensor.name}: a LoRA delta ({tensor.deltas[0].adapter}) cannot be merged into "
                              f"a transposed or block-scaled fp8 copy of it")
        for region in b.stored.regions(src_r, src_c, stored_rows, stored_cols):
            if flipped:
                region_at = (at_row + region.col, at_col + region.row, region.cols, region.rows)
            else:
                region_at = (at_row + region.row, at_col + region.col, region.rows, region.cols)
            if tensor.deltas and not region.along_rows:
                raise LayoutError(f"tensor {tensor.name}: a LoRA delta cannot be merged into a column-major view of it")
            low_rank = tuple(low_rank_term(d, tensor, r0 + region.row, c0 + region.col) for d in tensor.deltas)
            out.append(BlockCopy(
                source=b.stored.path,
                src_offset=region.offset,
                src_row_stride=region.stride,
                src_dtype=b.stored.dtype,
                rows=region_at[2], cols=region_at[3], dst_row=region_at[0], dst_col=region_at[1],
                transpose=flipped if region.along_rows else not flipped,
                low_rank=low_rank,
                **({} if scale is None else dict(
                    scale_source=scale.path, scale_offset=scale.offset,
                    scale_row_stride=view2d(scale.shape)[1] * 4,
                    scale_row0=src_r, scale_col0=src_c, scale_block=FP8_BLOCK))))
        covered += (r1 - r0) * (c1 - c0)
    if covered != rows * cols:
        raise LayoutError(f"tensor {tensor.name}: source blocks cover {covered} of the {rows * cols} elements requested")
    return out


def plan_whole_tensor(tensor: CanonicalTensor, dtype: str, offset: int, quantize: int | None = None) -> PlannedTensor:
    note_written(tensor.name)
    rows, cols = view2d(tensor.shape)
    copies = copies_for_region(tensor, 0, 0, rows, cols, dtype=dtype) if rows and cols else []
    return PlannedTensor(tensor.name, dtype, tensor.shape, offset, tuple(copies), quantize)


def plan_file_copy(source_path: str, size: int, relative_path: str) -> PlannedFile:
    """A small file (tokenizer, generation config) carried over byte for byte."""
    copies = (BlockCopy(source_path, 0, 1, "U8", size, 1, 0, 0),) if size else ()
    tensors = (PlannedTensor(relative_path, "U8", (size,), 0, copies),) if size else ()
    return PlannedFile(relative_path, size, tensors, kind="copy")


def plan_text_file(relative_path: str, text: str) -> PlannedFile:
    data = text.encode("utf-8")
    return PlannedFile(relative_path, len(data), literals=((0, data),), kind="metadata")


@dataclass(frozen=True)
class TargetSpec:
    """What to produce: a format, a dtype (a safetensors dtype name, F32, BF16, F16, F8_E4M3, or
    None to keep) and the format's own options, an instance of its adapter's `Options` (parallel
    sizes for megatron, the shard size for hf...)."""

    format: str = "hf"
    dtype: str | None = None
    options: object = None

    def to_json(self) -> dict:
        options = vars(self.options) if self.options is not None else {}
        return {"format": self.format, "dtype": self.dtype, **options}


_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' (decimal, as transformers), '512MiB' (binary) or plain bytes."""
    if isinstance(text, int):
        value = text
    else:
        s = text.strip().upper()
        digits = s.rstrip("KMGTIB")
        unit = s[len(digits):]
        try:
            number = float(digits)
        except ValueError:
            number = None
        if number is None or unit not in _SIZE_UNITS:
            raise LayoutError(f"cannot read size '{text}' (use bytes or KB/MB/GB, e.g. 5GB)")
        value = int(number * _SIZE_UNITS[unit])
    if value <= 0:
        raise LayoutError(f"size must be positive, got {text}")
    return value


def check_count(name: str, value) -> int:
    """A positive whole number given by the user (tp, pp, threads...), or a LayoutError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayoutError(f"{name} must be a positive integer, got {value!r}")
    return value


class PlannedFiles(list):
    """The planned files, with notes for the plan (what was dropped and why)."""

    notes: tuple[str, ...] = ()


# ---- the records the core reads (_core.execute, _core.validate), written here once ----------------

def copy_record(c: BlockCopy, sources: dict[str, int]) -> tuple:
    """A BlockCopy as the core takes it; `sources` numbers the files as they are first met."""
    fields = (sources.setdefault(c.source, len(sources)), c.src_offset, c.src_row_stride, c.src_dtype,
              c.rows, c.cols, c.dst_row, c.dst_col, c.transpose)
    if c.scale_source is not None:
        fields += (sources.setdefault(c.scale_source, len(sources)), c.scale_offset, c.scale_row_stride,
                   c.scale_row0, c.scale_col0, c.scale_block)
    if c.low_rank:
        fields += ([(sources.setdefault(t.left_source, len(sources)), t.left_offset, t.left_row_stride, t.left_k_stride,
                     t.left_dtype, sources.setdefault(t.right_source, len(sources)), t.right_offset, t.right_k_stride,
                     t.right_col_stride, t.right_dtype, t.rank, t.scale) for t in c.low_rank],)
    return fields


def core_records(plan: ReshardPlan, root: str):
    """The plan as the records _core.execute and _core.validate take, its files under root."""
    sources: dict[str, int] = {}
    dests, literals, tensors = [], [], []
    for file_index, planned in enumerate(plan.files):
        dests.append((os.path.join(root, planned.path), planned.size))
        literals.extend((file_index, offset, data) for offset, data in planned.literals)
        for t in planned.tensors:
            rows, cols = t.view2d
            tensor = (file_index, t.offset, t.dtype, rows, cols, [copy_record(c, sources) for c in t.copies])
            tensors.append(tensor if t.quantize is None else tensor + (t.quantize,))
    return list(sources), dests, literals, tensors
