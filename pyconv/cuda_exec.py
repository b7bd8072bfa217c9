"""The `--device cuda` executor: runs the same ReshardPlan as the C++ core, with the tensor
arithmetic (casts, fp8 dequantization and quantization, the row permutations around a cast)
in the Triton kernels of the `kernels` package, and gives the same bytes.

    reader threads                main thread (one CUDA stream per slot)         writer threads
    pread / strided gather   ──▶  H2D ─▶ kernels ─▶ D2H (non-blocking)     ──▶  wait event, write
    into a pinned slot            the next item's H2D overlaps these kernels     frees the slot

Work is cut into items: bands of whole rows of one output tensor, sized so that the source
bytes and the output bytes of a band fit one pinned slot (`slot_bytes`). `slots` slots are
recycled, so pinned host memory is slots x slot_bytes and device memory about twice that
(a band's staged source and its output), whatever the model size. A tensor that needs no
arithmetic (same dtype, no scales) never goes to the GPU: its bytes are read straight into
place in the slot and written, as the CPU path's copy would.

Under TRITON_INTERPRET=1 the same code runs with CPU tensors: the "device" is the CPU, the
H2D and D2H copies disappear (the kernels read and write the slot itself), streams and
events become no-ops. Without a GPU and without the interpreter, --device cuda is refused.

torch and triton are imported only here, and only when --device cuda is asked for.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pyconv import _core
from pyconv.dtypes import ITEMSIZE
from pyconv.errors import Cancelled, FormatError, LayoutError, PyconvError
from pyconv.plan import PlannedTensor, ReshardPlan, core_records

QUANT_BLOCK = 128
ALIGN = 64  # byte alignment of every region inside a slot


def _round_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def interpreting() -> bool:
    """TRITON_INTERPRET set as triton reads it (1, true or on)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def load_backend():
    """(torch, pyconv._kernels.ops, device) for --device cuda, or a PyconvError saying why not."""
    interpret = interpreting()
    try:
        import torch
    except ImportError:
        raise PyconvError("device cuda needs torch (pip install torch)") from None
    if not interpret and not torch.cuda.is_available():
        raise PyconvError("device cuda: no CUDA GPU is available to torch (set TRITON_INTERPRET=1 to run the "
                          "GPU kernels on the CPU with Triton's interpreter, or use device cpu)")
    try:
        from pyconv._kernels import ops
    except ImportError as e:
        raise PyconvError(f"device cuda needs triton (pip install triton): {e}") from None
    if interpret:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.max, InterpretedFunction):  # triton's own jit functions were compiled for a GPU
            raise PyconvError("device cuda: TRITON_INTERPRET=1 was set after triton had been imported in this "
                              "process; set it before Python starts")
    device = torch.device("cpu") if interpret else torch.device("cuda", torch.cuda.current_device())
    return torch, ops, device


# -- what an item needs: reads into the slot, kernel launches, writes ---------------------------

@dataclass
class _Read:
    """Copy rows of `row_bytes` from `path` at `offset` (rows `stride` apart; stride 0 repeats
    one row) into the slot at `at`, rows `dst_stride` apart."""
    path: str
    offset: int
    stride: int
    rows: int
    row_bytes: int
    at: int
    dst_stride: int


@dataclass
class _Item:
    file_index: int
    tensor: PlannedTensor
    row0: int
    row1: int
    reads: list = field(default_factory=list)
    launches: list = field(default_factory=list)  # (kind, args) for the device
    stage_bytes: int = 0      # staged source bytes (and row tables) at the start of the slot
    out_at: int = 0           # where the output band starts in the slot
    out_bytes: int = 0
    writes: list = field(default_factory=list)  # (slot offset, length, file offset)
    on_device: bool = False

    @property
    def slot_bytes(self) -> int:
        return self.out_at + self.out_bytes

    @property
    def write_bytes(self) -> int:
        return sum(length for _, length, _ in self.writes)


def _needs_kernels(t: PlannedTensor) -> bool:
    return t.quantize is not None or any(c.src_dtype != t.dtype or c.scale_source is not None for c in t.copies)


def cols_of(item: _Item) -> int:
    return item.tensor.view2d[1]


def _band_rows(t: PlannedTensor, rows: int, cols: int, budget: int) -> int:
    src_isz = max([ITEMSIZE[c.src_dtype] for c in t.copies] + [1])
    per_row = cols * (src_isz + ITEMSIZE[t.dtype]) + 16  # staged source + output + row tables
    if t.quantize is not None:
        per_row += 8  # the scales, amortised
        return max(QUANT_BLOCK, budget // per_row // QUANT_BLOCK * QUANT_BLOCK)
    return max(1, min(rows, budget // max(per_row, 1)))


def _items(plan: ReshardPlan, budget: int) -> list[_Item]:
    items = []
    for fi, f in enumerate(plan.files):
        for t in sorted(f.tensors, key=lambda t: t.offset):
            rows, cols = t.view2d
            if not rows or not cols:
                continue
            step = _band_rows(t, rows, cols, budget)
            for r0 in range(0, rows, step):
                items.append(_layout(fi, t, r0, min(rows, r0 + step)))
    return items


def _merge_reads(reads: list) -> list:
    """Contiguous reads of one file that land back to back in the slot become one."""
    out = []
    for r in reads:
        if out:
            p = out[-1]
            p_len = p.rows * p.row_bytes
            if (p.path == r.path and (p.rows == 1 or p.stride == p.row_bytes == p.dst_stride)
                    and (r.rows == 1 or r.stride == r.row_bytes == r.dst_stride)
                    and r.offset == p.offset + p_len and r.at == p.at + p_len):
                out[-1] = _Read(p.path, p.offset, 0, 1, p_len + r.rows * r.row_bytes, p.at, 0)
                continue
        out.append(r)
    return out


def _layout(fi: int, t: PlannedTensor, r0: int, r1: int) -> _Item:
    """Plans one band: where its source bytes go in the slot, which kernels run, what is written."""
    rows, cols = t.view2d
    isz = ITEMSIZE[t.dtype]
    item = _Item(fi, t, r0, r1)
    n = r1 - r0
    hits = []
    for c in t.copies:
        h0, h1 = max(r0, c.dst_row), min(r1, c.dst_row + c.rows)
        if h0 < h1 and c.cols:
            hits.append((c, h0, h1))

    if not _needs_kernels(t):
        # Bytes in place: each copy's rows land at their output position in the slot.
        out_row = cols * isz
        for c, h0, h1 in hits:
            at = (h0 - r0) * out_row + c.dst_col * isz
            if c.transpose:
                item.launches.append(("host_transpose", c, h0, h1, at, out_row))
                continue
            first = c.src_offset + (h0 - c.dst_row) * c.src_row_stride
            item.reads.append(_Read(c.source, first, c.src_row_stride, h1 - h0, c.cols * isz, at, out_row))
        item.out_at, item.out_bytes = 0, n * out_row
        item.writes.append((0, n * out_row, t.offset + r0 * out_row))
        return item

    item.on_device = True
    at = 0
    out_fmt = "F32" if t.quantize is not None else t.dtype
    rows_groups: dict = {}  # (src dtype, cols) -> row segments
    # Stage the copies in source order: neighbouring source ranges (the row blocks of the q
    # heads of one rank's fused QKV shard, say) then merge into one read (_merge_reads).
    for c, h0, h1 in sorted(hits, key=lambda h: (h[0].source, h[0].src_offset)):
        s_isz = ITEMSIZE[c.src_dtype]
        if c.transpose:  # source rows are output columns: c.cols rows of (h1 - h0) elements
            first = c.src_offset + (h0 - c.dst_row) * s_isz
            item.reads.append(_Read(c.source, first, c.src_row_stride, c.cols, (h1 - h0) * s_isz, at, (h1 - h0) * s_isz))
            item.launches.append(("transpose", c.src_dtype, at // s_isz, h1 - h0, c.cols,
                                  (h0 - r0) * cols + c.dst_col))
            at = _round_up(at + c.cols * (h1 - h0) * s_isz)
            continue
        first = c.src_offset + (h0 - c.dst_row) * c.src_row_stride
        stored_rows = 1 if c.src_row_stride == 0 else h1 - h0
        item.reads.append(_Read(c.source, first, c.src_row_stride, stored_rows, c.cols * s_isz, at, c.cols * s_isz))
        if c.scale_source is not None:
            q_at = at
            at = _round_up(at + stored_rows * c.cols)
            b = c.scale_block
            srow0 = c.scale_row0 + (h0 - c.dst_row)
            b0, b1 = srow0 // b, (srow0 + h1 - h0 - 1) // b
            k0, k1 = c.scale_col0 // b, (c.scale_col0 + c.cols - 1) // b
            nk = k1 - k0 + 1
            item.reads.append(_Read(c.scale_source, c.scale_offset + b0 * c.scale_row_stride + k0 * 4,
                                    c.scale_row_stride, b1 - b0 + 1, nk * 4, at, nk * 4))
            item.launches.append(("dequant", q_at, at // 4, h1 - h0, c.cols, (h0 - r0) * cols + c.dst_col, nk,
                                  srow0 - b0 * b, c.scale_col0 - k0 * b, b))
            at = _round_up(at + (b1 - b0 + 1) * nk * 4)
            continue
        # (first source element, first output element, rows, whether one source row repeats)
        rows_groups.setdefault((c.src_dtype, c.cols), []).append(
            (at // s_isz, (h0 - r0) * cols + c.dst_col, h1 - h0, c.src_row_stride == 0))
        at = _round_up(at + stored_rows * c.cols * s_isz)
    for (src_dtype, ccols), segments in rows_groups.items():
        if len(segments) == 1 and ccols == cols and not segments[0][3]:
            # One run of whole rows in, one out: a plain contiguous cast.
            src0, dst0, nrows, _ = segments[0]
            item.launches.append(("cast", src_dtype, src0, dst0, nrows * cols))
            continue
        # Anything else (the q, k, v row blocks of a fused QKV shard, [gate; up], repeated
        # padding rows, shards placed side by side) is one row-table launch per source dtype
        # and width: the table, built by the reader, gives each output row its source row.
        nrows = sum(seg[2] for seg in segments)
        bits = ccols | cols
        for src0, dst0, _, _ in segments:
            bits |= src0 | dst0
        align = min(16, bits & -bits)  # divides every row start and the width: vector loads
        item.launches.append(("rows", src_dtype, ccols, at, segments, nrows, align))
        at = _round_up(at + 16 * nrows)
    item.stage_bytes = at
    item.reads = _merge_reads(item.reads)

    if t.quantize is not None:
        grid_cols = -(-cols // QUANT_BLOCK)
        bands = -(-n // QUANT_BLOCK)
        item.out_at = at
        item.out_bytes = _round_up(n * cols) + bands * grid_cols * 4
        item.launches.append(("quantize", n, cols, _round_up(n * cols), bands * grid_cols))
        item.writes.append((at, n * cols, t.offset + r0 * cols))
        item.writes.append((at + _round_up(n * cols), bands * grid_cols * 4,
                            t.quantize + (r0 // QUANT_BLOCK) * grid_cols * 4))
    else:
        item.out_at = at
        item.out_bytes = n * cols * isz
        item.writes.append((at, n * cols * isz, t.offset + r0 * cols * isz))
    item.launches.append(("out_fmt", out_fmt))
    return item


# -- the run ------------------------------------------------------------------------------------

class _Sources:
    """The plan's source files as the core maps them (_core.MappedFile, opened read-only once):
    their descriptors for pread, numpy views of the mappings for strided gathers."""

    def __init__(self, paths):
        import numpy as np

        self._files = {path: _core.MappedFile(path) for path in paths}
        self._views = {path: np.frombuffer(f, dtype=np.uint8) if f.size else np.zeros(0, np.uint8)
                       for path, f in self._files.items()}

    def fd(self, path: str) -> int:
        return self._files[path].fd

    def view(self, path: str):
        return self._views[path]

    def close(self):  # a mapping is released with the last view of it
        self._views.clear()
        self._files.clear()


def _do_read(sources: _Sources, r: _Read, slot) -> None:
    """One read into the slot (a numpy uint8 view of pinned memory)."""
    import numpy as np

    length = r.rows * r.row_bytes
    if r.rows == 1 or (r.stride == r.row_bytes and r.dst_stride == r.row_bytes):
        buf = memoryview(slot[r.at:r.at + length])
        done = 0
        while done < length:
            got = os.preadv(sources.fd(r.path), [buf[done:]], r.offset + done)
            if got <= 0:
                raise FormatError(f"{r.path}: unexpected end of file at byte {r.offset + done}")
            done += got
        return
    src = sources.view(r.path)
    block = np.lib.stride_tricks.as_strided(src[r.offset:], shape=(r.rows, r.row_bytes), strides=(r.stride, 1))
    dst = np.lib.stride_tricks.as_strided(slot[r.at:], shape=(r.rows, r.row_bytes), strides=(r.dst_stride, 1))
    dst[...] = block


def _host_transpose(sources: _Sources, c, h0: int, h1: int, at: int, out_row: int, slot) -> None:
    """A same-dtype transposed copy (GPT-2's Conv1D): gathered transposed on the host."""
    import numpy as np

    isz = ITEMSIZE[c.src_dtype]
    src = sources.view(c.source)
    first = c.src_offset + (h0 - c.dst_row) * isz
    block = np.lib.stride_tricks.as_strided(src[first:], shape=(h1 - h0, c.cols, isz),
                                            strides=(isz, c.src_row_stride, 1))
    dst = np.lib.stride_tricks.as_strided(slot[at:], shape=(h1 - h0, c.cols, isz), strides=(out_row, isz, 1))
    dst[...] = block


class _NoEvent:
    def synchronize(self):
        pass


SLOT_BYTES = 64 << 20  # one pinned slot: a band's staged source and its output
SLOTS = 4


def execute_plan_cuda(plan: ReshardPlan, root: str, *, threads: int = 4, slot_bytes: int | None = None,
                      slots: int | None = None, progress=None) -> dict:
    """Writes the plan's files under root (the temporary directory execute_plan commits)."""
    # The core checks the plan exactly as before it runs one itself (indices, dtype pairs, every
    # byte range against the file sizes, disjoint copies tiling each tensor, no overlapping file
    # ranges); what follows relies on that and checks nothing again. The kernels support the
    # dtype pairs the core accepts (same dtype, F32/BF16/F16 among themselves, block-scaled
    # F8_E4M3 to those, those quantized to F8_E4M3), so no check here is cuda's own.
    if any(c.low_rank for f in plan.files for t in f.tensors for c in t.copies):
        raise LayoutError("--device cuda does not merge LoRA adapters yet: merge them with --device cpu")
    core_args = core_records(plan, root)
    _core.validate(*core_args)
    torch, ops, device = load_backend()
    slot_bytes, slots = slot_bytes or SLOT_BYTES, slots or SLOTS
    import numpy as np

    started = time.perf_counter()
    on_gpu = device.type == "cuda"
    items = _items(plan, slot_bytes)
    total = sum(i.write_bytes for i in items) + sum(len(d) for f in plan.files for _, d in f.literals)

    sources = _Sources(core_args[0])
    outputs = []  # the plan's files, as the core creates and writes them (_core.OutputFile)
    pool = queue.Queue()
    for _ in range(slots):
        pool.put(None)  # slots are allocated on first use, at slot_bytes
    streams = [torch.cuda.Stream(device) for _ in range(2)] if on_gpu else [None, None]
    readers = ThreadPoolExecutor(max(1, threads), thread_name_prefix="pyconv-read")
    writers = ThreadPoolExecutor(max(1, min(threads, slots)), thread_name_prefix="pyconv-write")
    done = [0]
    done_lock = threading.Lock()
    launches: dict = {}  # kernel launches by kind

    allocated = []  # sizes of the pinned slots allocated: at most `slots` of slot_bytes, plus oversized ones

    def new_slot(size):
        allocated.append(size)
        return torch.empty(size, dtype=torch.uint8, pin_memory=on_gpu)

    def read_item(item: _Item, slot):
        if slot is None or slot.numel() < item.slot_bytes:
            slot = new_slot(max(item.slot_bytes, slot_bytes if slot is None else 0))
        host = slot.numpy()
        for r in item.reads:
            _do_read(sources, r, host)
        for launch in item.launches:
            if launch[0] == "host_transpose":
                _host_transpose(sources, *launch[1:], host)
            elif launch[0] == "rows":
                _, _, ccols, table_at, segments, nrows, _ = launch
                table = host[table_at:table_at + 16 * nrows].view(np.int64)
                at = 0
                for src0, dst0, n, repeat in segments:
                    i = np.arange(n, dtype=np.int64)
                    table[at:at + n] = src0 if repeat else src0 + i * ccols
                    table[nrows + at:nrows + at + n] = dst0 + i * cols_of(item)
                    at += n
        return slot

    def write_item(item: _Item, slot, event):
        event.synchronize()
        host = slot.numpy()
        out = outputs[item.file_index]
        for at, length, offset in item.writes:
            out.write(offset, host[at:at + length])
        with done_lock:
            done[0] += item.write_bytes
        pool.put(slot if slot.numel() <= slot_bytes else None)

    def run_on_device(item: _Item, slot, stream):
        """H2D, kernels, D2H on `stream`; returns the event the writer waits for."""
        t = item.tensor
        rows, cols = t.view2d
        n = item.row1 - item.row0
        ctx = torch.cuda.stream(stream) if on_gpu else _nullcontext()
        with ctx:
            stage = slot[:item.stage_bytes].to(device, non_blocking=True) if on_gpu else slot[:item.stage_bytes]
            out_fmt = ops.FORMAT_NAMES[item.launches[-1][1]]
            if t.quantize is not None:
                band = torch.empty(n * cols * 4, dtype=torch.uint8, device=device)
            elif on_gpu:
                band = torch.empty(item.out_bytes, dtype=torch.uint8, device=device)
            else:
                band = slot[item.out_at:item.out_at + item.out_bytes]
            band_bits = band.view(ops.BITS_DTYPE[out_fmt])
            for launch in item.launches:
                kind = launch[0]
                if kind == "rows":
                    _, src_dtype, ccols, table_at, _, nrows, align = launch
                    fmt = ops.FORMAT_NAMES[src_dtype]
                    table = stage[table_at:table_at + 16 * nrows].view(torch.int64)
                    ops.launch_gather_rows(stage.view(ops.BITS_DTYPE[fmt]), fmt, table[:nrows], band_bits,
                                           out_fmt, table[nrows:], nrows, ccols, align)
                elif kind == "cast":
                    _, src_dtype, src0, dst0, count = launch
                    fmt = ops.FORMAT_NAMES[src_dtype]
                    ops.launch_cast(stage.view(ops.BITS_DTYPE[fmt])[src0:], fmt, band_bits[dst0:], out_fmt, count)
                elif kind == "transpose":
                    _, src_dtype, src_elem, r, c, dst_elem = launch
                    fmt = ops.FORMAT_NAMES[src_dtype]
                    ops.launch_transpose(stage.view(ops.BITS_DTYPE[fmt])[src_elem:], fmt, band_bits, out_fmt, dst_elem,
                                         r, c, cols)
                elif kind == "dequant":
                    _, q_at, s_elem, r, c, dst_elem, nk, row_base, col_base, b = launch
                    ops.launch_dequant(stage[q_at:], stage.view(torch.int32)[s_elem:], band_bits, out_fmt, dst_elem,
                                       r, c, cols, nk, row_base, col_base, b)
                elif kind == "quantize":
                    _, qr, qc, q_bytes, grid = launch
                    out = (torch.empty(item.out_bytes, dtype=torch.uint8, device=device) if on_gpu
                           else slot[item.out_at:item.out_at + item.out_bytes])
                    ops.launch_quantize(band_bits, out[:qr * qc], out[q_bytes:q_bytes + grid * 4].view(torch.int32),
                                        qr, qc)
                    band = out
                else:
                    continue
                launches[kind] = launches.get(kind, 0) + 1
            if not on_gpu:
                return _NoEvent()
            slot[item.out_at:item.out_at + item.out_bytes].copy_(band[:item.out_bytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            return event

    with contextlib.ExitStack() as stack:  # unwound last in, first out: the pools, the files, the sources
        stack.callback(sources.close)
        # Created and preallocated, so that a full disk fails now. After an error each is closed
        # without a word (that error is the one raised), as the core's destructor closes its own.
        outputs.extend(stack.enter_context(_core.OutputFile(path, size)) for path, size in core_args[1])
        stack.callback(writers.shutdown, wait=True, cancel_futures=True)  # no write is left when a file closes
        stack.callback(readers.shutdown, wait=True, cancel_futures=True)
        for f, out in zip(plan.files, outputs):
            for offset, data in f.literals:
                out.write(offset, data)
                done[0] += len(data)
        pending: deque = deque()
        writes: deque = deque()
        upcoming = iter(items)

        def fill():
            while len(pending) < slots:
                item = next(upcoming, None)
                if item is None:
                    return
                while True:  # slots are taken in item order, so the window always moves on
                    try:
                        slot = pool.get(timeout=0.05)
                        break
                    except queue.Empty:
                        for w in writes:  # a failed write frees no slot: raise its error
                            if w.done():
                                w.result()
                pending.append((item, readers.submit(read_item, item, slot)))

        fill()
        k = 0
        while pending:
            item, future = pending.popleft()
            slot = future.result()
            event = run_on_device(item, slot, streams[k % 2]) if item.on_device else _NoEvent()
            k += 1
            writes.append(writers.submit(write_item, item, slot, event))
            while writes and writes[0].done():
                writes.popleft().result()
            if progress is not None and progress(done[0], total) is False:
                raise Cancelled("cancelled")
            fill()
        for w in writes:
            w.result()
        if progress is not None and progress(done[0], total) is False:
            raise Cancelled("cancelled")
        for out in outputs:  # as the core ends a run: every file synced, then every file closed
            out.sync()
        for out in outputs:
            out.close()
    return {"bytes_written": done[0], "tasks": len(items), "device_tasks": sum(i.on_device for i in items),
            "kernel_launches": sum(launches.values()), "launches": launches,
            "pinned_slots": len([a for a in allocated if a <= slot_bytes]),
            "oversized_slots": len([a for a in allocated if a > slot_bytes]), "seconds": time.perf_counter() - started,
            "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (TRITON_INTERPRET=1)"}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
