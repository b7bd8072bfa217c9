"""torch-level entry points of the kernels: they take tensors on the GPU (or CPU tensors
under TRITON_INTERPRET=1), pick the launch grid and reinterpret dtypes as the integer bits
the kernels work on. The executor (pyconv/cuda_exec.py) uses the launch_* functions on
its staging buffers; the rest serve tests and benchmarks."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from .bits import BF16, E4M3, F16, F32
from .cast import cast_contiguous_kernel, gather_rows_cast_kernel, transpose_cast_kernel
from .fp8 import dequant_kernel, quantize_kernel

FORMAT_OF = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16, torch.float8_e4m3fn: E4M3}
FORMAT_NAMES = {"F32": F32, "BF16": BF16, "F16": F16, "F8_E4M3": E4M3}
BITS_DTYPE = {F32: torch.int32, BF16: torch.int16, F16: torch.int16, E4M3: torch.uint8}
TORCH_DTYPE = {F32: torch.float32, BF16: torch.bfloat16, F16: torch.float16, E4M3: torch.float8_e4m3fn}
SCALE_BLOCK = 128
# Compile options every launch passes: no contraction of a multiply and an add into one
# rounding (fma), so each float operation rounds once as on the CPU path. Triton 3.9 still
# fuses by default and will stop in 3.10; saying it pins the bits across versions.
EXACT = {"enable_fp_fusion": False}


@dataclass(frozen=True)
class LaunchShape:
    elements: int  # per program
    num_warps: int


# Compiled for a GPU: 8 elements per thread (a 16-byte vector of 16-bit values), which keeps
# every kernel under 128 registers with nothing spilled on sm_80 and sm_90 (more elements per
# thread took up to 204 registers, and the one-pass quantizer spilled 584 bytes per thread;
# `python bench/compile_kernels.py` prints them). Interpreted: each program is one numpy
# step, so fewer, larger programs are faster.
COMPILED_SHAPES = {"cast": LaunchShape(2048, 8), "rows": LaunchShape(2048, 8), "transpose": LaunchShape(64 * 64, 8),
                   "dequant": LaunchShape(2048, 8), "quantize": LaunchShape(16 * SCALE_BLOCK, 8)}
INTERPRETED_SHAPES = {"cast": LaunchShape(4096, 4), "rows": LaunchShape(4096, 4), "transpose": LaunchShape(64 * 64, 4),
                      "dequant": LaunchShape(16384, 4), "quantize": LaunchShape(SCALE_BLOCK * SCALE_BLOCK, 8)}


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def launch_shape(kernel: str) -> LaunchShape:
    return (INTERPRETED_SHAPES if interpreted() else COMPILED_SHAPES)[kernel]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as the integer type the kernels load and store."""
    return t.view(BITS_DTYPE[FORMAT_OF[t.dtype]])


def _align(*values: int) -> int:
    a = 16
    for v in values:
        while a > 1 and v % a:
            a //= 2
    return a


def rows_block(cols: int, shape: LaunchShape) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the row gather: a row's width up to 1024, as many rows as fill
    the program (at most 16 compiled, 64 interpreted: each row loads its own start)."""
    block_c = min(1024, triton.next_power_of_2(cols))
    return max(1, min(64 if interpreted() else 16, shape.elements // block_c)), block_c


def dequant_block(cols: int, shape: LaunchShape) -> tuple[int, int]:
    block_c = min(256, triton.next_power_of_2(cols))
    return max(1, shape.elements // block_c), block_c


def launch_cast(src_bits, src_fmt: int, dst_bits, dst_fmt: int, n: int) -> None:
    if n:
        shape = launch_shape("cast")
        cast_contiguous_kernel[(triton.cdiv(n, shape.elements),)](src_bits, dst_bits, n, SRC=src_fmt, DST=dst_fmt,
                                                                  BLOCK=shape.elements, num_warps=shape.num_warps,
                                                                  **EXACT)


def launch_gather_rows(src_bits, src_fmt: int, src_start, dst_bits, dst_fmt: int, dst_start, n_rows: int, cols: int,
                       align: int = 1) -> None:
    """src_start, dst_start: int64 tensors of element offsets, one per row."""
    if not n_rows or not cols:
        return
    shape = launch_shape("rows")
    block_r, block_c = rows_block(cols, shape)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(cols, block_c))
    gather_rows_cast_kernel[grid](src_bits, src_start, dst_bits, dst_start, n_rows, cols, SRC=src_fmt, DST=dst_fmt,
                                  ALIGN=align, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=shape.num_warps, **EXACT)


def launch_transpose(src_bits, src_fmt: int, dst_bits, dst_fmt: int, dst_offset: int, rows: int, cols: int,
                     ld: int) -> None:
    if rows and cols:
        shape = launch_shape("transpose")
        side = math.isqrt(shape.elements)
        grid = (triton.cdiv(rows, side), triton.cdiv(cols, side))
        transpose_cast_kernel[grid](src_bits, dst_bits, dst_offset, rows, cols, ld, SRC=src_fmt, DST=dst_fmt,
                                    BLOCK_R=side, BLOCK_C=side, num_warps=shape.num_warps, **EXACT)


def launch_dequant(q, scale_bits, dst_bits, dst_fmt: int, dst_offset: int, rows: int, cols: int, ld: int, nk: int,
                   row_base: int, col_base: int, scale_block: int = SCALE_BLOCK) -> None:
    if rows and cols:
        shape = launch_shape("dequant")
        block_r, block_c = dequant_block(cols, shape)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
        dequant_kernel[grid](q, scale_bits, dst_bits, dst_offset, rows, cols, ld, nk, row_base, col_base, DST=dst_fmt,
                             SCALE_BLOCK=scale_block, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=shape.num_warps,
                             **EXACT)


def launch_quantize(x_bits, q, scale_bits, rows: int, cols: int) -> None:
    """x: rows x cols fp32 bits; q: rows x cols uint8; scales: [ceil(rows/128), ceil(cols/128)]."""
    if rows and cols:
        shape = launch_shape("quantize")
        nk = triton.cdiv(cols, SCALE_BLOCK)
        quantize_kernel[(triton.cdiv(rows, SCALE_BLOCK), nk)](x_bits, q, scale_bits, rows, cols, nk, BLOCK=SCALE_BLOCK,
                                                             SUB_ROWS=shape.elements // SCALE_BLOCK,
                                                             num_warps=shape.num_warps, **EXACT)


# -- tensor in, tensor out ---------------------------------------------------------------------

def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype) for fp32/bf16/fp16, bit for bit as torch's CPU cast and pyconv's core."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    launch_cast(bits(x), FORMAT_OF[x.dtype], bits(out), FORMAT_OF[dtype], x.numel())
    return out


def gather_rows(src: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """src[index].to(dtype) for a 2-D src: a row permutation (or selection) fused with the cast."""
    src = src.contiguous()
    rows, cols = index.numel(), src.shape[1]
    out = torch.empty((rows, cols), dtype=dtype, device=src.device)
    index = index.to(device=src.device, dtype=torch.int64)
    launch_gather_rows(bits(src), FORMAT_OF[src.dtype], index * cols, bits(out), FORMAT_OF[dtype],
                       torch.arange(rows, device=src.device, dtype=torch.int64) * cols, rows, cols, _align(cols))
    return out


def transpose_cast(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """src.t().to(dtype) (contiguous) for a 2-D src."""
    src = src.contiguous()
    cols, rows = src.shape
    out = torch.empty((rows, cols), dtype=dtype, device=src.device)
    launch_transpose(bits(src), FORMAT_OF[src.dtype], bits(out), FORMAT_OF[dtype], 0, rows, cols, cols)
    return out


def qkv_row_index(heads: int, kv_heads: int, head_dim: int, tp: int = 1, rank: int = 0) -> torch.Tensor:
    """Rows of cat([q, k, v]) (HF: q [heads*d], k, v [kv_heads*d] rows) that make Megatron-Core's
    fused linear_qkv shard of TP rank `rank`: per query group j the rows [q_{j*g}..q_{j*g+g-1},
    k_j, v_j], g = heads / kv_heads, the fused rows then split evenly over tp (by whole groups
    when tp divides kv_heads, by raw row count when tp > kv_heads, as Megatron does)."""
    g, d = heads // kv_heads, head_dim
    q_rows, k_rows = heads * d, kv_heads * d
    order = []
    for j in range(kv_heads):
        order.extend(range(j * g * d, (j + 1) * g * d))
        order.extend(range(q_rows + j * d, q_rows + (j + 1) * d))
        order.extend(range(q_rows + k_rows + j * d, q_rows + k_rows + (j + 1) * d))
    per_rank = len(order) // tp
    return torch.tensor(order[rank * per_rank:(rank + 1) * per_rank], dtype=torch.int64)


def qkv_to_megatron(q, k, v, heads: int, kv_heads: int, head_dim: int, tp: int, rank: int, dtype) -> torch.Tensor:
    """Megatron's fused linear_qkv shard for `rank`, cast to dtype, in one kernel."""
    return gather_rows(torch.cat([q, k, v]), qkv_row_index(heads, kv_heads, head_dim, tp, rank), dtype)


def megatron_to_qkv(shards, heads: int, kv_heads: int, head_dim: int, dtype):
    """q, k, v from the tp fused linear_qkv shards, cast to dtype, in one kernel (the inverse permutation)."""
    tp = len(shards)
    fused = torch.cat(list(shards))
    forward = torch.cat([qkv_row_index(heads, kv_heads, head_dim, tp, r) for r in range(tp)])
    inverse = torch.empty_like(forward)
    inverse[forward] = torch.arange(forward.numel())
    out = gather_rows(fused, inverse, dtype)
    q_rows, k_rows = heads * head_dim, kv_heads * head_dim
    return out[:q_rows], out[q_rows:q_rows + k_rows], out[q_rows + k_rows:]


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q.float() * S expanded over 128x128 blocks).to(dtype), rounded once."""
    q = q.contiguous()
    rows, cols = q.shape
    out = torch.empty((rows, cols), dtype=dtype, device=q.device)
    scale = scale.contiguous().float()
    launch_dequant(q.view(torch.uint8), scale.view(torch.int32), bits(out), FORMAT_OF[dtype], 0, rows, cols, cols,
                   scale.shape[1], 0, 0)
    return out


def quantize(x: torch.Tensor):
    """DeepSeek's recipe: per 128x128 block scale = max(amax, 1e-4) / 448, q = e4m3fn(x / scale)."""
    rows, cols = x.shape
    x32 = x.contiguous() if x.dtype == torch.float32 else cast(x, torch.float32)
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((triton.cdiv(rows, SCALE_BLOCK), triton.cdiv(cols, SCALE_BLOCK)), dtype=torch.float32,
                        device=x.device)
    launch_quantize(bits(x32), q.view(torch.uint8), scale.view(torch.int32), rows, cols)
    return q, scale
