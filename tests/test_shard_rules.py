"""Shard rules as objects (pyconv.layout.rules): for every rule and tp, the pieces of all ranks
tile each canonical tensor exactly (replicated rules: every rank holds all of it), and a shard
read back through Piece.source_block lands every element where the split took it from."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pyconv.catalog import StoredTensor
from pyconv.layout.rules import COLUMN, GATED_FC1, LATENT_DOWN, QKV, REPLICATED, ROW, RULES, VOCAB

DIMS = SimpleNamespace(heads=8, groups=2, head_dim=3)
HIDDEN = 6


def _cases():
    q, kv = DIMS.heads * DIMS.head_dim, DIMS.groups * DIMS.head_dim
    yield REPLICATED, {"w": (HIDDEN, 1)}, (HIDDEN, 1)
    yield COLUMN, {"w": (8, HIDDEN)}, (8, HIDDEN)
    yield ROW, {"w": (HIDDEN, 8)}, (HIDDEN, 8)
    yield VOCAB, {"w": (13, HIDDEN)}, (13, HIDDEN)
    yield GATED_FC1, {"gate": (8, HIDDEN), "up": (8, HIDDEN)}, (8, HIDDEN)
    yield QKV, {"q": (q, HIDDEN), "k": (kv, HIDDEN), "v": (kv, HIDDEN)}, (q, HIDDEN)
    yield QKV, {"qkv": (q + 2 * kv, HIDDEN)}, (q + 2 * kv, HIDDEN)  # GPT-2's c_attn: one tensor
    yield LATENT_DOWN, {"w": (8, HIDDEN)}, (8, HIDDEN)


def test_every_rule_is_tested():
    assert {rule for rule, *_ in _cases()} == set(RULES)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("naming", ["te", "local"])
@pytest.mark.parametrize("case", list(range(8)))
def test_split_then_assemble_covers_each_element_once(case, tp, naming):
    rule, sources, shape = list(_cases())[case]
    padded = 16  # a multiple of every tp here
    # canonical tensors filled with distinct numbers
    start, canonical = 0, {}
    for name, (rows, cols) in sources.items():
        canonical[name] = np.arange(start, start + rows * cols).reshape(rows, cols)
        start += rows * cols
    seen = {name: np.zeros(a.shape, dtype=int) for name, a in canonical.items()}
    names = list(sources)
    for rank in range(tp):
        pieces = rule.pieces(names, shape, DIMS, padded, tp, rank, naming)
        rows = max(p.dst_row + p.rows for p in pieces)
        cols = max(p.dst_col + p.cols for p in pieces)
        shard = np.full((rows, cols), -1)
        for p in pieces:  # the split: canonical -> shard
            block = canonical[p.source][p.row0:p.row0 + (1 if p.repeat else p.rows), p.col0:p.col0 + p.cols]
            shard[p.dst_row:p.dst_row + p.rows, p.dst_col:p.dst_col + p.cols] = block
        assert (shard >= 0).all(), f"rank {rank}: shard positions no piece fills"
        stored = StoredTensor("shard", 0, "F32", (rows, cols))
        for p in pieces:  # the assembly: shard -> canonical, through the same pieces
            b = p.source_block(stored, transposed=False)
            if b is None:
                assert p.repeat
                continue
            got = shard[b.src_row:b.src_row + b.rows, b.src_col:b.src_col + b.cols]
            want = canonical[p.source][b.dst_row:b.dst_row + b.rows, b.dst_col:b.dst_col + b.cols]
            assert (got == want).all()
            seen[p.source][b.dst_row:b.dst_row + b.rows, b.dst_col:b.dst_col + b.cols] += 1
    whole = rule.whole_on_every_rank(naming)
    for name, count in seen.items():
        assert (count == (tp if whole else 1)).all(), f"{rule} tp={tp}: {name} not covered exactly"


def test_qkv_rank_holds_whole_groups_in_megatron_order():
    """tp 2 over 2 groups of 4 heads: rank 1 holds [q heads 4..7 | k_1 | v_1]."""
    pieces = QKV.pieces(["q", "k", "v"], (24, HIDDEN), DIMS, 0, 2, 1)
    assert [(p.source, p.row0, p.rows, p.dst_row) for p in pieces] == [("q", 12, 12, 0), ("k", 3, 3, 12),
                                                                          ("v", 3, 3, 15)]


def test_latent_down_is_whole_under_te_and_split_under_local():
    assert LATENT_DOWN.whole_on_every_rank("te") and not LATENT_DOWN.whole_on_every_rank("local")
    assert LATENT_DOWN.alternative_namings("te") == ("local",)
    assert [p.rows for p in LATENT_DOWN.pieces(["w"], (8, 4), DIMS, 0, 2, 1, "local")] == [4]


def test_expert_partition_places_contiguous_ranges():
    from pyconv.errors import LayoutError
    from pyconv.layout.rules import ExpertPartition

    part = ExpertPartition(8, 4)
    assert part.experts_of(1) == [(2, 0), (3, 1)]
    assert [part.rank_of(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(e for r in range(4) for e, _ in part.experts_of(r)) == list(range(8))
    assert ExpertPartition(0, 2).experts_of(1) == []  # a dense model
    with pytest.raises(LayoutError, match="num_experts = 6 is not divisible by ep = 4"):
        ExpertPartition(6, 4).per_rank
