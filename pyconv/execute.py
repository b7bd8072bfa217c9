"""Runs a ReshardPlan: hands its block copies to the core and commits the output atomically.

Output is written into a temporary sibling of the destination, `.NAME.pyconv-tmp-PID`,
fsync'd file by file, and renamed into place only when complete, so a crash at any moment
leaves either the old destination or the new one, never a half-written checkpoint.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from contextlib import contextmanager

from pyconv import _core
from pyconv.errors import Cancelled, FormatError, LayoutError, OutputError
from pyconv.plan import ReshardPlan, core_records

TMP_MARK = ".pyconv-tmp-"
OLD_MARK = ".pyconv-old-"


def temporary_sibling(dst: str, mark: str = TMP_MARK) -> str:
    parent, name = os.path.split(os.path.abspath(dst))
    return os.path.join(parent, f".{name}{mark}{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(dst: str) -> list[str]:
    """Removes temporaries of `dst` left by pyconv runs whose process is gone."""
    parent, name = os.path.split(os.path.abspath(dst))
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in os.listdir(parent):
        for mark in (TMP_MARK, OLD_MARK):
            prefix = f".{name}{mark}"
            if entry.startswith(prefix) and entry[len(prefix):].isascii() and entry[len(prefix):].isdigit():
                pid = int(entry[len(prefix):])
                if pid != os.getpid() and not _pid_alive(pid):
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
                    removed.append(entry)
    return removed


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _signals_raise_cancelled():
    """SIGTERM (and SIGHUP) stop the run like Ctrl-C does: cleanly, removing the temporary."""
    def handler(signum, frame):
        raise Cancelled(f"interrupted by signal {signal.Signals(signum).name}")

    previous = {}
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _phases(progress, phase):
    """progress, also announcing 'syncing' to phase once every byte is copied (the executor then
    flushes the files to disk before it returns)."""
    if phase is None:
        return progress
    synced = []

    def tick(done: int, total: int):
        keep_going = progress(done, total) if progress is not None else True
        if done >= total and not synced:
            synced.append(True)
            phase("syncing")
        return keep_going

    return tick


def execute_plan(plan: ReshardPlan, dst: str, *, force: bool = False, threads: int = 4,
                 chunk_bytes: int = 32 << 20, progress=None, device: str = "cpu", phase=None) -> dict:
    """Writes the plan's files under dst atomically. Returns the executor's statistics.
    device "cuda" runs the tensor arithmetic in Triton kernels (pyconv/cuda_exec.py).
    progress(done bytes, total bytes) about every 100 ms; phase(name) as the run enters 'copying',
    'syncing' and 'committing'."""
    if device not in ("cpu", "cuda"):
        raise LayoutError(f"unknown device '{device}' (choose cpu or cuda)")
    if device == "cuda":
        from pyconv.cuda_exec import load_backend

        load_backend()  # no GPU and no interpreter: refuse before creating anything
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    if os.path.lexists(dst) and not force:
        raise OutputError(f"{dst}: destination exists (replacing it takes force)")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{parent}: cannot create the destination's parent directory: {e.strerror}") from None
    remove_stale_temporaries(dst)
    tmp = temporary_sibling(dst)
    started = time.perf_counter()
    try:  # from mkdir on, so that a signal arriving at any point removes the temporary
        try:
            os.mkdir(tmp)
        except OSError as e:
            raise OutputError(f"{dst}: cannot create a temporary directory beside it: {e.strerror}") from None
        with _signals_raise_cancelled():
            subdirs = sorted({os.path.dirname(f.path) for f in plan.files} - {""})
            for sub in subdirs:
                os.makedirs(os.path.join(tmp, sub), exist_ok=True)
            if phase is not None:
                phase("copying")
            tick = _phases(progress, phase)
            if device == "cuda":
                from pyconv.cuda_exec import execute_plan_cuda

                stats = execute_plan_cuda(plan, tmp, threads=threads, progress=tick)  # _core.validate first
            else:
                stats = _core.execute(*core_records(plan, tmp), threads=threads, chunk_bytes=chunk_bytes,
                                      fsync=True, progress=tick)
            for sub in subdirs:
                _fsync_dir(os.path.join(tmp, sub))
            _fsync_dir(tmp)
            if phase is not None:
                phase("committing")
            _commit(tmp, dst, force)
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Cancelled("interrupted (Ctrl-C); nothing was written to the destination") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{dst}: no space left on the device") from None
        raise OutputError(f"{e.filename or dst}: {e.strerror}") from None
    except (OutputError, FormatError) as e:
        # The core names the files it writes (and a plan's ranges in them) by their temporary
        # path, which is gone by now: name them where they would have been, under the destination.
        shutil.rmtree(tmp, ignore_errors=True)
        raise type(e)(str(e).replace(tmp, dst)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats["wall_seconds"] = time.perf_counter() - started
    return stats


def _commit(tmp: str, dst: str, force: bool) -> None:
    """Renames tmp to dst without ever replacing a destination it was not asked to: with force an
    existing dst is moved aside first and removed after; a dst that appears meanwhile (another
    process converting into it) makes this one fail, never replaced."""
    old = None
    if force and os.path.lexists(dst):
        old = temporary_sibling(dst, OLD_MARK)
        os.rename(dst, old)
    err = _core.rename_no_replace(tmp, dst)
    if err in (errno.EINVAL, errno.ENOSYS):  # a filesystem that cannot refuse to replace: check, then rename
        err = errno.EEXIST if os.path.lexists(dst) else 0
        if not err:
            os.rename(tmp, dst)
    if err:
        if old is not None and not os.path.lexists(dst):
            os.rename(old, dst)  # the replaced destination, put back
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputError(f"{dst}: destination appeared while this conversion ran (another process writing "
                              "it?); it was left as it is")
        raise OutputError(f"{dst}: cannot rename the finished output into place: {os.strerror(err)}")
    _fsync_dir(os.path.dirname(dst))
    if old:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)
