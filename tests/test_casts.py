"""The core's dtype casts (csrc/cast.cpp) against torch's CPU Tensor.to(), bit for bit.

torch is the judge: exhaustive over every bf16 and fp16 bit pattern, and over 10M+ fp32
values chosen to hit every class (NaNs of both signs and many payloads, +-Inf, +-0, fp32
subnormals, values that land on fp16/bf16 subnormals, exact ties with even and odd kept
bits, the overflow thresholds, random patterns). Failures report how many elements
differ and the first few of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyconv import _core
from pyconv.errors import FormatError

BITS = {"F32": np.uint32, "BF16": np.uint16, "F16": np.uint16}
SIGNED = {"F32": np.int32, "BF16": np.int16, "F16": np.int16}
TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
TORCH_INT = {"F32": torch.int32, "BF16": torch.int16, "F16": torch.int16}
PAIRS = [("F32", "BF16"), ("F32", "F16"), ("BF16", "F32"), ("F16", "F32"), ("BF16", "F16"), ("F16", "BF16")]
HALF_PATTERNS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def core_cast(bits: np.ndarray | memoryview, src: str, dst: str) -> np.ndarray:
    return np.frombuffer(_core.cast(bits, src, dst), dtype=BITS[dst])


def torch_cast(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    """torch's answer for a contiguous tensor holding these bits."""
    n = len(bits)
    if src != "F16":
        t = torch.from_numpy(np.ascontiguousarray(bits).view(SIGNED[src])).view(TORCH[src])
        return t.to(TORCH[dst]).view(TORCH_INT[dst]).numpy().view(BITS[dst])
    # torch converts contiguous fp16 in blocks of 8 and sends the last (count % 8)
    # elements of each thread's range through a scalar path that turns any NaN into
    # 0x7FFFFFFF; the core follows the block rule (see csrc/cast.cpp). Ask torch for the
    # block rule on every element: one thread, padded to a multiple of 8.
    padded = np.concatenate([bits, np.zeros((-n) % 8, bits.dtype)]).view(SIGNED[src])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = torch.from_numpy(padded).view(TORCH[src]).to(TORCH[dst])
    finally:
        torch.set_num_threads(threads)
    return out.view(TORCH_INT[dst]).numpy().view(BITS[dst])[:n]


def assert_same_bits(src_bits: np.ndarray, got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: {got.shape} elements, torch gives {expected.shape}"
    bad = np.flatnonzero(got != expected)
    examples = ", ".join(f"{int(src_bits[i]):#x} -> {int(got[i]):#x} (torch {int(expected[i]):#x})" for i in bad[:8])
    assert bad.size == 0, f"{what}: {bad.size} of {got.size} elements differ from torch; first: {examples}"


def fp32_cases() -> np.ndarray:
    """10 Mi fp32 bit patterns covering every class a cast has to get right."""
    rng = np.random.default_rng(20240613)

    def uniform(lo: int, hi: int, n: int) -> np.ndarray:  # n patterns in [lo, hi)
        return rng.integers(lo, hi, n, dtype=np.uint64).astype(np.uint32)

    def both_signs(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.uint32)
        return np.concatenate([x, x | np.uint32(0x80000000)])

    def window(center: int, half: int = 1 << 15) -> np.ndarray:  # consecutive patterns around center
        return both_signs(np.arange(center - half, center + half, dtype=np.uint64).astype(np.uint32))

    ties_k = np.arange(1 << 10, dtype=np.float64)
    f16_subnormal_ties = ((ties_k + 0.5) * 2.0**-24).astype(np.float32).view(np.uint32)  # (k + 1/2) * 2^-24, exact
    bf16_ties = (uniform(0, 1 << 16, 1 << 18) << np.uint32(16)) | np.uint32(0x8000)
    f16_ties = (uniform(0x38800000 >> 13, 0x47800000 >> 13, 1 << 18) << np.uint32(13)) | np.uint32(0x1000)
    parts = [
        # NaNs: quiet and signalling, assorted payloads, both signs; then the edge payloads.
        both_signs(uniform(0x7F800001, 0x80000000, 1 << 19)),
        both_signs([0x7F800001, 0x7F801FFF, 0x7F802000, 0x7F80FFFF, 0x7F810000, 0x7FBFFFFF, 0x7FC00000, 0x7FC00001,
                    0x7FFFE000, 0x7FFFFFFF]),
        both_signs([0x00000000, 0x7F800000]),  # +-0, +-Inf
        both_signs(uniform(1, 0x00800000, 1 << 19)),  # fp32 subnormals (bf16 keeps their top 7 bits)
        both_signs(uniform(0x32800000, 0x38800000, 1 << 19)),  # fp16 subnormal results, down to 2^-26
        both_signs(np.concatenate([f16_subnormal_ties, f16_subnormal_ties - 1, f16_subnormal_ties + 1])),
        both_signs(np.concatenate([bf16_ties, bf16_ties - 1, bf16_ties + 1])),  # kept LSB even and odd
        both_signs(np.concatenate([f16_ties, f16_ties - 1, f16_ties + 1])),
        # Thresholds: fp16 65504 (max) and 65520 (first value rounding to Inf), bf16 max
        # 0x7F7F and its halfway point to Inf, the Inf/NaN edge, fp16 min normal 2^-14,
        # fp32 min normal, half the smallest fp16 subnormal 2^-25, half the smallest bf16.
        *(window(c) for c in (0x477FE000, 0x477FF000, 0x7F7F0000, 0x7F7F8000, 0x7F800000, 0x38800000,
                              0x00800000, 0x33000000)),
        window(0x00008000, 1 << 15),
    ]
    fixed = np.concatenate(parts)
    random_patterns = uniform(0, 1 << 32, (10 << 20) - len(fixed))
    return np.concatenate([fixed, random_patterns])


@pytest.fixture(scope="module")
def f32_bits() -> np.ndarray:
    bits = fp32_cases()
    magnitude = bits & np.uint32(0x7FFFFFFF)
    low16 = bits & np.uint32(0xFFFF)
    classes = {
        "+NaN": (magnitude > 0x7F800000) & (bits < 0x80000000),
        "-NaN": (magnitude > 0x7F800000) & (bits >= 0x80000000),
        "signalling NaN": (magnitude > 0x7F800000) & (magnitude < 0x7FC00000),
        "+-Inf": magnitude == 0x7F800000,
        "+-0": magnitude == 0,
        "fp32 subnormal": (magnitude > 0) & (magnitude < 0x00800000),
        "fp16 subnormal result": (magnitude >= 0x33000000) & (magnitude < 0x38800000),
        "bf16 tie, even": (low16 == 0x8000) & ((bits >> np.uint32(16)) & np.uint32(1) == 0),
        "bf16 tie, odd": (low16 == 0x8000) & ((bits >> np.uint32(16)) & np.uint32(1) == 1),
        "fp16 tie": (bits & np.uint32(0x1FFF)) == 0x1000,
        "fp16 overflow edge": (magnitude >= 0x477FE000) & (magnitude <= 0x477FF000),
    }
    missing = [name for name, mask in classes.items() if mask.sum() < 2]
    assert len(bits) >= 10_000_000 and not missing, f"case generator misses {missing}"
    return bits


@pytest.mark.parametrize("dst", ["BF16", "F16"])
def test_f32_to_half_matches_torch(f32_bits, dst):
    assert_same_bits(f32_bits, core_cast(f32_bits, "F32", dst), torch_cast(f32_bits, "F32", dst), f"F32 -> {dst}")


@pytest.mark.parametrize("src,dst", [(s, d) for s, d in PAIRS if s != "F32"])
def test_every_half_pattern_matches_torch(src, dst):
    got = core_cast(HALF_PATTERNS, src, dst)
    assert_same_bits(HALF_PATTERNS, got, torch_cast(HALF_PATTERNS, src, dst), f"{src} -> {dst}, all 65536 patterns")


# torch's NaN conventions, one per conversion, as golden values: a failure here names the
# convention that changed (in torch, or in the core).
NAN_GOLDEN = [
    # fp32 -> bf16: every NaN becomes 0xFFFF (torch's vectorised constant).
    ("F32", "BF16", [0x7FC00000, 0x7F800001, 0xFFC00000, 0x7FC12345], [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    # fp32 -> fp16: quieted, sign kept, payload truncated to its top 10 bits.
    ("F32", "F16", [0x7FC00000, 0x7F800001, 0xFFA00000, 0x7FC12345], [0x7E00, 0x7E00, 0xFF00, 0x7E09]),
    # bf16 -> fp32: bits shifted; a signalling NaN stays signalling.
    ("BF16", "F32", [0x7FC0, 0x7F81, 0xFF81], [0x7FC00000, 0x7F810000, 0xFF810000]),
    # fp16 -> fp32: quieted, sign and payload kept.
    ("F16", "F32", [0x7E00, 0x7C01, 0xFD00], [0x7FC00000, 0x7FC02000, 0xFFE00000]),
    # bf16 -> fp16: as fp32 -> fp16 of the widened bits.
    ("BF16", "F16", [0x7FC0, 0x7F81, 0xFFFF], [0x7E00, 0x7E08, 0xFFF8]),
    # fp16 -> bf16: every NaN becomes 0x7FC0, whatever its sign.
    ("F16", "BF16", [0x7E00, 0x7C01, 0xFFFF], [0x7FC0, 0x7FC0, 0x7FC0]),
]


@pytest.mark.parametrize("src,dst,inputs,outputs", NAN_GOLDEN, ids=[f"{s}-{d}" for s, d, _, _ in NAN_GOLDEN])
def test_nan_conventions(src, dst, inputs, outputs):
    # 16 copies of each input so torch's fp16 -> fp32 runs its block path (see torch_cast).
    bits = np.repeat(np.array(inputs, dtype=BITS[src]), 16)
    expected = np.repeat(np.array(outputs, dtype=BITS[dst]), 16)
    assert_same_bits(bits, torch_cast(bits, src, dst), expected, f"torch {src} -> {dst} NaN convention")
    assert_same_bits(bits, core_cast(bits, src, dst), expected, f"core {src} -> {dst} NaN convention")


def test_subnormals_are_not_flushed():
    # Smallest subnormals in and out of every format: neither torch nor the core flushes.
    cases = [("F32", "BF16", 0x00010000, 0x0001), ("BF16", "F32", 0x0001, 0x00010000),
             ("F16", "F32", 0x0001, 0x33800000), ("F32", "F16", 0x33800000, 0x0001),
             ("F32", "F16", 0x33000001, 0x0001), ("F32", "F16", 0x33000000, 0x0000),  # 2^-25 is a tie: to even (0)
             ("BF16", "F16", 0x3380, 0x0001), ("F16", "BF16", 0x0001, 0x3380)]
    for src, dst, x, y in cases:
        bits = np.full(16, x, dtype=BITS[src])
        assert_same_bits(bits, torch_cast(bits, src, dst), np.full(16, y, BITS[dst]), f"torch {src} -> {dst}")
        assert_same_bits(bits, core_cast(bits, src, dst), np.full(16, y, BITS[dst]), f"core {src} -> {dst}")


@pytest.mark.parametrize("src,dst", PAIRS)
def test_short_and_unaligned_buffers(f32_bits, src, dst):
    # Lengths around the vector widths (the vector body and its scalar remainder) and
    # buffers starting at every byte offset, as rows of a block copy do.
    rng = np.random.default_rng(7)
    pool = f32_bits if src == "F32" else HALF_PATTERNS
    size = np.dtype(BITS[src]).itemsize
    for n in (0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000, 1025):
        bits = pool[rng.integers(0, len(pool), n)]
        expected = torch_cast(bits, src, dst)
        for offset in range(4):
            raw = bytearray(offset) + bytearray(bits.tobytes()) + bytearray(3)
            got = core_cast(memoryview(raw)[offset:offset + n * size], src, dst)
            assert_same_bits(bits, got, expected, f"{src} -> {dst}, {n} elements at byte offset {offset}")


def test_identity_and_unsupported_casts():
    data = np.arange(37, dtype=np.uint32).tobytes()
    for dtype in ("F32", "BF16", "F16"):
        assert _core.cast(data[: 36], dtype, dtype) == data[: 36]
    with pytest.raises(FormatError):
        _core.cast(data[:4], "F32", "I8")


_VARIANT_SCRIPT = """
import hashlib, json, sys
import numpy as np
from pyconv import _core
f32 = np.fromfile(sys.argv[1], dtype=np.uint32)
half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
digests = {}
for src, dst in json.loads(sys.argv[2]):
    digests[src + "->" + dst] = hashlib.sha256(_core.cast(f32 if src == "F32" else half, src, dst)).hexdigest()
print(json.dumps({"isa": getattr(_core, "cast_isa", lambda: "?")(), "digests": digests}))
"""


@pytest.fixture(scope="module")
def f32_path(tmp_path_factory, f32_bits):
    path = tmp_path_factory.mktemp("casts") / "f32.bin"
    f32_bits.tofile(path)
    return path


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_instruction_set_variants_give_the_same_bits(f32_bits, f32_path, isa):
    # The core picks an AVX-512, AVX2 or portable build of the same loops at run time;
    # PYCONV_CAST_ISA caps the choice. Each must give the bits of the default one, which
    # the tests above compare with torch.
    env = dict(os.environ, PYCONV_CAST_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT, str(f32_path), json.dumps(PAIRS)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    if hasattr(_core, "cast_isa") and isa == "portable":
        assert result["isa"] == "portable"
    for src, dst in PAIRS:
        mine = hashlib.sha256(_core.cast(f32_bits if src == "F32" else HALF_PATTERNS, src, dst)).hexdigest()
        assert result["digests"][f"{src}->{dst}"] == mine, f"{src} -> {dst}: the {isa} variant differs"
