"""The DCP `.metadata` writer assembles its pickle from fragments (io.torchsave.PickleFragments);
it must give, byte for byte, what pickling the whole tree of PickledObjects gave
(tests/dcp_metadata_reference.py): random tensors, chunks, repeated keys and bytes items."""

from __future__ import annotations

import random

from dcp_metadata_reference import reference_metadata_pickle
from pyconv.io.dcp import DcpChunk, DcpTensor, ItemLocation, metadata_pickle


def _random_metadata(rng: random.Random):
    tensors = []
    for _ in range(rng.randint(0, 30)):
        nd = rng.randint(1, 4)
        size = tuple(rng.randint(1, 9) for _ in range(nd))
        chunks = tuple(DcpChunk(tuple(rng.randint(0, 3) for _ in range(nd)), tuple(rng.randint(1, 5) for _ in range(nd)),
                                ItemLocation(f"__0_{rng.randint(0, 3)}.distcp", rng.randint(0, 10**12),
                                             rng.randint(0, 70000)))
                       for _ in range(rng.randint(0, 4)))
        # few distinct names: repeated keys keep their first place and last value, as in a dict
        tensors.append(DcpTensor(f"key.{rng.randint(0, 40)}", rng.choice(["BF16", "F32", "F16", "I64", "U8"]), size,
                                 chunks))
    byte_items = {f"extra.{rng.randint(0, 50)}": ItemLocation("__0_0.distcp", rng.randint(0, 999), rng.randint(0, 999))
                  for _ in range(rng.randint(0, 5))}
    return tensors, byte_items


def test_fragments_give_the_tree_pickle_byte_for_byte():
    rng = random.Random(0)
    for _ in range(300):
        tensors, byte_items = _random_metadata(rng)
        assert metadata_pickle(tensors, byte_items, "save-id") == reference_metadata_pickle(tensors, byte_items, "save-id")


def test_dicts_of_more_than_a_thousand_items_are_batched_alike():
    tensors = [DcpTensor(f"k{i}", "BF16", (4, 4), (DcpChunk((0, 0), (2, 4), ItemLocation("__0_0.distcp", i * 100, 100)),
                                                    DcpChunk((2, 0), (2, 4), ItemLocation("__0_1.distcp", i, 7))))
               for i in range(2500)]
    byte_items = {f"x{i}": ItemLocation("__0_0.distcp", i, 2) for i in range(1200)}
    assert metadata_pickle(tensors, byte_items, "s") == reference_metadata_pickle(tensors, byte_items, "s")
