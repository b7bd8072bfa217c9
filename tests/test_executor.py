"""The core's block-copy executor on synthetic files: layouts, chunking, casts, bounds."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pyconv import _core
from pyconv.errors import FormatError, OutputError


def write(path, array):
    path.write_bytes(array.tobytes())
    return str(path)


def run(tmp_path, sources, size, tensors, **kwargs):
    out = tmp_path / "out.bin"
    _core.execute(sources, [(str(out), size)], [], tensors, **kwargs)
    return out.read_bytes()


@pytest.mark.parametrize("chunk_bytes", [4096, 1 << 20])
@pytest.mark.parametrize("threads", [1, 3])
def test_merges_row_and_column_shards(tmp_path, chunk_bytes, threads):
    rng = np.random.default_rng(0)
    full = rng.integers(0, 2**31, size=(300, 40), dtype=np.int32).view(np.float32)
    # Column shards (TP row-parallel layout) of 300 x 20 each, at an offset inside their files.
    a = write(tmp_path / "a", np.concatenate([np.zeros(3, np.float32), full[:, :20].ravel()]))
    b = write(tmp_path / "b", full[:, 20:].copy())
    copies = [(0, 12, 80, "F32", 300, 20, 0, 0, False), (1, 0, 80, "F32", 300, 20, 0, 20, False)]
    data = run(tmp_path, [a, b], full.nbytes, [(0, 0, "F32", 300, 40, copies)], threads=threads, chunk_bytes=chunk_bytes)
    assert data == full.tobytes()


def test_row_larger_than_chunk_is_split_by_columns(tmp_path):
    row = np.arange(5000, dtype=np.float32)
    src = write(tmp_path / "src", row)
    data = run(tmp_path, [src], 5000 * 2, [(0, 0, "BF16", 1, 5000, [(0, 0, 20000, "F32", 1, 5000, 0, 0, False)])],
               chunk_bytes=4096)
    expected = _core.cast(row.tobytes(), "F32", "BF16")
    assert data == expected


def test_stride_zero_repeats_a_row_for_vocab_padding(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    src = write(tmp_path / "src", emb)
    copies = [(0, 0, 16, "F32", 3, 4, 0, 0, False), (0, 32, 0, "F32", 2, 4, 3, 0, False)]  # pad 2 rows with the last row
    data = run(tmp_path, [src], 5 * 16, [(0, 0, "F32", 5, 4, copies)])
    assert np.frombuffer(data, np.float32).reshape(5, 4).tolist() == emb.tolist() + [emb[2].tolist()] * 2


def test_literals_and_several_tensors(tmp_path):
    x = np.arange(8, dtype=np.float16)
    src = write(tmp_path / "src", x)
    out = tmp_path / "out.bin"
    tensors = [(0, 8, "F16", 1, 4, [(0, 8, 8, "F16", 1, 4, 0, 0, False)]), (0, 16, "F32", 1, 4, [(0, 0, 8, "F16", 1, 4, 0, 0, False)])]
    stats = _core.execute([src], [(str(out), 32)], [(0, 0, b"HEADER!!")], tensors)
    data = out.read_bytes()
    assert data[:8] == b"HEADER!!"
    assert np.frombuffer(data[8:16], np.float16).tolist() == [4, 5, 6, 7]
    assert np.frombuffer(data[16:32], np.float32).tolist() == [0, 1, 2, 3]
    assert stats["bytes_written"] == 32


@pytest.mark.parametrize("copies, message", [
    ([(0, 16, 16, "F32", 3, 4, 0, 0, False)], "outside the file"),          # reads to byte 64 of 48
    ([(0, 0, 16, "F32", 2, 4, 0, 0, False)], "cover 8 of 12 elements"),      # a hole in the output
    ([(0, 0, 16, "F32", 3, 4, 1, 0, False)], "lies outside the tensor"),     # past the last row
    ([(0, 0, 16, "I32", 3, 4, 0, 0, False)], "cannot cast I32 to F32"),
    ([(5, 0, 16, "F32", 3, 4, 0, 0, False)], "missing source"),
    ([(0, 0, 2**63, "F32", 3, 4, 0, 0, False)], "overflows"),
    # 8 + 4 elements, as many as the tensor has, but row 1 written twice and row 2 never
    ([(0, 0, 16, "F32", 2, 4, 0, 0, False), (0, 0, 16, "F32", 1, 4, 1, 0, False)],
     re.escape("out.bin: output tensor #0: block copies #0 [0+2, 0+4] and #1 [1+1, 0+4] overlap in rows [1, 2), columns [0, 4)")),
    # side by side, the second reaching one column into the first; a column left empty
    ([(0, 0, 16, "F32", 3, 2, 0, 0, False), (0, 0, 16, "F32", 3, 2, 0, 1, False)],
     re.escape("block copies #0 [0+3, 0+2] and #1 [0+3, 1+2] overlap in rows [0, 3), columns [1, 2)")),
])
def test_plan_errors_are_caught_before_writing(tmp_path, copies, message):
    src = write(tmp_path / "src", np.zeros(12, np.float32))
    out = tmp_path / "out.bin"
    with pytest.raises(FormatError, match=message):
        _core.execute([src], [(str(out), 48)], [], [(0, 0, "F32", 3, 4, copies)])
    assert not out.exists()


def test_destination_range_is_checked(tmp_path):
    src = write(tmp_path / "src", np.zeros(4, np.float32))
    with pytest.raises(FormatError, match="runs past the file size"):
        _core.execute([src], [(str(tmp_path / "o"), 8)], [], [(0, 0, "F32", 1, 4, [(0, 0, 16, "F32", 1, 4, 0, 0, False)])])
    with pytest.raises(FormatError, match="past the file size"):
        _core.execute([src], [(str(tmp_path / "o"), 8)], [(0, 4, b"12345")], [])


def test_output_file_writes_at_offsets_inside_its_planned_size(tmp_path):
    """_core.OutputFile is the executor's destination file; --device cuda writes through it."""
    path = tmp_path / "out.bin"
    with _core.OutputFile(str(path), 16) as out:
        assert path.stat().st_size == 16  # preallocated when opened
        out.write(8, np.arange(8, dtype=np.uint8))
        out.write(0, b"head")
        out.write(4, memoryview(b"abcd"))
        with pytest.raises(FormatError, match=re.escape(f"{path}: write of 5 bytes at 12 runs past the file size 16")):
            out.write(12, b"12345")
        out.sync()
    assert path.read_bytes() == b"headabcd" + bytes(range(8))
    with pytest.raises(OutputError, match=re.escape(f"{path}: write after the file was closed")):
        out.write(0, b"x")
    with pytest.raises(OutputError, match=re.escape(f"{tmp_path / 'missing' / 'x'}: cannot create: No such file")):
        _core.OutputFile(str(tmp_path / "missing" / "x"), 1)
    with pytest.raises(KeyError), _core.OutputFile(str(path), 4):  # an error inside the block goes on as it was
        raise KeyError("x")


@pytest.mark.parametrize("literals, tensors, message", [
    # two tensors of 32 bytes at 8 and 36: bytes 36..40 written by both
    ([(0, 0, b"HEADER!!")], [(8, None), (36, None)], "output tensor #1 [36, 68) overlaps output tensor #0 [8, 40)"),
    # a header one byte too long runs into the first tensor
    ([(0, 0, b"HEADER!!!")], [(8, None), (40, None)], "output tensor #0 [8, 40) overlaps literal #0 [0, 9)"),
    # a literal inside the second tensor, found past the first
    ([(0, 0, b"HEADER!!"), (0, 60, b"xyz")], [(8, None), (40, None)], "literal #1 [60, 63) overlaps output tensor #1 [40, 72)"),
    # the first tensor quantized (8 fp8 bytes at 8, its 1 x 1 scale grid at 12): grid over its own bytes
    ([(0, 0, b"HEADER!!")], [(8, 12), (40, None)], "the scale grid of output tensor #0 [12, 16) overlaps output tensor #0 [8, 16)"),
])
def test_overlapping_file_ranges_are_refused_before_writing(tmp_path, literals, tensors, message):
    src = write(tmp_path / "src", np.zeros(8, np.float32))
    out = tmp_path / "out.bin"
    records = []
    for offset, scales in tensors:
        copy = (0, 0, 16, "F32", 2, 4, 0, 0, False)
        records.append((0, offset, "F32", 2, 4, [copy]) if scales is None else (0, offset, "F8_E4M3", 2, 4, [copy], scales))
    with pytest.raises(FormatError, match=re.escape(f"{out}: {message}")):
        _core.execute([src], [(str(out), 72)], literals, records)
    assert not out.exists()


def test_validate_checks_as_execute_does_and_touches_nothing(tmp_path):
    src = write(tmp_path / "src", np.zeros(12, np.float32))
    out = tmp_path / "out.bin"
    good = [(0, 0, 16, "F32", 2, 4, 0, 0, False), (0, 32, 16, "F32", 1, 4, 2, 0, False)]
    assert _core.validate([src], [(str(out), 48)], [], [(0, 0, "F32", 3, 4, good)]) is None
    overlapping = [(0, 0, 16, "F32", 2, 4, 0, 0, False), (0, 32, 16, "F32", 1, 4, 1, 0, False)]
    with pytest.raises(FormatError, match=re.escape(f"{out}: output tensor #0: block copies #0 [0+2, 0+4] and #1 [1+1, 0+4]")):
        _core.validate([src], [(str(out), 48)], [], [(0, 0, "F32", 3, 4, overlapping)])
    with pytest.raises(FormatError, match="outside the file"):
        _core.validate([src], [(str(out), 64)], [], [(0, 0, "F32", 4, 4, [(0, 0, 16, "F32", 4, 4, 0, 0, False)])])
    with pytest.raises(FormatError, match=re.escape(f"{out}: literal #0 [40, 52) overlaps output tensor #0 [0, 48)")):
        _core.validate([src], [(str(out), 52)], [(0, 40, b"x" * 12)], [(0, 0, "F32", 3, 4, good)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no destination created, valid or not


def test_progress_callback_can_cancel(tmp_path):
    big = np.zeros(8 << 20, np.uint8)
    src = write(tmp_path / "src", big)

    def progress(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _core.execute([src], [(str(tmp_path / "o"), big.size)], [],
                      [(0, 0, "U8", 4096, 2048, [(0, 0, 2048, "U8", 4096, 2048, 0, 0, False)])],
                      chunk_bytes=4096, threads=1, progress=progress)


@pytest.mark.parametrize("chunk_bytes", [4096, 1 << 20])
def test_transposed_blocks(tmp_path, chunk_bytes):
    rng = np.random.default_rng(3)
    stored = rng.normal(size=(70, 150)).astype(np.float32)  # [in, out] as GPT-2's Conv1D stores it
    src = write(tmp_path / "src", stored)
    # Output [150, 70] = stored.T, in two row halves taken from column ranges of the source, cast to F16.
    copies = [(0, 0, 600, "F32", 80, 70, 0, 0, True), (0, 80 * 4, 600, "F32", 70, 70, 80, 0, True)]
    data = run(tmp_path, [src], 150 * 70 * 2, [(0, 0, "F16", 150, 70, copies)], chunk_bytes=chunk_bytes, threads=2)
    np.testing.assert_array_equal(np.frombuffer(data, np.float16).reshape(150, 70), stored.T.astype(np.float16))


def test_transposed_source_bounds_are_checked(tmp_path):
    src = write(tmp_path / "src", np.zeros((4, 3), np.float32))
    with pytest.raises(FormatError, match="outside the file"):  # reads 5 source rows of a 4-row tensor
        _core.execute([src], [(str(tmp_path / "o"), 60)], [], [(0, 0, "F32", 3, 5, [(0, 0, 12, "F32", 3, 5, 0, 0, True)])])


def test_row_shards_go_file_to_file_in_tasks_that_never_straddle_shards(tmp_path):
    rng = np.random.default_rng(5)
    full = rng.integers(0, 255, size=(300, 64), dtype=np.uint8).view(np.int8)
    a = write(tmp_path / "a", full[:130])
    b = write(tmp_path / "b", np.concatenate([np.zeros(7, np.int8), full[130:].ravel()]))
    copies = [(0, 0, 64, "I8", 130, 64, 0, 0, False), (1, 7, 64, "I8", 170, 64, 130, 0, False)]
    out = tmp_path / "out.bin"
    stats = _core.execute([a, b], [(str(out), full.nbytes)], [], [(0, 0, "I8", 300, 64, copies)],
                          chunk_bytes=4096, threads=2)
    assert out.read_bytes() == full.tobytes()
    assert stats["direct_tasks"] == stats["tasks"] == 3 + 3  # 64 rows a task: 130 rows in 3 tasks, 170 in 3


def test_small_tensors_back_to_back_are_one_copy_per_run(tmp_path):
    """Tensors adjacent in one source and in one destination (an MoE checkpoint's thousands of small
    experts) are copied as runs of up to chunk_bytes: one copy_file_range and one writeback each.
    A gap in the source, another source file or a cast ends a run."""
    rng = np.random.default_rng(3)
    data = rng.integers(0, 2**31, size=8192, dtype=np.int32).view(np.float32)
    a = write(tmp_path / "a", data)
    b = write(tmp_path / "b", data[::-1].copy())
    t = 256  # bytes of each 8 x 8 F32 tensor
    tensors = [(0, i * t, "F32", 8, 8, [(0, i * t, 32, "F32", 8, 8, 0, 0, False)]) for i in range(20)]  # a run
    tensors.append((0, 20 * t, "F32", 8, 8, [(0, 25 * t, 32, "F32", 8, 8, 0, 0, False)]))  # a gap in the source
    tensors.append((0, 21 * t, "F32", 8, 8, [(1, 26 * t, 32, "F32", 8, 8, 0, 0, False)]))  # another source
    tensors.append((0, 22 * t, "F32", 8, 8, [(0, 27 * t, 32, "F32", 8, 8, 0, 0, False)]))  # adjacent to the gap one
    tensors.append((0, 23 * t, "BF16", 8, 8, [(0, 28 * t, 32, "F32", 8, 8, 0, 0, False)]))  # a cast
    out = tmp_path / "out.bin"
    size = 23 * t + t // 2
    stats = _core.execute([a, b], [(str(out), size)], [], tensors, threads=2)
    got = out.read_bytes()
    raw = data.tobytes()
    assert got[:20 * t] == raw[:20 * t]
    assert got[20 * t:21 * t] == raw[25 * t:26 * t]
    assert got[21 * t:22 * t] == data[::-1].tobytes()[26 * t:27 * t]
    assert got[22 * t:23 * t] == raw[27 * t:28 * t]
    assert got[23 * t:] == _core.cast(raw[28 * t:29 * t], "F32", "BF16")
    assert stats["tasks"] == 5 and stats["direct_tasks"] == 4  # [0..19], [20], [21], [22], and the cast
    stats = _core.execute([a, b], [(str(out), size)], [], tensors, chunk_bytes=4096)  # runs of at most 4 KiB
    assert out.read_bytes() == got and stats["tasks"] == 6  # [0..15], [16..19], [20], [21], [22], the cast
