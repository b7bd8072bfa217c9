"""Scale-out: `torchrun --nproc-per-node N [--nnodes M ...] -m pyconv reshard ...`.

The plan is the same on every rank; its output files are split among the ranks, balanced by
bytes. Rank 0 prepares the temporary sibling of the destination, every rank writes its own
files into it, and after a barrier rank 0 fsyncs and renames it into place — or removes it if
any rank failed. torch.distributed (gloo) is imported only here, so single-process runs,
the default, never import torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time

from pyconv import _core
from pyconv.errors import OutputError, PyconvError
from pyconv.execute import TMP_MARK, _commit, _fsync_dir
from pyconv.plan import ReshardPlan, core_records


def world_from_env() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world


def partition_files(sizes: list[int], world: int) -> list[list[int]]:
    """File indices per rank: largest file first onto the least-loaded rank (deterministic,
    so every rank computes the same split)."""
    loads = [0] * world
    parts: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        parts[rank].append(i)
        loads[rank] += sizes[i]
    return [sorted(p) for p in parts]


def _run_id() -> str:
    raw = os.environ.get("TORCHELASTIC_RUN_ID") or f"{os.environ.get('MASTER_ADDR', '')}-{os.environ.get('MASTER_PORT', '')}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[:64] or "run"


def _broadcast(dist, value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def execute_plan_distributed(plan: ReshardPlan, dst: str, *, force: bool = False, threads: int = 4,
                             chunk_bytes: int = 32 << 20, progress=None) -> dict:
    import torch.distributed as dist

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    try:
        return _execute_on_this_rank(dist, plan, dst, force=force, threads=threads, chunk_bytes=chunk_bytes,
                                     progress=progress)
    finally:
        if owns_group:
            # Tear gloo down before interpreter exit: a live group's threads can abort the process.
            dist.destroy_process_group()


def _execute_on_this_rank(dist, plan: ReshardPlan, dst: str, *, force: bool, threads: int, chunk_bytes: int,
                          progress) -> dict:
    rank, world = world_from_env()
    dst = os.path.abspath(dst)
    parent, name = os.path.split(dst)
    tmp = os.path.join(parent, f".{name}{TMP_MARK}run-{_run_id()}")
    started = time.perf_counter()

    problem = None
    if rank == 0:
        try:
            if os.path.lexists(dst) and not force:
                raise OutputError(f"{dst}: destination exists (replacing it takes force)")
            os.makedirs(parent, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a failed earlier attempt of this same run
            os.mkdir(tmp)
            for sub in sorted({os.path.dirname(f.path) for f in plan.files} - {""}):
                os.makedirs(os.path.join(tmp, sub), exist_ok=True)
        except (PyconvError, OSError) as e:
            problem = str(e) if isinstance(e, PyconvError) else f"{dst}: cannot prepare the output: {e.strerror}"
    problem = _broadcast(dist, problem)
    if problem:
        raise OutputError(problem)

    mine = partition_files([f.size for f in plan.files], world)[rank]
    stats: dict = {"bytes_written": 0}
    failure = None
    try:
        part = dataclasses.replace(plan, files=tuple(plan.files[i] for i in mine))
        if part.files:
            sources, dests, literals, tensors = core_records(part, tmp)
            stats = _core.execute(sources, dests, literals, tensors, threads=threads, chunk_bytes=chunk_bytes,
                                  fsync=True, progress=progress)
    except BaseException as e:  # noqa: BLE001 - every rank must reach the collective below
        failure = f"rank {rank}: {e}"
    failures: list = [None] * world
    dist.all_gather_object(failures, failure)
    failed = [f for f in failures if f]

    outcome = None
    if rank == 0:
        try:
            if failed:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                for sub in sorted({os.path.dirname(f.path) for f in plan.files} - {""}):
                    _fsync_dir(os.path.join(tmp, sub))
                _fsync_dir(tmp)
                _commit(tmp, dst, force)
        except OutputError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = str(e)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = f"{dst}: cannot commit the output: {e.strerror}"
    outcome = _broadcast(dist, outcome)
    if failed:
        raise PyconvError(failed[0] + (f" (and {len(failed) - 1} more ranks failed)" if len(failed) > 1 else ""))
    if outcome:
        raise OutputError(outcome)
    totals: list = [None] * world
    dist.all_gather_object(totals, stats.get("bytes_written", 0))
    return {**stats, "rank": rank, "world_size": world, "files_this_rank": len(mine),
            "bytes_written_all_ranks": sum(totals), "wall_seconds": time.perf_counter() - started}
