"""Layout maths against independent reference constructions (numpy), no I/O."""

from __future__ import annotations

import numpy as np
import pytest

from pyconv.errors import LayoutError
from pyconv.layout import (
    Piece, column_parallel, gated_fc1, layer_stages, padded_vocab_size, qkv_fused, replicated, row_parallel,
    stage_of_layer, vocab_parallel,
)


def assemble(pieces, sources, shape):
    out = np.full(shape, np.nan)
    for p in pieces:
        src = sources[p.source]
        block = np.repeat(src[p.row0:p.row0 + 1, p.col0:p.col0 + p.cols], p.rows, 0) if p.repeat else \
            src[p.row0:p.row0 + p.rows, p.col0:p.col0 + p.cols]
        out[p.dst_row:p.dst_row + p.rows, p.dst_col:p.dst_col + p.cols] = block
    assert not np.isnan(out).any(), "pieces leave a hole"
    return out


def disassemble(pieces, shard, shapes):
    """The inverse direction: canonical tensors rebuilt from one shard (padding rows skipped)."""
    out = {}
    for p in pieces:
        if p.repeat:
            continue
        t = out.setdefault(p.source, np.full(shapes[p.source], np.nan))
        t[p.row0:p.row0 + p.rows, p.col0:p.col0 + p.cols] = shard[p.dst_row:p.dst_row + p.rows, p.dst_col:p.dst_col + p.cols]
    return out


def reference_qkv(q, k, v, heads, groups, d, tp):
    """Megatron's converters: reshape per group, concatenate [q_g; k_g; v_g], split rows evenly."""
    h = heads // groups
    fused = np.concatenate([q.reshape(groups, h * d, -1), k.reshape(groups, d, -1), v.reshape(groups, d, -1)], axis=1)
    return np.split(fused.reshape((heads + 2 * groups) * d, -1), tp)


@pytest.mark.parametrize("heads, groups, d, tp", [
    (4, 2, 24, 1), (4, 2, 24, 2), (8, 8, 8, 4), (8, 2, 4, 2), (8, 1, 4, 1), (32, 8, 4, 8),
    (4, 2, 24, 4),   # tp > num_query_groups: an even split by raw row count
    (4, 2, 8, 8),
])
def test_qkv_fused_matches_reference_and_inverts(heads, groups, d, tp):
    hidden = 5
    rng = np.random.default_rng(heads * 100 + groups * 10 + tp)
    src = {"q": rng.normal(size=(heads * d, hidden)), "k": rng.normal(size=(groups * d, hidden)),
           "v": rng.normal(size=(groups * d, hidden))}
    expected = reference_qkv(src["q"], src["k"], src["v"], heads, groups, d, tp)
    rebuilt = {n: np.full(a.shape, np.nan) for n, a in src.items()}
    for rank in range(tp):
        pieces = qkv_fused("q", "k", "v", hidden, heads, groups, d, tp, rank)
        shard = assemble(pieces, src, expected[rank].shape)
        np.testing.assert_array_equal(shard, expected[rank])
        for name, part in disassemble(pieces, shard, {n: a.shape for n, a in src.items()}).items():
            mask = ~np.isnan(part)
            rebuilt[name][mask] = part[mask]
    for name in src:
        np.testing.assert_array_equal(rebuilt[name], src[name])


def test_qkv_golden_rows_gqa_tp2():
    # 4 heads, 2 groups, head_dim 2: rank 1 holds group 1 = q heads 2,3 (q rows 4..7), k_1, v_1.
    assert qkv_fused("q", "k", "v", 7, 4, 2, 2, 2, 1) == [
        Piece("q", 4, 0, 4, 7, 0), Piece("k", 2, 0, 2, 7, 4), Piece("v", 2, 0, 2, 7, 6)]


def test_qkv_refuses_uneven_split_with_numbers():
    with pytest.raises(LayoutError, match=r"\(heads 4 \+ 2 \* groups 2\) \* head_dim 3 = 24 is not divisible by tp = 5"):
        qkv_fused("q", "k", "v", 7, 4, 2, 3, 5, 0)
    with pytest.raises(LayoutError, match="num_attention_heads = 6 is not divisible by num_query_groups = 4"):
        qkv_fused("q", "k", "v", 7, 6, 4, 3, 1, 0)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_fc1_is_gate_then_up_per_rank(tp):
    rng = np.random.default_rng(tp)
    gate, up = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    for rank in range(tp):
        shard = assemble(gated_fc1("gate", "up", 8, 3, tp, rank), {"gate": gate, "up": up}, (16 // tp, 3))
        expected = np.concatenate([np.split(gate, tp)[rank], np.split(up, tp)[rank]])
        np.testing.assert_array_equal(shard, expected)


def test_column_row_replicated():
    w = np.arange(24.0).reshape(4, 6)
    np.testing.assert_array_equal(assemble(column_parallel("w", (4, 6), 2, 1), {"w": w}, (2, 6)), w[2:])
    np.testing.assert_array_equal(assemble(row_parallel("w", (4, 6), 3, 2), {"w": w}, (4, 2)), w[:, 4:])
    np.testing.assert_array_equal(assemble(replicated("w", (4, 6)), {"w": w}, (4, 6)), w)
    with pytest.raises(LayoutError, match="w: dim 1 = 6 is not divisible by tp = 4"):
        row_parallel("w", (4, 6), 4, 0)


def test_padded_vocab_size():
    assert padded_vocab_size(96, 128, 1) == 128
    assert padded_vocab_size(96, 128, 2) == 256
    assert padded_vocab_size(32000, 128, 8) == 32768
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(256, 128, 2) == 256


@pytest.mark.parametrize("vocab, padded, tp", [(10, 16, 2), (10, 16, 4), (16, 16, 4), (5, 16, 8), (7, 8, 1)])
def test_vocab_padding_repeats_the_last_row(vocab, padded, tp):
    emb = np.arange(vocab * 3.0).reshape(vocab, 3)
    full = np.concatenate([emb, np.repeat(emb[-1:], padded - vocab, 0)])
    for rank in range(tp):
        pieces = vocab_parallel("e", (vocab, 3), padded, tp, rank)
        np.testing.assert_array_equal(assemble(pieces, {"e": emb}, (padded // tp, 3)), np.split(full, tp)[rank])
        # Reading back drops the padding: only real rows map to the canonical tensor.
        assert all(p.repeat or p.row0 + p.rows <= vocab for p in pieces)
        assert all(p.row0 == vocab - 1 for p in pieces if p.repeat)


def test_layer_stages():
    assert layer_stages(8, 1) == [range(0, 8)]
    assert layer_stages(8, 2) == [range(0, 4), range(4, 8)]
    assert layer_stages(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    assert layer_stages(10, 3, first=2, last=2) == [range(0, 2), range(2, 8), range(8, 10)]
    assert layer_stages(7, 3, first=1) == [range(0, 1), range(1, 4), range(4, 7)]
    assert layer_stages(5, 2, last=1) == [range(0, 4), range(4, 5)]
    assert stage_of_layer(layer_stages(6, 3), 3) == (1, 1)
    with pytest.raises(LayoutError, match="7 layers are not divisible over the 2 remaining pipeline stages"):
        layer_stages(7, 2)
    with pytest.raises(LayoutError, match="does not match"):
        layer_stages(5, 2, first=3, last=3)
