"""The Triton kernels of --device cuda against pure-torch references, bit for bit: every
bf16/fp16 pattern, fp32 NaN/Inf/subnormal/rounding edges, the fused QKV permutation + cast
(GQA, explicit head_dim, tp up to and past the KV heads), transposes, fp8 128x128 block
dequantization and quantization (NaN, Inf, saturation, subnormal and all-zero blocks).

On a machine with a CUDA GPU they run compiled on it; elsewhere under TRITON_INTERPRET=1
(set here before triton is imported), with sizes small enough for the interpreter."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyconv._kernels import ops  # noqa: E402  (after TRITON_INTERPRET)

from pyconv import _core  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# numpy, running the interpreted kernels, warns about the NaNs and Infs these tests feed it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
B = 128
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
NAME = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu() if t.dtype == torch.uint8 else ops.bits(t.cpu())


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, what: str, block: int = 128) -> None:
    """Equal bits, or a message saying how many elements and how many 128-element blocks differ."""
    g, e = bits(got).reshape(-1), bits(expected).reshape(-1)
    assert g.shape == e.shape, f"{what}: shape {tuple(g.shape)} != {tuple(e.shape)}"
    diff = g != e
    if diff.any():
        where = diff.nonzero()[:4, 0].tolist()
        blocks = diff[: diff.numel() // block * block].reshape(-1, block).any(1).sum().item()
        mask = 0xFFFFFFFF if g.element_size() == 4 else (1 << 8 * g.element_size()) - 1
        pairs = [(i, hex(g[i].item() & mask), hex(e[i].item() & mask)) for i in where]
        raise AssertionError(f"{what}: {diff.sum().item()} of {diff.numel()} elements differ "
                             f"(in {blocks} blocks of {block}); first (index, got, expected): {pairs}")


def f32_from_bits(u) -> torch.Tensor:
    return torch.tensor(np.asarray(u, dtype=np.uint32).view(np.int32)).view(torch.float32)


def f32_edge_cases() -> torch.Tensor:
    """fp32 patterns around every rounding and overflow boundary of bf16, fp16 and e4m3fn."""
    rng = np.random.default_rng(0)
    u = [rng.integers(0, 1 << 32, 1 << 15, dtype=np.uint64)]
    for center in (0x7F800000, 0x477FE000, 0x477FF000, 0x38800000, 0x33000000, 0x33800000, 0x00800000, 0x3F800000,
                   0x43E00000, 0x43E80000, 0x3C800000, 0x3A800000, 0x3B000000, 0x7F7FFFFF):
        u.append(np.arange(center - 300, center + 300, dtype=np.uint64))
        u.append(center + (np.arange(-4, 5, dtype=np.int64) << 13).astype(np.uint64))   # fp16 rounding ties
        u.append(center + (np.arange(-4, 5, dtype=np.int64) << 16).astype(np.uint64))   # bf16 rounding ties
        u.append(center + (np.arange(-4, 5, dtype=np.int64) << 19).astype(np.uint64))   # e4m3 rounding ties
    u.append(np.array([0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7FA00001, 0, 1, 0x007FFFFF], dtype=np.uint64))
    a = np.concatenate(u) & 0x7FFFFFFF
    a = np.concatenate([a, a | 0x80000000]) & 0xFFFFFFFF
    return f32_from_bits(a)


def all_16bit(dtype) -> torch.Tensor:
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("dst", FLOATS, ids=lambda d: NAME[d])
@pytest.mark.parametrize("src", FLOATS, ids=lambda d: NAME[d])
def test_cast_matches_torch_and_the_core(src, dst):
    x = f32_edge_cases() if src == torch.float32 else all_16bit(src)
    got = ops.cast(x.to(DEVICE), dst)
    assert_same_bits(got, x.to(dst), f"{NAME[src]} -> {NAME[dst]} vs torch")
    core = np.frombuffer(_core.cast(bits(x).numpy(), NAME[src], NAME[dst]),
                         dtype={torch.float32: np.int32, torch.bfloat16: np.int16, torch.float16: np.int16}[dst])
    assert_same_bits(got, torch.from_numpy(core.copy()).view(dst), f"{NAME[src]} -> {NAME[dst]} vs the C++ core")


E4M3 = torch.float8_e4m3fn


@pytest.mark.parametrize("src", FLOATS, ids=lambda d: NAME[d])
def test_unscaled_fp8_codec_matches_torch_and_the_core(src):
    # Encoding: RNE, saturation at +-448 (464, 480, 1e9 and Inf included), NaN keeps its sign,
    # e4m3fn subnormals; decoding: every one of the 256 patterns.
    x = f32_edge_cases().to(src)
    got = ops.cast(x.to(DEVICE), E4M3).view(torch.uint8)
    assert_same_bits(got, x.to(E4M3).view(torch.uint8), f"{NAME[src]} -> F8_E4M3 vs torch")
    core = np.frombuffer(_core.cast(bits(x).numpy(), NAME[src], "F8_E4M3"), dtype=np.uint8)
    assert_same_bits(got, torch.from_numpy(core.copy()), f"{NAME[src]} -> F8_E4M3 vs the C++ core")
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3)
    back = ops.cast(every.to(DEVICE), src)
    assert_same_bits(back, every.to(src), f"F8_E4M3 -> {NAME[src]} vs torch")


def test_cast_odd_lengths_and_offsets():
    x = f32_edge_cases()[:1001]
    for start, n in ((0, 1), (1, 7), (3, 999), (5, 130)):
        got = ops.cast(x[start:start + n].to(DEVICE), torch.bfloat16)
        assert_same_bits(got, x[start:start + n].to(torch.bfloat16), f"[{start}:{start + n}]")


def special_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random normal fp32 with NaN, Inf, subnormal and rounding-tie values sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    edge = f32_edge_cases()
    pick = torch.randint(0, edge.numel(), (rows * cols // 8,), generator=g)
    where = torch.randint(0, rows * cols, (rows * cols // 8,), generator=g)
    x.view(-1)[where] = edge[pick]
    return x


def qkv_reference(q, k, v, heads, kv_heads, head_dim, tp, rank, dtype):
    """Megatron-Core's fused linear_qkv rows, built with reshapes: per group [q_j.., k_j, v_j]."""
    g, hidden = heads // kv_heads, q.shape[1]
    fused = torch.cat([q.reshape(kv_heads, g * head_dim, hidden), k.reshape(kv_heads, head_dim, hidden),
                       v.reshape(kv_heads, head_dim, hidden)], dim=1).reshape(-1, hidden)
    return fused.chunk(tp)[rank].to(dtype)


@pytest.mark.parametrize("heads,kv_heads,head_dim,hidden,tp", [
    (4, 2, 24, 64, 2),   # GQA, head_dim != hidden / heads (the Llama test model)
    (8, 2, 16, 40, 4),   # tp > kv heads: the fused rows split by row count
    (6, 6, 8, 48, 3),    # multi-head attention
    (4, 1, 8, 33, 1),    # one KV head, odd hidden (no vector alignment)
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: NAME[d])
def test_qkv_permutation_with_cast(heads, kv_heads, head_dim, hidden, tp, dtype):
    x = special_matrix((heads + 2 * kv_heads) * head_dim, hidden, seed=heads * 10 + tp)
    q, k, v = x.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    shards = []
    for rank in range(tp):
        got = ops.qkv_to_megatron(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), heads, kv_heads, head_dim, tp, rank, dtype)
        assert_same_bits(got, qkv_reference(q, k, v, heads, kv_heads, head_dim, tp, rank, dtype),
                         f"HF -> Megatron rank {rank}/{tp}")
        shards.append(got)
    # And back: the inverse permutation of the shards (already in dtype, cast to fp32 exactly).
    back = ops.megatron_to_qkv(shards, heads, kv_heads, head_dim, torch.float32)
    for name, got, want in zip("qkv", back, (q, k, v)):
        assert_same_bits(got, want.to(dtype).to(torch.float32), f"Megatron -> HF {name}")


def test_gather_rows_repeats_and_selects():
    x = special_matrix(10, 70, seed=3).to(torch.bfloat16)
    index = torch.tensor([9, 9, 9, 0, 4, 2, 2])  # vocab padding repeats the last row
    assert_same_bits(ops.gather_rows(x.to(DEVICE), index, torch.float32), x[index].to(torch.float32), "gather")


@pytest.mark.parametrize("src,dst", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32),
                                     (torch.bfloat16, torch.bfloat16)], ids=["F32-BF16", "F16-F32", "BF16-BF16"])
def test_transpose_with_cast(src, dst):
    x = special_matrix(70, 130, seed=4).to(src)  # GPT-2's Conv1D weights are stored [in, out]
    assert_same_bits(ops.transpose_cast(x.to(DEVICE), dst), x.t().contiguous().to(dst), "transpose")


def expand(scale: torch.Tensor, shape) -> torch.Tensor:
    return scale.repeat_interleave(B, 0).repeat_interleave(B, 1)[: shape[0], : shape[1]]


def dequant_reference(q: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """(q.float() * S).to(dtype) as torch computes it. One refinement: under a NaN scale every
    element gets the scale's NaN, which is what torch's vectorised product gives (its scalar
    tail returns a NaN element's own NaN instead); pyconv's core follows the vectorised rule."""
    s = expand(scale, q.shape)
    product = q.float() * s
    nan_scale = s.isnan()
    product[nan_scale] = f32_from_bits(bits(s[nan_scale]).numpy().view(np.uint32) | 0x00400000)
    return product.to(dtype)


def fp8_patterns(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    q = every[torch.randint(0, 256, (rows, cols), generator=g)]
    q.view(-1)[:256] = every  # all 256 patterns, NaNs (0x7F, 0xFF) and subnormals included
    return q.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: NAME[d])
def test_dequantize_matches_torch(dtype):
    q = fp8_patterns(300, 290, seed=5)  # partial blocks at the bottom and the right
    g = torch.Generator().manual_seed(6)
    scale = torch.rand(3, 3, generator=g) * 2e-3
    scale[0, 1], scale[1, 0], scale[1, 1] = float("nan"), float("inf"), 1e-40   # NaN, Inf, subnormal scales
    scale[2, 0], scale[2, 2] = 3.4e38, -float("nan")
    got = ops.dequantize(q.to(DEVICE), scale.to(DEVICE), dtype)
    assert_same_bits(got, dequant_reference(q, scale, dtype), f"F8_E4M3 -> {NAME[dtype]}")


def quantize_reference(x: torch.Tensor):
    """DeepSeek's recipe in torch: scale = max(amax, 1e-4) / 448 per 128x128 block, q = e4m3fn(x / scale)."""
    x = x.float()
    gr, gc = -(-x.shape[0] // B), -(-x.shape[1] // B)
    padded = torch.zeros(gr * B, gc * B)
    padded[: x.shape[0], : x.shape[1]] = x
    scale = padded.view(gr, B, gc, B).abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448
    return (x / expand(scale, x.shape)).to(torch.float8_e4m3fn), scale


def test_quantize_matches_deepseek_recipe():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 400, generator=g) * 3
    x[:128, :128] *= 1e-9                   # a block below the 1e-4 amax floor: subnormal e4m3 and zeros
    x[128:256, :128] = 0                    # an all-zero block
    x[5, 200], x[140, 390] = float("nan"), -float("nan")   # NaN blocks: every element NaN
    x[260, 10] = float("inf")               # an Inf block: Inf / Inf is NaN, the rest +-0
    x[130, 300], x[131, 301] = 1e6, -1e30   # saturation at +-448 after the division
    x[200, 200] = 1e-42                     # an fp32 subnormal
    ties = f32_edge_cases()[: 128 * 16].reshape(16, 128)
    x[256:272, 256:384] = torch.where(ties.isnan() | ties.isinf(), torch.zeros(()), ties)
    q, scale = ops.quantize(x.to(DEVICE))
    ref_q, ref_scale = quantize_reference(x)
    assert_same_bits(scale, ref_scale, "scales")
    assert_same_bits(q.view(torch.uint8), ref_q.view(torch.uint8), "e4m3fn")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: NAME[d])
def test_quantize_from_16_bit(dtype):
    x = special_matrix(130, 260, seed=8)
    x = torch.where(x.isnan() | x.isinf(), torch.ones(()), x).to(dtype)
    q, scale = ops.quantize(x.to(DEVICE))
    ref_q, ref_scale = quantize_reference(x)
    assert_same_bits(scale, ref_scale, "scales")
    assert_same_bits(q.view(torch.uint8), ref_q.view(torch.uint8), "e4m3fn")


@pytest.fixture
def compiled_shapes(monkeypatch):
    """The launch shapes a GPU gets (smaller programs; the quantizer's two passes in 16-row
    steps) run by the interpreter, which otherwise uses larger ones for speed."""
    monkeypatch.setattr(ops, "INTERPRETED_SHAPES", ops.COMPILED_SHAPES)


def test_compiled_launch_shapes(compiled_shapes):
    assert ops.launch_shape("quantize").elements < B * B  # the multi-step passes are what this runs
    test_quantize_matches_deepseek_recipe()
    test_dequantize_matches_torch(torch.bfloat16)
    test_transpose_with_cast(torch.float32, torch.bfloat16)
    test_qkv_permutation_with_cast(8, 2, 16, 40, 4, torch.float16)
    test_gather_rows_repeats_and_selects()
    test_cast_odd_lengths_and_offsets()
