"""`pyconv verify A B`: two checkpoints, in any formats and layouts, compared tensor by tensor
through their canonical names. The core gathers each tensor from both sides chunk by chunk
(memory stays at two chunks per thread) and compares bit for bit, or within a tolerance."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from pyconv import _core
from pyconv.catalog import CanonicalTensor, view2d
from pyconv.dtypes import FLOAT_DTYPES
from pyconv.formats import read_checkpoint
from pyconv.plan import check_count, copies_for_region, copy_record


@dataclass
class TensorDifference:
    name: str
    reason: str                 # "values", "dtype" or "shape"
    a_dtype: str
    b_dtype: str
    a_shape: list[int]
    b_shape: list[int]
    differing: int = 0          # elements that differ (values compared in F32 when dtypes differ)
    numel: int = 0
    max_abs_diff: float = 0.0
    first_index: int | None = None


@dataclass
class VerifyReport:
    a: str
    b: str
    compared: int = 0
    missing: list[str] = field(default_factory=list)   # in a, not in b
    extra: list[str] = field(default_factory=list)     # in b, not in a
    different: list[TensorDifference] = field(default_factory=list)
    bitwise: bool = True
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def equal(self) -> bool:
        return not (self.missing or self.extra or self.different)

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "different"}, "equal": self.equal,
                "different": [asdict(d) for d in self.different]}

    def summary(self) -> str:
        mode = "bit for bit" if self.bitwise else f"within atol={self.atol} rtol={self.rtol}"
        lines = [f"{'EQUAL' if self.equal else 'DIFFERENT'}: {self.a} vs {self.b} "
                 f"({self.compared} tensors compared {mode})"]
        lines += [f"  missing from b: {n}" for n in self.missing]
        lines += [f"  extra in b:     {n}" for n in self.extra]
        for d in self.different:
            if d.reason == "shape":
                lines.append(f"  shape differs:  {d.name} {d.a_shape} vs {d.b_shape}")
            else:
                what = f" ({d.a_dtype} vs {d.b_dtype})" if d.reason == "dtype" else ""
                lines.append(f"  {d.reason} differ{'s' if d.reason == 'dtype' else ''}: {d.name}{what}: "
                             f"{d.differing} of {d.numel} elements, max |a-b| {d.max_abs_diff:g}"
                             + (f", first at flat index {d.first_index}" if d.first_index is not None else ""))
        return "\n".join(lines)


def _compare_dtype(a: CanonicalTensor, b: CanonicalTensor, bitwise: bool) -> str:
    """Same dtype and bit for bit: the stored bytes. Otherwise values, in F32."""
    if a.dtype == b.dtype and (bitwise or a.dtype not in FLOAT_DTYPES + ("F8_E4M3",)):
        return a.dtype
    return "F32"


def verify(a, b, *, atol: float | None = None, rtol: float | None = None, threads: int = 4,
           family: str | None = None, chunk_bytes: int = 1 << 20, progress=None) -> VerifyReport:
    """Compares checkpoints a and b (any supported formats) by canonical tensor name."""
    a, b = os.fspath(a), os.fspath(b)
    check_count("threads", threads)
    cat_a = read_checkpoint(a, family=family)
    cat_b = read_checkpoint(b, family=family)
    bitwise = atol is None and rtol is None
    report = VerifyReport(cat_a.path, cat_b.path, bitwise=bitwise, atol=atol or 0.0, rtol=rtol or 0.0)
    tensors_a, tensors_b = _with_tied_head(cat_a, cat_b), _with_tied_head(cat_b, cat_a)
    report.missing = [n for n in tensors_a if n not in tensors_b]
    report.extra = [n for n in tensors_b if n not in tensors_a]
    sources: dict[str, int] = {}
    compared, jobs = [], []
    for name, ta in tensors_a.items():
        tb = tensors_b.get(name)
        if tb is None:
            continue
        report.compared += 1
        difference = TensorDifference(name, "values", ta.dtype, tb.dtype, list(ta.shape), list(tb.shape))
        if tuple(ta.shape) != tuple(tb.shape):
            difference.reason = "shape"
            report.different.append(difference)
            continue
        rows, cols = view2d(ta.shape)
        difference.numel = rows * cols
        dtype = _compare_dtype(ta, tb, bitwise)
        if bitwise and ta.dtype != tb.dtype:
            difference.reason = "dtype"
        if rows * cols == 0:
            if difference.reason == "dtype":
                report.different.append(difference)
            continue
        sides = [[copy_record(c, sources) for c in copies_for_region(t, 0, 0, rows, cols, dtype=dtype)] for t in (ta, tb)]
        jobs.append((dtype, rows, cols, sides[0], sides[1]))
        compared.append(difference)
    results = _core.compare(list(sources), jobs, threads=threads, chunk_bytes=chunk_bytes, bitwise=bitwise,
                            atol=atol or 0.0, rtol=rtol or 0.0, progress=progress) if jobs else []
    for difference, (differing, max_abs, first) in zip(compared, results):
        difference.differing, difference.max_abs_diff, difference.first_index = differing, max_abs, first
        if differing or difference.reason == "dtype":
            report.different.append(difference)
    return report


_EMBEDDING = "embedding.word_embeddings.weight"  # Megatron-Core's name of the input embedding
_HEAD = "output_layer.weight"


def _with_tied_head(catalog, other) -> dict:
    """catalog's tensors; where it ties its output head to the input embedding and stores no head
    (Megatron does not) but `other` stores one (transformers' .bin files do), the embedding
    stands for the head, so that the two compare as the models they are."""
    from pyconv.families import family_for_architecture

    tensors = catalog.tensors
    try:
        family = family_for_architecture(catalog.architecture, catalog.path)
        tied = family.dims_from_hf(catalog.config or {}).tied
    except Exception:  # noqa: BLE001 - an unknown or partial config: no tie to honour
        return tensors
    names = {m.megatron: m.hf[0] for m in family.mappings if len(m.hf) == 1 and isinstance(m.megatron, str)}
    head, embedding = names.get(_HEAD), names.get(_EMBEDDING)
    if not tied or head is None or head in tensors or head not in other.tensors or embedding not in tensors:
        return tensors
    return {**tensors, head: tensors[embedding]}

