"""Each file's header is parsed once per read of a checkpoint, detection included: MindFormers'
detection peeks at an HF directory's safetensors header and the legacy-Megatron detection at a
Megatron rank-0 pickle, which reading then parses again unless remembered."""

from __future__ import annotations

from collections import Counter

import pyconv
from pyconv.io import safetensors, torchzip

from test_output_hashes import make_source


def _count_parses(monkeypatch) -> Counter:
    counts: Counter = Counter()
    read_header, read_archive = safetensors._read_header, torchzip._read_archive

    def counted_header(path):
        counts[path] += 1
        return read_header(path)

    def counted_archive(path, f, base, size):
        counts[(path, base)] += 1
        return read_archive(path, f, base, size)

    monkeypatch.setattr(safetensors, "_read_header", counted_header)
    monkeypatch.setattr(torchzip, "_read_archive", counted_archive)
    return counts


def test_each_header_is_parsed_once_per_read(tmp_path, monkeypatch):
    src = make_source("llama", tmp_path / "src")
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2)
    counts = _count_parses(monkeypatch)
    pyconv.open(src)
    pyconv.open(tmp_path / "meg")
    assert counts and max(counts.values()) == 1, counts
    assert len([k for k in counts if isinstance(k, tuple)]) == 2  # both rank files, once each


def test_nothing_is_remembered_between_reads(tmp_path, monkeypatch):
    """A file that changes between two runs is parsed again (no stale header)."""
    src = make_source("llama", tmp_path / "src")
    counts = _count_parses(monkeypatch)
    pyconv.open(src)
    pyconv.open(src)
    assert set(counts.values()) == {2}
