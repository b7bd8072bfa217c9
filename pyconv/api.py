"""The public Python API: open, inspect and reshard checkpoints."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields

from pyconv.catalog import Catalog
from pyconv.errors import FormatError, LayoutError, OutputError
from pyconv.formats import get_format, read_checkpoint
from pyconv.dtypes import TORCH_NAME, parse_dtype
from pyconv.plan import ReshardPlan, TargetSpec, check_count, parse_size, recording_written
from pyconv.quantized import refuse_transforming



class Checkpoint:
    """A lazily opened checkpoint: names, shapes and dtypes without reading tensor bytes."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._maps: dict[str, object] = {}

    format = property(lambda self: self.catalog.format)
    path = property(lambda self: self.catalog.path)
    architecture = property(lambda self: self.catalog.architecture)
    config = property(lambda self: self.catalog.config)
    total_bytes = property(lambda self: self.catalog.total_bytes)

    def keys(self) -> list[str]:
        return list(self.catalog.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.catalog.tensors

    def __len__(self) -> int:
        return len(self.catalog.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name).shape

    def dtype(self, name: str) -> str:
        return self._tensor(name).dtype

    def _tensor(self, name: str):
        try:
            return self.catalog.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named '{name}'") from None

    def get(self, name: str):
        """The tensor as a torch.Tensor. Stored whole, it is a zero-copy, read-only view of
        the file mapping; assembled from shards, it is materialised."""
        import torch

        from pyconv.catalog import view2d

        t = self._tensor(name)
        dtype = getattr(torch, TORCH_NAME[t.dtype])
        rows, cols = view2d(t.shape)
        if rows * cols == 0:
            return torch.empty(t.shape, dtype=dtype)
        first = t.blocks[0].stored
        if len(t.blocks) == 1 and first.shape == t.shape and first.dtype == t.dtype:
            return self._stored_view(first, dtype)
        out = torch.empty((rows, cols), dtype=dtype)
        for b in t.blocks:
            src = self._stored_view(b.stored, dtype).reshape(view2d(b.stored.shape))
            if b.transpose:
                block = src[b.src_row:b.src_row + b.cols, b.src_col:b.src_col + b.rows].T
            else:
                block = src[b.src_row:b.src_row + b.rows, b.src_col:b.src_col + b.cols]
            out[b.dst_row:b.dst_row + b.rows, b.dst_col:b.dst_col + b.cols] = block
        return out.view(t.shape)

    def _stored_view(self, stored, dtype):
        """A stored tensor as a view of its file's read-only mapping, with its strides."""
        import math
        import warnings

        import torch

        from pyconv import _core

        mapping = self._maps.get(stored.path)
        if mapping is None:
            mapping = self._maps[stored.path] = _core.MappedFile(stored.path)
        span = 1 + sum((n - 1) * s for n, s in zip(stored.shape, stored.element_strides)) if math.prod(stored.shape) else 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the buffer is not writable; it is meant not to be
            flat = torch.frombuffer(mapping, dtype=dtype, count=span, offset=stored.offset) if span else \
                torch.empty(0, dtype=dtype)
        return flat.as_strided(stored.shape, stored.element_strides)

    def summary(self) -> dict:
        by_dtype: dict[str, int] = {}
        for t in self.catalog.tensors.values():
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        return {
            "path": self.path,
            "format": self.format,
            "architecture": self.architecture,
            "tensors": len(self),
            "total_bytes": self.total_bytes,
            "bytes_by_dtype": by_dtype,
            "extra_files": [os.path.basename(p) for p, _ in self.catalog.extra_files],
            **self.catalog.details,
            **({"notes": list(self.catalog.notes)} if self.catalog.notes else {}),
        }

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, format={self.format!r}, architecture={self.architecture!r}, tensors={len(self)})"


def open(path: str | os.PathLike, format: str | None = None, family: str | None = None) -> Checkpoint:  # noqa: A001
    """Opens a checkpoint lazily (headers only); format and family are detected unless given."""
    return Checkpoint(read_checkpoint(os.fspath(path), format, family=family))


def _validate_layout(layout: dict) -> None:
    for key in ("tp", "pp", "vpp", "ep", "etp", "vocab_divisible_by"):
        if layout.get(key) is not None:
            check_count(key, layout[key])
    iteration = layout.get("iteration")
    if iteration is not None and (isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0):
        raise LayoutError(f"iteration must be a whole number >= 0, got {iteration!r}")  # iter_NNNNNNN/ as Megatron-LM


@dataclass
class ReshardReport:
    source: str
    destination: str
    files: int
    tensors: int  # model tensors by Hugging Face name, as `inspect` counts them; plan.tensor_count: stored
    bytes: int
    seconds: float
    dry_run: bool = False
    plan: ReshardPlan | None = field(default=None, repr=False)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        stored = self.plan.tensor_count if self.plan is not None else None
        return {"source": self.source, "destination": self.destination, "files": self.files, "tensors": self.tensors,
                "stored_tensors": stored,
                "bytes": self.bytes, "seconds": round(self.seconds, 6), "gb_per_s": round(self.gb_per_s, 3),
                "dry_run": self.dry_run}


def _check_plan_sources(plan: ReshardPlan, dst: str) -> None:
    """Every file the plan reads, resolved (a hub cache's snapshot is symlinks into blobs), lies
    outside the destination, so that replacing the destination cannot destroy a source."""
    real_dst = os.path.realpath(dst)
    paths = set()
    for copy in (c for f in plan.files for t in f.tensors for c in t.copies):
        paths.add(copy.source)
        if copy.scale_source:
            paths.add(copy.scale_source)
        paths.update(path for term in copy.low_rank for path in (term.left_source, term.right_source))
    for path in sorted(paths):
        real = os.path.realpath(path)
        if real == real_dst or real.startswith(real_dst + os.sep):
            raise OutputError(f"{dst}: the source file {path} is {real}, inside the destination; replacing the "
                              "destination would destroy it")


def _check_paths(src: str, dst: str) -> None:
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_dst.startswith(real_src + os.sep):
        raise OutputError(f"{dst}: destination is the source or inside it")
    if real_src.startswith(real_dst + os.sep):
        raise OutputError(f"{dst}: destination contains the source; replacing it would destroy the source")


def target_spec(to: str, dtype: str | None = None, **options) -> TargetSpec:
    """The target of a conversion: format `to`, dtype, and options of that format only (tp, pp...
    for megatron; max_shard_size for hf...). An option the format does not take is refused."""
    adapter = get_format(to)
    if adapter.plan_output is None or adapter.options is None:
        raise LayoutError(f"format '{to}' can be read but not written")
    known = {f.name for f in fields(adapter.options)}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise LayoutError(f"option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                          f"{'do' if len(unknown) > 1 else 'does'} not apply to format '{to}' "
                          f"(its options: {', '.join(sorted(known)) or 'none'})")
    if "max_shard_size" in given:
        given["max_shard_size"] = parse_size(given["max_shard_size"])
    _validate_layout(given)
    return TargetSpec(format=to, dtype=parse_dtype(dtype), options=adapter.options(**given))


def plan_reshard(src: str, *, to: str = "hf", dtype: str | None = None, source_format: str | None = None,
                 family: str | None = None, merge_lora=(), language_model: bool = False, **options) -> ReshardPlan:
    """The plan of a conversion, as pure data: nothing is read but headers, nothing written.
    options: the target format's options (see target_spec), e.g. tp=2, pp=2 for megatron.
    merge_lora: PEFT LoRA adapter directories merged into the weights, in order. language_model:
    convert the language model of a multimodal checkpoint alone, as its text model."""
    target = target_spec(to, dtype, **options)
    catalog = read_checkpoint(os.fspath(src), source_format, family=family)
    refuse_transforming(catalog.details.get("quantization"), catalog.path, to, target.dtype)
    if language_model:
        from pyconv.language_model import language_model_view

        catalog = language_model_view(catalog)
    if merge_lora:
        from pyconv.lora import merge_adapters

        catalog = merge_adapters(catalog, [os.fspath(p) for p in merge_lora])
    with recording_written() as written:
        files = get_format(to).plan_output(catalog, target)
    return ReshardPlan(catalog.path, catalog.format, target.to_json(), tuple(files),
                       catalog.notes + tuple(getattr(files, "notes", ())), model_tensors=len(written))


def reshard(src, dst, *, to: str = "hf", dtype: str | None = None, force: bool = False,
            dry_run: bool = False, threads: int = 4, source_format: str | None = None,
            progress=None, device: str = "cpu", phase=None, merge_lora=(), language_model: bool = False,
            **options) -> ReshardReport:
    """Converts src into dst in format `to`; returns a report of files, bytes and speed.

    dtype: fp32 | bf16 | fp16 | fp8 (floating tensors are cast; others keep theirs);
    options: the target format's own (its adapter's Options), e.g. max_shard_size (bytes or '5GB')
    for hf, mindspore, torch_dist and nemo; tp, pp, vpp, pipeline_layout, ep, etp, megatron_naming
    ('te' or 'local'), moe_grouped_gemm, iteration, vocab_divisible_by, first_stage_layers,
    last_stage_layers for megatron; an option the target does not take is refused. family: the
    family of a Megatron source whose args do not tell it. merge_lora: Hugging Face PEFT LoRA
    adapter directories, merged into the weights while they are written (W + scale * B @ A in
    fp32, in the given order), whatever the target format and layout. language_model: the language
    model of a multimodal checkpoint (Gemma3ForConditionalGeneration) alone, as its text model
    (Gemma3ForCausalLM); the vision tower and projector are left out, with a note.
    Nothing is written on dry_run. device: "cpu" (the C++ core) or "cuda" (Triton kernels on a GPU,
    or on the CPU under TRITON_INTERPRET=1; same output bytes). progress(done bytes, total bytes)
    is called about every 100 ms (returning False cancels); phase(name) as the run enters
    'copying', 'syncing' and 'committing'.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    check_count("threads", threads)
    if not os.path.exists(src):
        raise FormatError(f"{src}: no such file or directory")
    _check_paths(src, dst)
    if not dry_run and os.path.lexists(dst) and not force:
        raise OutputError(f"{dst}: destination exists (replacing it takes force)")
    started = time.perf_counter()
    plan = plan_reshard(src, to=to, dtype=dtype, source_format=source_format, merge_lora=merge_lora,
                        language_model=language_model, **options)
    _check_plan_sources(plan, dst)
    if dry_run:
        return ReshardReport(plan.source, os.path.abspath(dst), len(plan.files), plan.model_tensors,
                             plan.total_bytes, time.perf_counter() - started, True, plan)
    from pyconv.scaleout import world_from_env

    if world_from_env() is None:
        from pyconv.execute import execute_plan

        execute_plan(plan, dst, force=force, threads=threads, progress=progress, device=device, phase=phase)
    else:  # launched by torchrun: this rank writes its share of the files
        from pyconv.scaleout import execute_plan_distributed

        if device != "cpu":
            raise LayoutError("device cuda is not supported under torchrun yet; run it single-process")
        execute_plan_distributed(plan, dst, force=force, threads=threads, progress=progress)
    return ReshardReport(plan.source, os.path.abspath(dst), len(plan.files), plan.model_tensors, plan.total_bytes,
                         time.perf_counter() - started, False, plan)
