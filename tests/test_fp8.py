"""fp8 e4m3fn with 128x128 block scales (csrc/fp8.cpp and the executor's use of it) against
torch 2.13's CPU arithmetic, bit for bit.

The codec: every e4m3fn pattern decoded, 10M+ fp32 patterns of every class encoded
(saturating RNE), every bf16/fp16 pattern encoded. The executor, on synthetic files:
dequantization (W = f32(q) * S, rounded once to BF16/F16/F32) of whole weights and of
blocks cut at and between multiples of 128, and quantization (per 128x128 block: scale =
max(amax, 1e-4) / 448, q = e4m3fn(x / scale)) of weights whose sides are not multiples of
128, each against the pure-torch reference below. Failures report how many elements (and
how many 128x128 blocks) differ.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyconv import _core
from pyconv.errors import FormatError
from pyconv.execute import execute_plan
from pyconv.plan import BlockCopy, PlannedFile, PlannedTensor, ReshardPlan

B = 128
TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
BITS = {"F32": np.uint32, "BF16": np.uint16, "F16": np.uint16, "F8_E4M3": np.uint8}
TORCH_BITS = {"F32": torch.int32, "BF16": torch.int16, "F16": torch.int16}


# ---------------------------------------------------------------- torch references


def as_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor of `dtype` holding the bits of `a` (raw bits, or values of that dtype)."""
    raw = np.ascontiguousarray(a).view({"F32": np.int32, "BF16": np.int16, "F16": np.int16, "F8_E4M3": np.uint8}[dtype])
    t = torch.from_numpy(raw)
    return t.view(torch.float8_e4m3fn) if dtype == "F8_E4M3" else t.view(TORCH[dtype])


def torch_bits(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().copy()
    dtype = {v: k for k, v in TORCH.items()}[t.dtype]
    return t.view(TORCH_BITS[dtype]).numpy().view(BITS[dtype]).copy()


def expand(scales: torch.Tensor, m: int, n: int) -> torch.Tensor:
    return scales.repeat_interleave(B, 0).repeat_interleave(B, 1)[:m, :n]


def dequant_ref(q: np.ndarray, s: np.ndarray, dtype: str) -> np.ndarray:
    """(w.to(float32) * S).to(dtype), as bits."""
    m, n = q.shape
    w = as_torch(q, "F8_E4M3")
    return torch_bits((w.to(torch.float32) * expand(torch.from_numpy(s), m, n)).to(TORCH[dtype]))


def quant_ref(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per 128x128 block: scale = max(amax, 1e-4) / 448, q = e4m3fn(x / scale). Returns (q, scales) bits."""
    xf = x.to(torch.float32)
    m, n = xf.shape
    gm, gn = -(-m // B), -(-n // B)
    padded = torch.zeros(gm * B, gn * B, dtype=torch.float32)
    padded[:m, :n] = xf
    amax = padded.view(gm, B, gn, B).abs().amax(dim=(1, 3))
    scales = amax.clamp(min=1e-4) / 448
    q = (xf / expand(scales, m, n)).to(torch.float8_e4m3fn)
    return torch_bits(q), torch_bits(scales)


def assert_same_bits(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, torch gives {expected.shape}"
    bad = np.argwhere(got != expected)
    if bad.size == 0:
        return
    blocks = {(int(i[0]) // B, int(i[1]) // B) for i in bad} if got.ndim == 2 else set()
    first = ", ".join(f"{tuple(int(v) for v in i)}: {int(got[tuple(i)]):#x} (torch {int(expected[tuple(i)]):#x})" for i in bad[:6])
    raise AssertionError(f"{what}: {len(bad)} of {got.size} elements differ from torch, in {len(blocks)} "
                         f"128x128 blocks; first: {first}")


# ---------------------------------------------------------------- the scalar codec

FP8_PATTERNS = np.arange(256, dtype=np.uint8)


def fp8_encode_cases() -> np.ndarray:
    """10 Mi fp32 bit patterns covering every class an e4m3fn encoder has to get right."""
    rng = np.random.default_rng(20250101)

    def uniform(lo: int, hi: int, n: int) -> np.ndarray:
        return rng.integers(lo, hi, n, dtype=np.uint64).astype(np.uint32)

    def both_signs(x) -> np.ndarray:
        x = np.asarray(x, dtype=np.uint32)
        return np.concatenate([x, x | np.uint32(0x80000000)])

    def window(center: int, half: int = 1 << 14) -> np.ndarray:
        return both_signs(np.arange(center - half, center + half, dtype=np.uint64).astype(np.uint32))

    # Every e4m3fn value and every midpoint between neighbours (the ties), exactly, with
    # their fp32 neighbours: exponents -9 (subnormal steps of 2^-9) to 8.
    values = np.sort(np.abs(torch.from_numpy(FP8_PATTERNS).view(torch.float8_e4m3fn).float().numpy()))
    values = np.unique(values[np.isfinite(values)]).astype(np.float64)
    mids = ((values[:-1] + values[1:]) / 2).astype(np.float32).view(np.uint32)  # exact: one more bit
    exact = values.astype(np.float32).view(np.uint32)
    ties = np.concatenate([mids, mids - 1, mids + 1, exact, exact - 1, exact + 1])
    parts = [
        both_signs(uniform(0x7F800001, 0x80000000, 1 << 18)),  # NaNs, quiet and signalling
        both_signs([0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7F800000, 0x00000000]),  # NaN edges, Inf, 0
        both_signs(uniform(1, 0x00800000, 1 << 18)),  # fp32 subnormals
        both_signs(np.tile(ties, 8)),
        # Saturation: 448 (max), 464 (RNE's halfway point to 480, the NaN pattern), 480,
        # the fp32 max; the subnormal/normal edge 2^-6; the smallest subnormal 2^-9 and
        # its halfway point 2^-10 (a tie to 0).
        *(window(c) for c in (0x43E00000, 0x43E80000, 0x43F00000, 0x7F7FFFFF, 0x3C800000, 0x3B000000, 0x3A800000)),
        both_signs(uniform(0x3A000000, 0x44000000, 1 << 21)),  # the range e4m3fn covers, 2^-11 .. 512
    ]
    fixed = np.concatenate(parts)
    return np.concatenate([fixed, uniform(0, 1 << 32, (10 << 20) - len(fixed))])


@pytest.fixture(scope="module")
def encode_cases() -> np.ndarray:
    bits = fp8_encode_cases()
    mag = bits & np.uint32(0x7FFFFFFF)
    classes = {
        "NaN": mag > 0x7F800000, "Inf": mag == 0x7F800000, "0": mag == 0,
        "fp32 subnormal": (mag > 0) & (mag < 0x00800000),
        "e4m3 subnormal result": (mag >= 0x3A800000) & (mag < 0x3C800000),
        "saturating (448, Inf)": (mag > 0x43E00000) & (mag < 0x7F800000),
        "exactly 464": mag == 0x43E80000,
    }
    missing = [k for k, v in classes.items() if v.sum() < 2]
    assert len(bits) >= 10_000_000 and not missing, f"case generator misses {missing}"
    return bits


def core_cast(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    return np.frombuffer(_core.cast(np.ascontiguousarray(bits), src, dst), dtype=BITS[dst])


def test_decode_every_pattern_matches_torch():
    for dst in ("F32", "BF16", "F16"):
        expected = torch_bits(as_torch(FP8_PATTERNS, "F8_E4M3").to(TORCH[dst]))
        assert_same_bits(core_cast(FP8_PATTERNS, "F8_E4M3", dst), expected, f"F8_E4M3 -> {dst}, all 256 patterns")


def test_encode_matches_torch(encode_cases):
    expected = torch_bits(as_torch(encode_cases, "F32").to(torch.float8_e4m3fn))
    assert_same_bits(core_cast(encode_cases, "F32", "F8_E4M3"), expected, "F32 -> F8_E4M3")


@pytest.mark.parametrize("src", ["BF16", "F16"])
def test_encode_every_half_pattern_matches_torch(src):
    half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    expected = torch_bits(as_torch(half, src).to(torch.float8_e4m3fn))
    assert_same_bits(core_cast(half, src, "F8_E4M3"), expected, f"{src} -> F8_E4M3, all 65536 patterns")


def test_short_and_odd_lengths(encode_cases):
    # Lengths around the vector widths, the 128-element blocks and the 1024-element staging
    # pieces the loops work in, both directions.
    rng = np.random.default_rng(11)
    for n in (0, 1, 7, 15, 16, 17, 127, 128, 129, 255, 1023, 1024, 1025, 3000):
        bits = encode_cases[rng.integers(0, len(encode_cases), n)]
        expected = torch_bits(as_torch(bits, "F32").to(torch.float8_e4m3fn))
        assert_same_bits(core_cast(bits, "F32", "F8_E4M3"), expected, f"F32 -> F8_E4M3, {n} elements")
        pattern = rng.integers(0, 256, n, dtype=np.uint8)
        for dst in ("F32", "BF16", "F16"):
            expected = torch_bits(as_torch(pattern, "F8_E4M3").to(TORCH[dst]))
            assert_same_bits(core_cast(pattern, "F8_E4M3", dst), expected, f"F8_E4M3 -> {dst}, {n} elements")


# torch's conventions as golden values: a failure names the one that changed.
CODEC_GOLDEN = [
    # NaN keeps its sign, whatever the payload; nothing else becomes NaN.
    ("F32", [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], [0x7F, 0xFF, 0x7F, 0xFF]),
    # Saturation: Inf, 464 (a tie RNE would send to the NaN pattern), 1e9 -> +-448.
    ("F32", [0x7F800000, 0xFF800000, 0x43E80000, 0x4E6E6B28, 0x43E00000], [0x7E, 0xFE, 0x7E, 0x7E, 0x7E]),
    # Subnormals: 2^-9 is 0x01; 2^-10 is a tie to 0; 3 * 2^-10 a tie to 2^-8 (even);
    # fp32 subnormals give 0 with their sign.
    ("F32", [0x3B000000, 0x3A800000, 0x3B400000, 0x00000001, 0x80000001], [0x01, 0x00, 0x02, 0x00, 0x80]),
]


@pytest.mark.parametrize("src,inputs,outputs", CODEC_GOLDEN)
def test_codec_conventions(src, inputs, outputs):
    bits = np.repeat(np.array(inputs, dtype=np.uint32), 40)  # vector body and tail alike
    expected = np.repeat(np.array(outputs, dtype=np.uint8), 40)
    assert_same_bits(torch_bits(as_torch(bits, src).to(torch.float8_e4m3fn)), expected, "torch F32 -> F8_E4M3")
    assert_same_bits(core_cast(bits, src, "F8_E4M3"), expected, "core F32 -> F8_E4M3")
    decoded = core_cast(np.array([0x7F, 0xFF, 0x7E, 0x01, 0x80], np.uint8), "F8_E4M3", "F32")
    assert decoded.tolist() == [0x7FF00000, 0xFFF00000, 0x43E00000, 0x3B000000, 0x80000000]


_VARIANT_SCRIPT = """
import hashlib, sys
import numpy as np
from pyconv import _core
f32 = np.fromfile(sys.argv[1], dtype=np.uint32)
out = [_core.cast_isa(), hashlib.sha256(_core.cast(f32, "F32", "F8_E4M3")).hexdigest(),
       hashlib.sha256(_core.cast(np.arange(256, dtype=np.uint8), "F8_E4M3", "F32")).hexdigest()]
print(" ".join(out))
"""


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_instruction_set_variants_give_the_same_bits(encode_cases, tmp_path, isa):
    # The fp8 loops are built for AVX-512, AVX2 and portable code like the casts, and
    # PYCONV_CAST_ISA caps them alike; every variant must give the bits torch gives.
    path = tmp_path / "f32.bin"
    encode_cases.tofile(path)
    proc = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT, str(path)], env=dict(os.environ, PYCONV_CAST_ISA=isa),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _, enc, dec = proc.stdout.split()
    assert enc == hashlib.sha256(_core.cast(encode_cases, "F32", "F8_E4M3")).hexdigest(), f"{isa}: encode differs"
    assert dec == hashlib.sha256(_core.cast(FP8_PATTERNS, "F8_E4M3", "F32")).hexdigest(), f"{isa}: decode differs"


# ---------------------------------------------------------------- synthetic files


class Files:
    """Source files built from arrays at deliberately odd offsets; remembers each array's offset."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.paths: list[str] = []

    def add(self, *arrays: np.ndarray, lead: int = 5) -> tuple[int, list[int]]:
        blob, offsets = bytearray(lead), []
        for a in arrays:
            offsets.append(len(blob))
            blob += np.ascontiguousarray(a).tobytes() + bytes(3)
        path = self.tmp_path / f"src{len(self.paths)}.bin"
        path.write_bytes(bytes(blob))
        self.paths.append(str(path))
        return len(self.paths) - 1, offsets


def fp8_weight(rng, m: int, n: int, special: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Random fp8 patterns (NaNs and subnormals included) and positive scales of many magnitudes."""
    q = rng.integers(0, 256, (m, n), dtype=np.uint8)
    gm, gn = -(-m // B), -(-n // B)
    s = np.exp2(rng.uniform(-30, 10, (gm, gn))).astype(np.float32)
    if special:
        flat = s.reshape(-1)
        flat[:6] = np.array([0x7FC00000, 0x7F800001, 0x7F800000, 0, 1, 0x7F7FFFFF], np.uint32).view(np.float32)
        q[:3, :] = np.array([0x7F, 0xFF, 0x00])[:, None]
    return q, s


def scaled_copy(src: int, q_off: int, n: int, r0: int, c0: int, rows: int, cols: int, dst_row: int, dst_col: int,
                scale_src: int, s_off: int, gn: int) -> tuple:
    """Copies rows [r0, r0+rows) x cols [c0, c0+cols) of a block-scaled [m, n] weight."""
    return (src, q_off + r0 * n + c0, n, "F8_E4M3", rows, cols, dst_row, dst_col, False,
            scale_src, s_off, gn * 4, r0, c0, B)


def run(tmp_path, files: Files, size: int, tensors, **kwargs) -> bytes:
    out = tmp_path / "out.bin"
    _core.execute(files.paths, [(str(out), size)], [], tensors, **kwargs)
    return out.read_bytes()


# ---------------------------------------------------------------- dequantization

M, N = 456, 300  # 3.56 x 2.34 blocks: partial edge blocks both ways

REGIONS = {
    "whole": (0, M, 0, N),
    "tp-dim0-cut-in-block": (200, M, 0, N),      # rank 1 of a split at row 200
    "tp-dim0-first": (0, 200, 0, N),
    "tp-dim1-cut-in-block": (0, M, 150, N),      # a column split inside block column 1
    "aligned-interior": (128, 384, 128, 256),
    "straddling-sliver": (127, 131, 1, 299),
    "last-partial-block": (384, M, 256, N),
}


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("region", REGIONS)
def test_dequantize_region_matches_torch(tmp_path, region, dtype):
    rng = np.random.default_rng(1)
    q, s = fp8_weight(rng, M, N)
    files = Files(tmp_path)
    src, (q_off, s_off) = files.add(q, s)
    r0, r1, c0, c1 = REGIONS[region]
    rows, cols = r1 - r0, c1 - c0
    copy = scaled_copy(src, q_off, N, r0, c0, rows, cols, 0, 0, src, s_off, s.shape[1])
    expected = dequant_ref(q, s, dtype)[r0:r1, c0:c1]
    isz = np.dtype(BITS[dtype]).itemsize
    for threads, chunk in ((1, 4096), (3, 1 << 20)):
        data = run(tmp_path, files, rows * cols * isz, [(0, 0, dtype, rows, cols, [copy])], threads=threads, chunk_bytes=chunk)
        got = np.frombuffer(data, BITS[dtype]).reshape(rows, cols)
        assert_same_bits(got, expected, f"{region} -> {dtype}, threads={threads}, chunk={chunk}")


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_dequantize_special_scales_and_patterns(tmp_path, dtype):
    # NaN (quiet and signalling), Inf, 0, subnormal and fp32-max scales; NaN fp8 rows
    # under each: the NaN and overflow conventions of w.float() * s, then .to(dtype).
    rng = np.random.default_rng(2)
    q, s = fp8_weight(rng, 300, 900, special=True)
    files = Files(tmp_path)
    src, (q_off, s_off) = files.add(q, s)
    copy = scaled_copy(src, q_off, 900, 0, 0, 300, 900, 0, 0, src, s_off, s.shape[1])
    isz = np.dtype(BITS[dtype]).itemsize
    data = run(tmp_path, files, q.size * isz, [(0, 0, dtype, 300, 900, [copy])])
    assert_same_bits(np.frombuffer(data, BITS[dtype]).reshape(300, 900), dequant_ref(q, s, dtype), f"special -> {dtype}")


def test_dequantize_merges_shards_with_their_own_scales(tmp_path):
    # Two dim-0 shards (rows 0..199 and 200..455), each quantized on its own with its own
    # grid, merged into one BF16 weight beside a BF16 bias-like block from a third file.
    rng = np.random.default_rng(3)
    q0, s0 = fp8_weight(rng, 200, N)
    q1, s1 = fp8_weight(rng, M - 200, N)
    extra = rng.integers(0, 1 << 16, (M, 20), dtype=np.uint16)
    files = Files(tmp_path)
    a, (qa, sa) = files.add(q0, s0)
    b, (qb,) = files.add(q1)
    c, (sb,) = files.add(s1, lead=1)   # shard 1's scales in another file
    d, (eo,) = files.add(extra)
    copies = [scaled_copy(a, qa, N, 0, 0, 200, N, 0, 0, a, sa, s0.shape[1]),
              scaled_copy(b, qb, N, 0, 0, M - 200, N, 200, 0, c, sb, s1.shape[1]),
              (d, eo, 40, "BF16", M, 20, 0, N, False)]
    expected = np.concatenate([np.concatenate([dequant_ref(q0, s0, "BF16"), dequant_ref(q1, s1, "BF16")]), extra], axis=1)
    for threads, chunk in ((1, 4096), (2, 100_000)):
        data = run(tmp_path, files, M * (N + 20) * 2, [(0, 0, "BF16", M, N + 20, copies)], threads=threads, chunk_bytes=chunk)
        assert_same_bits(np.frombuffer(data, np.uint16).reshape(M, N + 20), expected, f"merged shards, chunk={chunk}")


def test_dequantize_long_rows_split_into_column_tasks(tmp_path):
    # Rows wider than the chunk are cut into column runs that start inside scale blocks.
    rng = np.random.default_rng(4)
    q, s = fp8_weight(rng, 130, 5000)
    files = Files(tmp_path)
    src, (q_off, s_off) = files.add(q, s)
    copy = scaled_copy(src, q_off, 5000, 0, 0, 130, 5000, 0, 0, src, s_off, s.shape[1])
    data = run(tmp_path, files, q.size * 4, [(0, 0, "F32", 130, 5000, [copy])], chunk_bytes=4096, threads=2)
    assert_same_bits(np.frombuffer(data, np.uint32).reshape(130, 5000), dequant_ref(q, s, "F32"), "column tasks")


# ---------------------------------------------------------------- quantization


def weight_values(rng, m: int, n: int, dtype: str) -> np.ndarray:
    """Normal values whose magnitude changes from block to block (1e-6 .. 1e4; fp16 1e-3 .. 1e3),
    with an all-zero block, a block below the 1e-4 amax floor and one with a lone outlier."""
    gm, gn = -(-m // B), -(-n // B)
    lo, hi = (-3, 3) if dtype == "F16" else (-6, 4)
    mag = np.power(10.0, rng.uniform(lo, hi, (gm, gn))).repeat(B, 0).repeat(B, 1)[:m, :n]
    x = rng.standard_normal((m, n)) * mag
    if m > B:
        x[B:2 * B, 0:B] = 0.0  # all-zero block: scale 1e-4/448, zeros
    if n > B:
        x[0:B, B:2 * B] *= 1e-5 / np.abs(x[0:B, B:2 * B]).max()  # amax under the floor
    if m > 2 * B and n > 2 * B:  # a lone outlier squeezes the rest of its block into subnormals
        x[2 * B + 5, 2 * B + 7] = min(1000.0 * np.abs(x[2 * B:3 * B, 2 * B:3 * B]).max(), 60000.0)
    x = x.astype(np.float32)
    if dtype == "F32":
        return x
    return torch_bits(torch.from_numpy(x).to(TORCH[dtype]))


def quantized_output(data: bytes, offset: int, m: int, n: int, scale_at: int) -> tuple[np.ndarray, np.ndarray]:
    gm, gn = -(-m // B), -(-n // B)
    q = np.frombuffer(data, np.uint8, m * n, offset).reshape(m, n)
    s = np.frombuffer(data, np.uint32, gm * gn, scale_at).reshape(gm, gn)
    return q, s


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("shape", [(300, 456), (128, 256), (1, 1), (129, 1000)])
def test_quantize_matches_torch(tmp_path, dtype, shape):
    m, n = shape
    rng = np.random.default_rng(5)
    x = weight_values(rng, m, n, dtype)
    files = Files(tmp_path)
    src, (x_off,) = files.add(x)
    isz = x.dtype.itemsize
    q_ref, s_ref = quant_ref(as_torch(x, dtype))
    gm, gn = s_ref.shape
    scale_at = 7 + m * n + 1  # an unaligned grid after the fp8 bytes, behind a literal
    size = scale_at + gm * gn * 4 + 2
    tensor = (0, 7, "F8_E4M3", m, n, [(src, x_off, n * isz, dtype, m, n, 0, 0, False)], scale_at)
    for threads, chunk in ((1, 4096), (3, 1 << 20), (2, 200_000)):
        out = tmp_path / "out.bin"
        stats = _core.execute(files.paths, [(str(out), size)], [(0, 0, b"header!")], [tensor], threads=threads, chunk_bytes=chunk)
        data = out.read_bytes()
        q, s = quantized_output(data, 7, m, n, scale_at)
        what = f"[{m}, {n}] {dtype}, threads={threads}, chunk={chunk}"
        assert_same_bits(s, s_ref, what + ": scales")
        assert_same_bits(q, q_ref, what + ": fp8")
        assert data[:7] == b"header!" and data[scale_at - 1] == 0 and data[-2:] == bytes(2)
        assert stats["bytes_written"] == 7 + m * n + gm * gn * 4


def test_quantize_all_zero_and_floor_blocks():
    # The conventions the reference encodes, stated outright.
    x = torch.zeros(130, 260)
    x[:128, 128:256] = 5e-5
    x[128:, :128] = -3.0
    q, s = quant_ref(x)
    scales = s.view(np.float32)
    assert scales[0, 0] == np.float32(1e-4) / np.float32(448) and not q[:128, :128].any()  # all zero
    assert scales[0, 1] == scales[0, 0]  # amax 5e-5 under the floor: the floor's scale
    assert scales[1, 0] == np.float32(3.0) / np.float32(448) and (q[128:, :128] == 0xFE).all()  # -448


def test_quantize_nan_and_inf_blocks_match_torch(tmp_path):
    # A NaN anywhere in a block makes its scale 0x7FC00000 and every element NaN (0x7F,
    # or 0xFF for a negative NaN); an Inf makes the scale Inf, finite elements +-0 and the
    # Inf itself NaN (Inf / Inf).
    x = np.random.default_rng(6).standard_normal((200, 300)).astype(np.float32)
    x[3, 4] = np.nan
    x[5, 6] = -np.float32(np.nan)
    x[130, 140] = np.inf
    x[131, 141] = -np.inf
    x[10, 290] = 3e38
    files = Files(tmp_path)
    src, (x_off,) = files.add(x)
    q_ref, s_ref = quant_ref(torch.from_numpy(x))
    scale_at = 200 * 300
    data = run(tmp_path, files, scale_at + s_ref.size * 4,
               [(0, 0, "F8_E4M3", 200, 300, [(src, x_off, 1200, "F32", 200, 300, 0, 0, False)], scale_at)])
    q, s = quantized_output(data, 0, 200, 300, scale_at)
    assert_same_bits(s, s_ref, "special blocks: scales")
    assert_same_bits(q, q_ref, "special blocks: fp8")
    assert s[0, 0] == 0x7FC00000 and s[1, 1] == 0x7F800000


def test_quantize_gathers_bands_across_shards_and_columns(tmp_path):
    # Row shards 0..199 / 200..299 (the band 128..255 straddles them) and the last 100
    # columns from a third file that stores them transposed (Conv1D-style), all BF16, into
    # one quantized [300, 1100] tensor: bands wider than one 512-column fp32 tile.
    m, n, split = 300, 1100, 1000
    rng = np.random.default_rng(7)
    x = weight_values(rng, m, n, "BF16")
    files = Files(tmp_path)
    a, (ao,) = files.add(np.ascontiguousarray(x[:200, :split]))
    b, (bo,) = files.add(np.ascontiguousarray(x[200:, :split]))
    c, (co,) = files.add(np.ascontiguousarray(x[:, split:].T))
    copies = [(a, ao, split * 2, "BF16", 200, split, 0, 0, False), (b, bo, split * 2, "BF16", m - 200, split, 200, 0, False),
              (c, co, m * 2, "BF16", m, n - split, 0, split, True)]
    q_ref, s_ref = quant_ref(as_torch(x, "BF16"))
    for chunk in (4096, 1 << 20):
        data = run(tmp_path, files, m * n + s_ref.size * 4, [(0, 0, "F8_E4M3", m, n, copies, m * n)],
                   chunk_bytes=chunk, threads=2)
        q, s = quantized_output(data, 0, m, n, m * n)
        assert_same_bits(s, s_ref, f"gathered, chunk={chunk}: scales")
        assert_same_bits(q, q_ref, f"gathered, chunk={chunk}: fp8")


def test_requantize_a_block_scaled_source_cut_inside_a_block(tmp_path):
    # Rank 1 of a dim-0 split at row 200 keeps fp8: its rows are dequantized in fp32 and
    # quantized again on its own 128-row grid.
    rng = np.random.default_rng(8)
    q0, s0 = fp8_weight(rng, M, N)
    q0[q0 & 0x7F == 0x7F] = 0x3C  # no NaNs: they would spread over a whole block
    files = Files(tmp_path)
    src, (q_off, s_off) = files.add(q0, s0)
    rows = M - 200
    copy = scaled_copy(src, q_off, N, 200, 0, rows, N, 0, 0, src, s_off, s0.shape[1])
    q_ref, s_ref = quant_ref(as_torch(dequant_ref(q0, s0, "F32"), "F32")[200:])
    data = run(tmp_path, files, rows * N + s_ref.size * 4, [(0, 0, "F8_E4M3", rows, N, [copy], rows * N)], chunk_bytes=4096)
    q, s = quantized_output(data, 0, rows, N, rows * N)
    assert_same_bits(s, s_ref, "requantized: scales")
    assert_same_bits(q, q_ref, "requantized: fp8")


def test_round_trip_through_plan_dataclasses(tmp_path):
    # quantize then dequantize through ReshardPlan / PlannedTensor / BlockCopy and
    # execute_plan: the dequantized weight is torch's dequant(quant(x)) and lies within
    # half an fp8 step (2^-4 relative, 2^-10 * scale absolute for subnormals) of x.
    m, n = 300, 456
    rng = np.random.default_rng(9)
    x = weight_values(rng, m, n, "F32")
    src = tmp_path / "x.bin"
    src.write_bytes(x.tobytes())
    gm, gn = -(-m // B), -(-n // B)
    scale_at = m * n
    plan = ReshardPlan(str(tmp_path), "test", {}, (PlannedFile("q.bin", m * n + gm * gn * 4, (
        PlannedTensor("w", "F8_E4M3", (m, n), 0, (BlockCopy(str(src), 0, n * 4, "F32", m, n, 0, 0),), quantize=scale_at),)),))
    execute_plan(plan, str(tmp_path / "quantized"))
    qpath = str(tmp_path / "quantized" / "q.bin")
    back = ReshardPlan(str(tmp_path), "test", {}, (PlannedFile("w.bin", m * n * 4, (
        PlannedTensor("w", "F32", (m, n), 0, (BlockCopy(qpath, 0, n, "F8_E4M3", m, n, 0, 0, scale_source=qpath,
                                                        scale_offset=scale_at, scale_row_stride=gn * 4),)),)),))
    execute_plan(back, str(tmp_path / "restored"))
    y = np.fromfile(tmp_path / "restored" / "w.bin", np.float32).reshape(m, n)
    q_ref, s_ref = quant_ref(torch.from_numpy(x))
    assert_same_bits(y.view(np.uint32), dequant_ref(q_ref, s_ref.view(np.float32), "F32"), "dequant(quant(x))")
    scale = np.repeat(np.repeat(s_ref.view(np.float32), B, 0), B, 1)[:m, :n]
    err = np.abs(y.astype(np.float64) - x)
    bound = np.abs(x) * 2.0**-4 + scale * 2.0**-10
    assert (err <= bound).all(), f"{int((err > bound).sum())} elements off by more than half an fp8 step"


# ---------------------------------------------------------------- plan errors


def test_scaled_copy_bounds_and_combinations_are_checked(tmp_path):
    q = np.zeros((200, 300), np.uint8)
    s = np.ones((2, 3), np.float32)
    files = Files(tmp_path)
    src, (q_off, s_off) = files.add(q, s)
    good = scaled_copy(src, q_off, 300, 0, 0, 200, 300, 0, 0, src, s_off, 3)

    def check(tensor, message, size=200 * 300 * 2):
        out = tmp_path / "o.bin"
        with pytest.raises(FormatError, match=message):
            _core.execute(files.paths, [(str(out), size)], [], [tensor])
        assert not out.exists()

    def with_fields(copy, **changes):
        names = ["source", "src_offset", "stride", "dtype", "rows", "cols", "dst_row", "dst_col", "transpose",
                 "scale_source", "scale_offset", "scale_row_stride", "scale_row0", "scale_col0", "scale_block"]
        fields = dict(zip(names, copy))
        fields.update(changes)
        return tuple(fields[k] for k in names)

    def bf16(*copies):
        return (0, 0, "BF16", 200, 300, list(copies))

    check(bf16(with_fields(good, scale_offset=s_off + 4)), "block scale range .* outside the file")
    check(bf16(with_fields(good, scale_row0=128)), "block scale range .* outside the file")  # needs grid row 2
    check(bf16(with_fields(good, scale_row_stride=2**64 - 1)), "scale range overflows")
    check(bf16(with_fields(good, scale_row0=2**64 - 10)), "scale coordinates overflow")
    check(bf16(with_fields(good, scale_block=0)), "scale block of 0")
    check(bf16(with_fields(good, scale_source=9)), "missing scale source")
    check(bf16(with_fields(good, transpose=True, rows=300, cols=200)), "transposed copy of a block-scaled")
    check(bf16(with_fields(good, dtype="BF16", stride=600)), "only F8_E4M3 is block-scaled")
    check((0, 0, "I32", 200, 300, [good]), "cannot dequantize F8_E4M3 to I32", 200 * 300 * 4)
    check((0, 0, "F8_E4M3", 200, 300, [good]), "cannot dequantize F8_E4M3 to F8_E4M3")
    check(bf16(good[:9]), "cannot cast F8_E4M3 to BF16 without its block scales")
    check((0, 0, "F8_E4M3", 1, 4, [(src, s_off, 16, "F32", 1, 4, 0, 0, False)]), "unless the tensor is quantized")
    check((0, 0, "BF16", 1, 4, [(src, s_off, 16, "F32", 1, 4, 0, 0, False)], 100), "only F8_E4M3 is supported")
    check((0, 0, "F8_E4M3", 1, 4, [(src, 0, 4, "U8", 1, 4, 0, 0, False)], 100), "cannot quantize U8")
    check((0, 0, "F8_E4M3", 1, 4, [(src, s_off, 16, "F32", 1, 4, 0, 0, False)], 100), "scale grid .* runs past", 103)
    check(bf16(good[:12]), "9 fields, or 15")
    check((0, 0, "BF16", 200), "6 fields, or 7")


def test_fp8_to_fp8_without_scale_is_a_byte_copy(tmp_path):
    q = np.random.default_rng(10).integers(0, 256, (300, 200), dtype=np.uint8)
    files = Files(tmp_path)
    src, (q_off,) = files.add(q)
    data = run(tmp_path, files, 100 * 200, [(0, 0, "F8_E4M3", 100, 200, [(src, q_off + 150 * 200, 200, "F8_E4M3", 100, 200, 0, 0, False)])])
    assert data == q[150:250].tobytes()
